"""Converting the authors' released checkpoints: released-layout files written here (real key names,
random values, tiny sizes; full sizes on the ``meta`` device) go through the converter into our model
and give the model they came from; unknown, missing and misshaped tensors are errors naming them;
the command line converts, and ``main.py --test`` evaluates the result."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from any2point import build_model, load_config
from any2point.engine import checkpoint
from any2point.errors import CheckpointError
from main import main as main_entry
from any2point.convert.any2point import RUNS, compare_frozen, convert_state, model_keys, read_released, swap_halves
from any2point.convert.point_peft import POINT_PEFT_RUNS
from tools.convert_ckpt import RUN_NAMES
from tools.convert_ckpt import main as convert_main
from tests.conftest import TINY_SOURCES as BASE_SOURCES

ROOT = Path(__file__).resolve().parents[1]
TINY_SOURCES = {  # the tiny paper sources with the released code's attention
    **BASE_SOURCES,
    "clip_text": {**BASE_SOURCES["clip_text"], "official_seq_first_bug": True},
    "imagebind_audio": {**BASE_SOURCES["imagebind_audio"], "official_plain_qkv": True},
}
# The released layouts: ScanObjectNN runs (openpoints) and ModelNet40 runs (Point-MAE, DataParallel).
ENCODER = {"openpoints": "encoder.", "pointmae": "module."}
SCAN_HEAD = {"0": "prediction.head.0.0", "1": "prediction.head.0.1", "4": "prediction.head.2.0",
             "5": "prediction.head.2.1", "8": "prediction.head.4.0"}
IMAGEBIND_NAMES = {"attn.in_proj_": "attn.qkv.", "attn.out_proj.": "attn.proj.", "norm_1.": "norm1.",
                   "norm_2.": "norm2."}

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(source: str, layout: str) -> dict:
    return dict(type="Any2Point", num_classes=5, source=TINY_SOURCES[source],
                tokenizer=dict(type="PointPNTokenizer", k=16, norm="scan" if layout == "openpoints" else "mn40_batch"),
                projection=dict(type="VirtualProjection", frame="data", trans=-1.4,
                                **(dict(lines="pointclip_views", line_direction=[-1.0, 0.0, 1.0], line_index="official")
                                   if source == "clip_text" else dict(plane_index="official", pe_2d_scramble=True))),
                tuner=dict(type="GuidedAdapter", bottleneck=4, voxel_size=0.5, dense_cell_norm=True),
                head_hidden_bias=layout == "pointmae", pe_injection="every_block", random_cls_pos=True)


def released_state(model: torch.nn.Module, layout: str, source: str) -> dict[str, torch.Tensor]:
    """``model``'s weights as the released code's saver wrote them (written from the official layout,
    independently of the converter's rules)."""
    enc = ENCODER[layout]
    blocks = "resblocks" if source == "clip_text" else "blocks"
    views = "out_transform_1d" if source == "clip_text" else "out_transform_2d"
    out = {}
    for key, value in model.state_dict().items():
        if key in ("cls_token", "cls_pos_embed"):
            out[enc + {"cls_token": "cls_token", "cls_pos_embed": "cls_pos"}[key]] = value
        elif key.startswith("tokenizer.stem."):
            out[enc + "patch_embed.EncP.raw_point_embed.net." + key[len("tokenizer.stem."):]] = value
        elif m := re.fullmatch(r"tokenizer\.stages\.(\d+)\.blocks\.(\d+)\.(.+)", key):
            out[f"{enc}patch_embed.EncP.LGA_list.{m[1]}.linear2.{m[2]}.{m[3]}"] = value
        elif key.startswith("source.norm."):
            out[enc + key[len("source."):]] = value
        elif m := re.fullmatch(r"tuner\.local_attention\.norms\.(\d+)\.(.+)", key):
            out[f"{enc}norm3.{m[1]}.{m[2]}"] = value
        elif m := re.fullmatch(r"tuner\.local_attention\.(qkv|proj)\.(\d+)\.(.+)", key):
            out[f"{enc}attn1.{m[2]}.{m[1]}.{m[3]}"] = value
        elif m := re.fullmatch(r"tuner\.blocks\.(\d+)\.(down|up)\.(.+)", key):
            out[f"{enc}{blocks}.{m[1]}.adapter.{'ln1' if m[2] == 'down' else 'ln2'}.{m[3]}"] = value
        elif m := re.fullmatch(r"tuner\.blocks\.(\d+)\.(view|voxel)_norm\.(weight|bias)\.(\d+)", key):
            name = f"{views}.{m[4]}.0" if m[2] == "view" else "out_transform_3d.0"
            out[f"{enc}{blocks}.{m[1]}.{name}.{m[3]}"] = value
        elif m := re.fullmatch(r"tuner\.blocks\.(\d+)\.(view|voxel)_norm\.(running_mean|running_var)", key):
            for row, stats in enumerate(value):
                name = f"{views}.{row}.0" if m[2] == "view" else "out_transform_3d.0"
                out[f"{enc}{blocks}.{m[1]}.{name}.{m[3]}"] = stats
                out[f"{enc}{blocks}.{m[1]}.{name}.num_batches_tracked"] = torch.tensor(300)
        elif m := re.fullmatch(r"source\.blocks\.(\d+)\.(.+)", key):
            inner = m[2]
            if inner.endswith(("bias_k", "bias_v")):
                continue  # the released ImageBind attention has none
            for ours, theirs in IMAGEBIND_NAMES.items():
                inner = theirs + inner[len(ours):] if source == "imagebind_audio" and inner.startswith(ours) else inner
            out[f"{enc}{blocks}.{m[1]}.{inner}"] = value
        elif m := re.fullmatch(r"head\.(\d+)\.(.+)", key):
            if layout == "openpoints":
                out[f"{SCAN_HEAD[m[1]]}.{m[2]}"] = value
            else:  # the ModelNet head reads [cls, max]
                out[f"module.cls_head_finetune.{m[1]}.{m[2]}"] = swap_halves(value) if key == "head.0.weight" else value
        else:
            raise AssertionError(f"no released name for {key}")
    return out


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values in every trainable tensor and every BN statistic (frozen source untouched)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in checkpoint.trainable_state_dict(model).items():
            target = model.state_dict()[key]
            if target.is_floating_point():
                noise = torch.randn(target.shape, generator=g)
                target.copy_(torch.rand(target.shape, generator=g) + 0.5 if "running_var" in key else noise * 0.3)
    return model


def convert(model: torch.nn.Module, state: dict, layout: str, source: str):
    expected, frozen, absent = model_keys(model)
    return convert_state(state, layout, expected, frozen, source == "imagebind_audio", absent)


CASES = [(s, layout) for s in TINY_SOURCES for layout in ("openpoints", "pointmae")]


@pytest.mark.parametrize("source, layout", CASES, ids=[f"{s}-{lay}" for s, lay in CASES])
def test_released_layout_round_trip_gives_the_same_logits(source, layout):
    torch.manual_seed(0)
    original = randomized(build_model(tiny_cfg(source, layout)), seed=1).eval()
    state = released_state(original, layout, source)
    if layout == "pointmae":
        assert all(k.startswith("module.") for k in state)
    torch.manual_seed(0)
    ours = build_model(tiny_cfg(source, layout))  # same frozen source, other trainable values
    conversion = convert(ours, state, layout, source)
    checkpoint.load_trainable_state_dict(ours, conversion.model, "converted")
    assert compare_frozen(conversion.frozen, ours.source.state_dict()) == []
    torch.manual_seed(2)
    points = torch.randn(3, 256, 3)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(points), original(points), atol=1e-6, rtol=0)
    reasons = {reason for _, reason in conversion.dropped}
    assert any("batch-count" in r for r in reasons)
    assert len(conversion.mapped) + sum("batch-count" in r for _, r in conversion.dropped) == len(state)


