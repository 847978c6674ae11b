"""tools/collect_results.py: grouping, mean +- std over seeds, references, CSV, errors."""
from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest

from any2point.engine.records import results_record, write_results
from any2point.engine.metrics import Metrics
from tools.collect_results import main as collect

RUNS = {  # experiment name -> (source type, seed, OA, mAcc)
    "son_clip_seed0": ("CLIPTextSource", 0, 90.0, 88.0),
    "son_clip_seed1": ("CLIPTextSource", 1, 91.0, 89.5),
    "son_clip_seed2": ("CLIPTextSource", 2, 92.5, 90.0),
    "son_dino_seed0": ("DINOv2Source", 0, 86.0, 84.0),
    "son_dino_seed1": ("DINOv2Source", 1, 87.0, 85.0),
}


def write_runs(root: Path) -> None:
    for name, (source, seed, oa, macc) in RUNS.items():
        config = {"model": {"type": "Any2Point", "source": {"type": source}},
                  "experiment": {"name": name, "seed": seed}}
        record = results_record(Metrics(oa=oa, macc=macc, per_class=[oa], count=100), config, ["a"],
                                split="test", protocol="honest", voting={"passes": 1, "seed": 0})
        write_results(record, root / name / "results.json")


def test_mean_std_per_group_with_reference(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_runs(tmp_path)
    assert collect([str(tmp_path), "--ref", "son_clip=91.9", "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    clip = f"{statistics.fmean([90, 91, 92.5]):.2f} ± {statistics.stdev([90, 91, 92.5]):.2f}"
    assert f"| son_clip | 3 | 0 1 2 | {clip} |" in out
    assert f"| son_dino | 2 | 0 1 | 86.50 ± {statistics.stdev([86, 87]):.2f} |" in out
    assert "| 91.90 | -0.73 |" in out and out.count("\n") == 4
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [r["group"] for r in rows] == ["son_clip", "son_dino"]
    assert float(rows[0]["OA_std"]) == pytest.approx(statistics.stdev([90, 91, 92.5]), abs=1e-4)
    assert rows[0]["configs"] == "1"  # the seeds' configs differ only in the experiment section


def test_group_by_config_key_and_single_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_runs(tmp_path)
    assert collect([str(tmp_path / "son_dino_seed0"), str(tmp_path / "son_clip_seed1"),
                    "--group-by", "model.source.type"]) == 0
    out = capsys.readouterr().out
    assert "| DINOv2Source | 1 | 0 | 86.00 | 84.00 | 1 | 1 |" in out
    assert "| CLIPTextSource | 1 | 1 | 91.00 | 89.50 | 1 | 1 |" in out


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_runs(tmp_path)
    assert collect([str(tmp_path / "nothere")]) == 2
    assert "nothere" in capsys.readouterr().err
    assert collect([str(tmp_path), "--group-by", "model.nokey"]) == 2
    assert "has no key 'model.nokey'" in capsys.readouterr().err
    (tmp_path / "son_clip_seed0" / "results.json").write_text("{not json")
    assert collect([str(tmp_path)]) == 2
    assert "not a readable results file" in capsys.readouterr().err
    assert collect([str(tmp_path / "son_dino_seed0"), "--ref", "oops"]) == 2
    assert "GROUP=NUMBER" in capsys.readouterr().err


def test_three_seeds_of_a_tiny_run(tmp_path: Path, capsys: pytest.CaptureFixture, one_thread) -> None:
    import json

    import yaml

    from any2point.config import load_config
    from any2point.engine.trainer import Trainer
    from tests.conftest import TINY_RUN

    for seed in range(3):
        cfg = {**TINY_RUN, "train": {**TINY_RUN["train"], "epochs": 2},
               "experiment": {"name": f"tiny_seed{seed}", "output_dir": str(tmp_path), "seed": seed}}
        (tmp_path / f"s{seed}.yaml").write_text(yaml.safe_dump(cfg))
        Trainer(load_config(tmp_path / f"s{seed}.yaml")).fit()
    capsys.readouterr()
    assert collect([str(tmp_path / f"tiny_seed{s}") for s in range(3)]) == 0
    oas = [json.loads((tmp_path / f"tiny_seed{s}" / "results.json").read_text())["metrics"]["OA"] for s in range(3)]
    row = f"| tiny | 3 | 0 1 2 | {statistics.fmean(oas):.2f} ± {statistics.stdev(oas):.2f} |"
    assert row in capsys.readouterr().out


def test_part_segmentation_runs_tabulate_their_mious(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from any2point.engine.metrics import SegmentationMetrics

    for seed, (ins, cls) in enumerate([(80.0, 70.0), (82.0, 73.0)]):
        config = {"model": {"type": "Any2PointSeg"}, "experiment": {"name": f"seg_seed{seed}", "seed": seed}}
        m = SegmentationMetrics(instance_miou=ins, class_miou=cls, accuracy=90.0, per_class=[ins], count=10)
        record = results_record(m, config, ["mug"], split="test", protocol="honest", voting={"passes": 1},
                                task="part_segmentation")
        write_results(record, tmp_path / "seg" / f"seg_seed{seed}" / "results.json")
    assert collect([str(tmp_path / "seg"), "--ref", "seg=80", "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    head = "| group | runs | seeds | instance_mIoU | class_mIoU | voting | configs | reference instance_mIoU | Δ |"
    assert head in out
    assert f"| seg | 2 | 0 1 | 81.00 ± {statistics.stdev([80, 82]):.2f} | 71.50 ± " in out and "| +1.00 |" in out
    assert float(next(csv.DictReader(open(tmp_path / "t.csv")))["class_mIoU_mean"]) == pytest.approx(71.5)
    write_runs(tmp_path / "cls")
    assert collect([str(tmp_path)]) == 2
    assert "mix tasks (classification, part_segmentation)" in capsys.readouterr().err


def test_paper_puts_ours_beside_the_papers_number_per_row_and_source(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    from any2point.paper import paper_result, table_results
    runs = {"table7_before_3_clip_text_seed0": 80.0, "table7_before_3_clip_text_seed1": 84.0,
            "table7_after_6_dinov2_seed0": 70.0, "scanobjectnn_clip_text_seed0": 90.0, "my_own_seed0": 50.0}
    for name, oa in runs.items():
        record = results_record(Metrics(oa=oa, macc=oa, per_class=[oa], count=100),
                                {"experiment": {"name": name, "seed": int(name[-1])}}, ["a"], split="test",
                                protocol="honest", voting={"passes": 1, "seed": 0})
        write_results(record, tmp_path / name / "results.json")
    assert collect([str(tmp_path), "--paper", "--markdown", str(tmp_path / "t.md")]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "the paper has no number for: my_own" in captured.err
    before = paper_result(7, "before_3", "clip_text").accuracy
    ours = f"{statistics.fmean([80, 84]):.2f} ± {statistics.stdev([80, 84]):.2f}"
    assert f"| 7 | before_3 | clip_text | {ours} | 2 | {before:.1f} | {82 - before:+.2f} |" in out
    after = paper_result(7, "after_6", "dinov2").accuracy
    assert f"| 7 | after_6 | dinov2 | 70.00 | 1 | {after:.1f} | {70 - after:+.2f} |" in out
    table1 = paper_result(1, "any2point_clip_text", "clip_text").accuracy
    assert f"| 1 | any2point_clip_text | clip_text | 90.00 | 1 | {table1:.1f} | {90 - table1:+.2f} |" in out
    # every row and source of Table 7 the paper reports, those not run with n = 0; Table 1's run rows only
    assert sum(line.startswith("| 7 |") for line in out.splitlines()) == len(table_results(7))
    not_run = paper_result(7, "parallel_9", "clip_text").accuracy
    assert f"| 7 | parallel_9 | clip_text | - | 0 | {not_run:.1f} | - |" in out
    assert sum(line.startswith("| 1 |") for line in out.splitlines()) == 1
    assert f"| table7_before_3_clip_text | 2 | 0 1 | {ours} |" in out
    assert f"| {before:.2f} | {82 - before:+.2f} |" in out
    assert (tmp_path / "t.md").read_text() == out


def test_paper_tables_print_the_readme_rendering(capsys: pytest.CaptureFixture) -> None:
    from any2point.paper import render_markdown
    assert collect(["--paper-tables"]) == 0
    assert capsys.readouterr().out == render_markdown()
    assert collect([]) == 2
    assert "give the experiment folders" in capsys.readouterr().err


def test_cost_columns_give_trainable_parameters_and_mean_time(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    write_runs(tmp_path)
    for name, seconds in (("son_dino_seed0", 10.0), ("son_dino_seed1", 20.0)):
        path = tmp_path / name / "results.json"
        record = json.loads(path.read_text())
        record.update(parameters={"total": 9999, "trainable": 1234}, run_seconds=seconds)
        path.write_text(json.dumps(record))
    assert collect([str(tmp_path), "--cost"]) == 0
    out = capsys.readouterr().out
    assert "| trainable | time (s) |" in out
    assert "| 1,234 | 15 |" in out and "| son_clip | 3 | 0 1 2 |" in out and "| - | - |" in out
    assert collect([str(tmp_path)]) == 0
    assert "trainable" not in capsys.readouterr().out
