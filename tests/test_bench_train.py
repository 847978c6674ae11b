"""scripts/bench_train.py on a tiny Any2Point: one JSON line whose per-stage FLOPs add up to the
step's executed FLOPs counted by torch.utils.flop_counter, with every stage of the model present,
and whose model FLOPs are those of the same step with recomputation switched off."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from scripts.bench_train import current_rss_bytes, main

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
    # Counted on half the batch and scaled: the same figure (every counted operator works per sample),
    # but for the data-dependent part (the adapter's non-empty cells) of the clouds left out.
    counts = []
    for extra in ([], ["--flops-batch-size", "2"]):
        main(["--config", str(cfg), "--batch-size", "4", "--points", "128", "--repeats", "1", "--no-breakdown",
              "--no-memory-process", *extra])
        counts.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["flops_per_step"])
    assert counts[1] == pytest.approx(counts[0], rel=1e-3) and counts[1] != counts[0] / 2
    assert report["flops_executed_per_step"] != report["flops_per_step"]
    assert report["device_waits_per_step"] == sum(report["device_waits"].values()) > 0  # the adapter's cells