def test_module_prefix_is_optional_for_modelnet_files():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("dinov2", "pointmae"))
    state = {k[len("module."):]: v for k, v in released_state(model, "pointmae", "dinov2").items()}
    assert len(convert(model, state, "pointmae", "dinov2").model) == len(checkpoint.trainable_state_dict(model))


def test_frozen_weights_that_differ_from_the_source_file_are_named():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("clip_text", "openpoints"))
    state = released_state(model, "openpoints", "clip_text")
    state["encoder.resblocks.1.mlp.c_fc.weight"] = state["encoder.resblocks.1.mlp.c_fc.weight"] + 0.5
    differ = compare_frozen(convert(model, state, "openpoints", "clip_text").frozen, model.source.state_dict())
    assert differ == ["source.blocks.1.mlp.c_fc.weight (max abs diff 0.5)"]


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"encoder.resblocks.0.adapter.ln3.weight": torch.zeros(4)}),
     "unknown keys (1): encoder.resblocks.0.adapter.ln3.weight"),
    (lambda s: s.update({"optimizer.state": torch.zeros(1)}), "unknown keys (1): optimizer.state"),
    (lambda s: s.pop("encoder.attn1.3.qkv.weight"), "missing (no released tensor for 1 of our keys): "
                                                     "tuner.local_attention.qkv.3.weight"),
    (lambda s: s.pop("encoder.resblocks.1.out_transform_1d.2.0.running_var"),
     "tuner.blocks.1.view_norm.running_var (rows [2] of 6)"),
    (lambda s: s.pop("encoder.resblocks.0.attn.in_proj_weight"), "source.blocks.0.attn.in_proj_weight"),
    (lambda s: s.update({"encoder.resblocks.1.adapter.ln1.weight": torch.zeros(8, 64)}),
     "shape mismatch (1): encoder.resblocks.1.adapter.ln1.weight (8, 64) -> tuner.blocks.1.down.weight (4, 64)"),
    (lambda s: s.update({"encoder.resblocks.7.adapter.ln1.weight": torch.zeros(4, 64)}),
     "encoder.resblocks.7.adapter.ln1.weight (-> tuner.blocks.7.down.weight, which this model does not have)"),
])
def test_unknown_missing_and_misshaped_tensors_are_errors_naming_them(edit, message):
    torch.manual_seed(0)
    model = build_model(tiny_cfg("clip_text", "openpoints"))
    state = released_state(model, "openpoints", "clip_text")
    edit(state)
    with pytest.raises(CheckpointError) as info:
        convert(model, state, "openpoints", "clip_text")
    assert message in str(info.value)


