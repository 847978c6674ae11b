"""Every config under cfgs/ loads, validates and builds (full-size models on the ``meta`` device, at
random init); the paper's Table 2 configs have trainable counts near the paper's #P."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from any2point import load_config
from tools.count_params import count_params
from tools.count_params import main as count_params_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "cfgs").rglob("*.yaml") if "_base_" not in p.parts)
# Paper Table 2, #P (trainable parameters without the head), for both sources.
PAPER_PARAMS = {"full_finetune": 86.3e6, "prompt_tuning": 0.4e6, "adapter_tuning": 0.4e6, "lora": 0.9e6,
                "any2point": 0.8e6}
# Each paper table's rows and the sources it uses (1D = CLIP text, 2D = DINOv2).
BOTH = ("clip_text", "dinov2")
TABLES = {2: (5, BOTH), 3: (4, BOTH), 4: (4, BOTH), 5: (3, BOTH), 7: (3, BOTH), 8: (5, ("dinov2",)),
          9: (4, ("clip_text",)), 10: (3, BOTH)}


@pytest.mark.parametrize("config", CONFIGS)
def test_config_loads_validates_and_builds(config: str) -> None:
    cfg = load_config(ROOT / config)
    counts = count_params(str(ROOT / config))
    assert 0 < counts["trainable_without_head"] <= counts["trainable"] <= counts["total"], config
    if config.startswith("cfgs/paper/"):
        assert cfg.experiment.name == "paper_" + "_".join(Path(config).parts[-2:]).removesuffix(".yaml")
        assert (ROOT / config).read_text().startswith("# Paper Table"), "the paper's row is named in a comment"
    if config.startswith("cfgs/paper/table2/"):
        method = Path(config).stem.removesuffix("_clip_text").removesuffix("_dinov2")
        assert 0.75 <= counts["trainable_without_head"] / PAPER_PARAMS[method] <= 1.25, (config, counts)


def test_every_paper_table_has_its_rows() -> None:
    for table, (rows, sources) in TABLES.items():
        folder = ROOT / f"cfgs/paper/table{table}"
        for source in sources:
            assert len(list(folder.glob(f"*_{source}.yaml"))) == rows, (table, source)
        assert len(list(folder.glob("*.yaml"))) == rows * len(sources), table


def test_count_params_prints_a_table2_configs_counts(capsys: pytest.CaptureFixture) -> None:
    count_params_main(["--config", str(ROOT / "cfgs/paper/table2/lora_clip_text.yaml")])
    counts = json.loads(capsys.readouterr().out)
    # Tokenizer 276,672 + cls token and PE 1,536 + final norm 1,536 + 12 blocks x (q, v) x rank 16.
    assert counts["trainable_without_head"] == 276_672 + 1_536 + 1_536 + 12 * 2 * 2 * 16 * 768
    assert set(counts) == {"total", "trainable", "trainable_without_head"}
