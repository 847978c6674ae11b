"""scripts/bench_train.py on a tiny Any2Point: one JSON line whose per-stage FLOPs add up to the
step's executed FLOPs counted by torch.utils.flop_counter, with every stage of the model present,
and whose model FLOPs are those of the same step with recomputation switched off."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from any2point.engine.optim import build_optimizer
from scripts.bench_train import Step, count_flops, current_rss_bytes, main, parse_args

TINY = {
    "model": {"type": "Any2Point", "num_classes": 4,
              "source": {"type": "CLIPTextSource", "width": 32, "depth": 2, "heads": 2, "pretrained": None},
              "tokenizer": {"type": "PointPNTokenizer", "k": 8},
              "tuner": {"type": "GuidedAdapter", "bottleneck": 4, "voxel_size": 0.5}},
    "dataset": {"type": "SyntheticShapes", "num_points": 128, "train_size": 8, "val_size": 4, "test_size": 4},
}


@pytest.mark.usefixtures("one_thread")
def test_one_json_line_with_stages_adding_up(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    ballast = torch.ones(2 ** 29)  # 2 GiB resident here must not show in the fresh process's peak
    parent_rss = current_rss_bytes()
    main(["--config", str(cfg), "--batch-size", "2", "--points", "128", "--repeats", "1"])
    del ballast
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["step_s_min"] <= report["step_s_median"] and 0 < report["mfu"] < 1
    assert parent_rss - 2 ** 30 > report["peak_memory_bytes"] > report["rss_before_step_bytes"] > 0
    stages = report["stages"]
    assert {"tokenizer", "projection", "blocks", "adapters", "head", "optimizer"} <= set(stages)
    assert stages["tokenizer"]["flops"] > 0 and stages["blocks"]["flops"] > 0 and stages["adapters"]["flops"] > 0
    assert sum(stage.get("flops", 0) for stage in stages.values()) == report["flops_executed_per_step"]
    assert sum(stage["share"] for stage in stages.values()) == pytest.approx(1.0, abs=1e-3)
    # The model FLOPs (MFU's) are those of the step with recomputation switched off in the config.
    main(["--config", str(cfg), "--batch-size", "2", "--points", "128", "--repeats", "1", "--no-breakdown",
          "--no-memory-process", "+model.tokenizer.recompute=false", "+model.tuner.checkpoint=false"])
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plain["flops_per_step"] == plain["flops_executed_per_step"] == report["flops_per_step"]
    assert report["flops_executed_per_step"] != report["flops_per_step"]
    assert report["device_waits_per_step"] == sum(report["device_waits"].values()) > 0  # the adapter's cells


def flops_without_recomputation(step: Step) -> int:
    """The reference: the step's FLOPs on a copy of the model with every memory-saving switch off
    (the tokenizer's lean path, the tuner's and the blocks' checkpointing), at the full batch."""
    model = copy.deepcopy(step.model)
    for module in model.modules():
        for switch in ("recompute", "checkpoint", "checkpoint_blocks"):
            if isinstance(getattr(module, switch, None), (bool, str)):  # checkpoint_blocks may be "auto"
                setattr(module, switch, False)
    twin = copy.copy(step)
    twin.model = twin.net = model
    twin.optimizer = build_optimizer(step.cfg.optimizer, model)
    twin.params = [p for p in model.parameters() if p.requires_grad]
    with FlopCounterMode(display=False) as counter:
        twin.backward(twin.forward())
        twin.update()
    return counter.get_total_flops()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("overrides", [[], ["model.checkpoint_blocks=true"], ["+model.block_memory_gb=1e-9"]])
def test_model_flops_of_the_step_itself_equal_a_copy_without_recomputation(tmp_path: Path, overrides: list) -> None:
    # The count runs the step as configured (its memory, not a non-recomputing copy's at the full batch).
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    step = Step(parse_args(["--config", str(cfg), "--batch-size", "3", "--points", "128", *overrides]))
    step()  # as the bench's warm-up: checkpoint_blocks auto measures a block once per token count
    reference = flops_without_recomputation(step)
    executed, model = count_flops(step)
    assert model == reference
    assert executed != model  # the lean tokenizer and the checkpointed branches did run twice


@pytest.mark.usefixtures("one_thread")
def test_eval_times_test_style_forward_passes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    report = main(["--config", str(cfg), "--batch-size", "4", "--points", "128", "--repeats", "2", "--eval",
                   "--no-memory-process"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    assert report["mode"] == "eval" and 0 < report["mfu"] < 1
    assert report["samples_per_s"] == pytest.approx(4 / report["step_s_median"], rel=1e-2)
    # The FLOPs are those of the model's forward pass in eval mode without a gradient (brute force).
    step = Step(parse_args(["--config", str(cfg), "--batch-size", "4", "--points", "128"]))
    step.model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        step.model(step.points)
    assert report["flops_per_step"] == report["flops_executed_per_step"] == counter.get_total_flops()
    assert report["flops_per_sample"] * 4 == report["flops_per_step"]
    stages = report["stages"]  # the forward pass only: no optimizer
    assert "optimizer" not in stages and stages["tokenizer"]["flops"] > 0 and stages["blocks"]["flops"] > 0
    assert sum(stage["flops"] for stage in stages.values()) == report["flops_per_step"]