# ------------------------------------------------------------------------------------- the six presets

RELEASED_TENSORS = {"scanobjectnn_clip_text": 728, "scanobjectnn_dinov2": 752, "scanobjectnn_imagebind_audio": 728,
                    "modelnet40_clip_text": 730, "modelnet40_dinov2": 754, "modelnet40_imagebind_audio": 730}
# trainable parameters of the official models, head included
OFFICIAL_TRAINABLE = {"scanobjectnn_clip_text": 1_411_943, "scanobjectnn_dinov2": 1_264_391,
                      "scanobjectnn_imagebind_audio": 1_338_167, "modelnet40_clip_text": 1_418_880,
                      "modelnet40_dinov2": 1_271_328, "modelnet40_imagebind_audio": 1_271_328}


@pytest.mark.parametrize("run", list(RUNS))
def test_full_size_presets_take_a_full_size_released_layout(run):
    assert RUN_NAMES == tuple(RUNS) + tuple(POINT_PEFT_RUNS) and (ROOT / RUNS[run].preset).is_file()
    cfg = load_config(ROOT / RUNS[run].preset, ["model.source.pretrained=null"])
    with torch.device("meta"):
        model = build_model(cfg.model)
    counts = model.parameter_counts()
    assert counts["trainable"] == OFFICIAL_TRAINABLE[run]
    source = cfg.model.source.type
    kind = {"CLIPTextSource": "clip_text", "TimmViTSource": "dinov2", "ImageBindAudioSource": "imagebind_audio"}[source]
    state = released_state(model, RUNS[run].layout, kind)
    assert len(state) == RELEASED_TENSORS[run]
    conversion = convert(model, state, RUNS[run].layout, kind)
    assert set(conversion.model) == set(model_keys(model)[0])


