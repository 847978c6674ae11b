"""Every config under cfgs/ loads, validates and builds (full-size models on the ``meta`` device, at
random init); the paper-table configs have trainable counts near the paper's #P."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from any2point import load_config
from any2point.paper import load_paper_results, paper_result
from tools.count_params import count_params
from tools.count_params import main as count_params_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "cfgs").rglob("*.yaml") if "_base_" not in p.parts)
# The paper's #P (trainable parameters without the head) of each config that runs a row giving one.
PAPER_PARAMS = {r.config: r for r in load_paper_results() if r.config is not None and r.params_m is not None}
TOKENIZER_ONLY = {s: f"cfgs/paper/table3/neither_{s}.yaml" for s in ("clip_text", "dinov2")}


@pytest.mark.parametrize("config", CONFIGS)
def test_config_loads_validates_and_builds(config: str) -> None:
    cfg = load_config(ROOT / config)
    counts = count_params(str(ROOT / config))
    if cfg.model.type == "PointNN":  # training-free: its memory bank is filled, not trained
        assert counts == {"total": 0, "trainable": 0, "trainable_without_head": 0}, config
    else:
        assert 0 < counts["trainable_without_head"] <= counts["trainable"] <= counts["total"], config
    if config.startswith("cfgs/paper/"):
        assert cfg.experiment.name == "paper_" + "_".join(Path(config).parts[-2:]).removesuffix(".yaml")
        assert (ROOT / config).read_text().startswith("# Paper Table"), "the paper's row is named in a comment"
    if config in PAPER_PARAMS and PAPER_PARAMS[config].row != "bottleneck_mlp":
        assert 0.75 <= counts["trainable_without_head"] / (PAPER_PARAMS[config].params_m * 1e6) <= 1.25, counts


@pytest.mark.parametrize("source", ["clip_text", "dinov2"])
def test_the_bottleneck_mlp_row_trains_the_baseline_and_the_bottlenecks(source: str) -> None:
    """Table 5 row 1 gives #P 0.25M, less than the 0.3M of Table 3's baseline that trains only the
    tokenizer and the head, which every row keeps: no config with that tokenizer can match it. Ours
    is the baseline plus the 12 blocks' bottlenecks ``C -> r -> C``."""
    assert paper_result(5, "bottleneck_mlp", source).params_m < paper_result(3, "neither", source).params_m
    config = f"cfgs/paper/table5/bottleneck_mlp_{source}.yaml"
    r = load_config(ROOT / config).model.tuner.bottleneck
    baseline = count_params(str(ROOT / TOKENIZER_ONLY[source]))["trainable_without_head"]
    assert count_params(str(ROOT / config))["trainable_without_head"] == baseline + 12 * (2 * 768 * r + r + 768)


def test_count_params_prints_a_table2_configs_counts(capsys: pytest.CaptureFixture) -> None:
    count_params_main(["--config", str(ROOT / "cfgs/paper/table2/lora_clip_text.yaml")])
    counts = json.loads(capsys.readouterr().out)
    # Tokenizer 276,672 + cls token and PE 1,536 + final norm 1,536 + 12 blocks x (q, v) x rank 16.
    assert counts["trainable_without_head"] == 276_672 + 1_536 + 1_536 + 12 * 2 * 2 * 16 * 768
    assert set(counts) == {"total", "trainable", "trainable_without_head"}