def test_read_released_refuses_the_other_layout_and_missing_files(tmp_path):
    path = tmp_path / "released.pth"
    torch.save({"base_model": {"module.cls_token": torch.zeros(1, 1, 4)}, "epoch": 3}, path)
    state, meta = read_released(path, RUNS["modelnet40_dinov2"])
    assert list(state) == ["module.cls_token"] and meta == {"epoch": 3}
    with pytest.raises(CheckpointError, match="no 'model' state dict .* it has 'base_model', the layout of the "
                                              "ModelNet40 runs: check --run"):
        read_released(path, RUNS["scanobjectnn_dinov2"])
    with pytest.raises(CheckpointError, match="released checkpoint not found: .*Vision_DINOV2_Scan.pth from https"):
        read_released(tmp_path / "absent.pth", RUNS["scanobjectnn_dinov2"])


def test_command_line_errors_are_one_line(tmp_path, capsys):
    code = convert_main(["--official", str(tmp_path / "absent.pth"), "--run", "modelnet40_clip_text",
                         "--out", str(tmp_path / "out.pth")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("error: released checkpoint not found")


def test_convert_then_main_test_evaluates_the_released_model(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = tiny_cfg("dinov2", "openpoints")
    original = randomized(build_model(cfg), seed=1).eval()
    released = tmp_path / "scan_ckpt_best.pth"
    torch.save({"model": released_state(original, "openpoints", "dinov2"), "optimizer": {}, "scheduler": {},
                "epoch": 212, "best_val": np.float64(87.7)}, released)  # training scripts store NumPy scalars
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": cfg, "train": {"test_batch_size": 8, "num_workers": 0, "amp": False, "device": "cpu"},
        "dataset": {"type": "SyntheticShapes", "num_points": 256, "train_size": 8, "val_size": 8, "test_size": 12,
                    "classes": ["sphere", "box", "cone", "torus", "cylinder"]}}))
    out = tmp_path / "converted.pth"
    assert convert_main(["--official", str(released), "--run", "scanobjectnn_dinov2", "--out", str(out),
                         "--config", str(config)]) == 0
    ckpt = checkpoint.load(out)
    assert ckpt["epoch"] == 212 and ckpt["official"]["best_val"] == 87.7 and ckpt["source"] is None
    torch.manual_seed(0)  # the same random-init source as the original's
    ours = build_model(ckpt["config"]["model"])
    checkpoint.load_trainable_state_dict(ours, ckpt["model"], str(out))
    points = torch.randn(2, 256, 3)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(points), original(points), atol=1e-6, rtol=0)
    capsys.readouterr()
    assert main_entry(["--test", "--ckpt", str(out)]) == 0
    assert re.search(r"test OA \d+\.\d+", capsys.readouterr().err)


@pytest.mark.parametrize("run", list(RUNS))
def test_eval_scripts_convert_then_test(run, tmp_path):
    script = ROOT / "scripts" / "official" / f"eval_{run}.sh"
    done = subprocess.run(["bash", str(script), "released.pth", "data", "--dry-run"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    convert_line, test_line = done.stdout.strip().splitlines()
    assert convert_line == (f"python tools/convert_ckpt.py --official {tmp_path}/released.pth --run {run} "
                            f"--out experiments/official/{run}.pth dataset.root={tmp_path}/data")
    assert test_line == f"python main.py --test --ckpt experiments/official/{run}.pth"
    wrong = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: usage:")
