"""Part segmentation: the mIoU metrics against a brute-force per-shape computation, the synthetic
part dataset, the ShapeNetPart reader on files written in its layout, the model on every tiny
source, training steps, and the trainer / test / voting path with results.json."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from any2point import build_dataset, build_model, load_config
from any2point.errors import ConfigError, DataError, DatasetNotFoundError
from any2point.datasets import shapenetpart
from any2point.datasets.shapenetpart import PARTS
from any2point.engine.evaluate import eval_loader, evaluate, evaluate_checkpoint, voting_dataset
from any2point.engine.tasks import SegmentationTask, build_task
from tests.conftest import TINY_SOURCES, train_once

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
# Non-contiguous part sets, to check nothing assumes ShapeNetPart's contiguous numbering.
CATEGORY_PARTS = [[0, 3, 5], [1, 2], [4, 6, 7, 8]]


def brute_force(logits: np.ndarray, categories: np.ndarray, target: np.ndarray,
                category_parts: list[list[int]]) -> tuple[float, float, list[float]]:
    """Instance mIoU, class mIoU and per-category mIoU (in %), one shape at a time."""
    per_category: dict[int, list[float]] = {}
    for shape_logits, c, truth in zip(logits, categories, target):
        parts = category_parts[c]
        pred = np.asarray(parts)[np.argmax(shape_logits[:, parts], axis=1)]  # ties: the first part
        ious = []
        for p in parts:
            union = np.sum((pred == p) | (truth == p))
            ious.append(1.0 if union == 0 else np.sum((pred == p) & (truth == p)) / union)
        per_category.setdefault(int(c), []).append(float(np.mean(ious)))
    shapes = [v for values in per_category.values() for v in values]
    table = [100 * np.mean(per_category[k]) if k in per_category else math.nan for k in range(len(category_parts))]
    return 100 * np.mean(shapes), 100 * np.mean([np.mean(v) for v in per_category.values()]), table


def test_metrics_equal_brute_force_with_ties_and_absent_parts() -> None:
    rng = np.random.default_rng(0)
    task = SegmentationTask(["a", "b", "c", "d"], CATEGORY_PARTS + [[9]], 10)
    meter = task.meter(CPU)
    all_logits, all_cats, all_target = [], [], []
    for _ in range(3):  # several batches accumulate
        b, n = 7, 12
        cats = rng.integers(0, 3, b)  # category "d" never occurs: NaN in the table, left out of class mIoU
        # integer logits in a small range: many ties
        logits = rng.integers(0, 3, (b, n, 10)).astype(np.float32)
        target = np.stack([rng.choice(CATEGORY_PARTS[c][:2], n) for c in cats])  # the last parts: absent from truth
        meter.add(torch.from_numpy(logits), {"label": torch.from_numpy(cats), "parts": torch.from_numpy(target)})
        all_logits.append(logits), all_cats.append(cats), all_target.append(target)
    m = meter.compute()
    instance, klass, table = brute_force(np.concatenate(all_logits), np.concatenate(all_cats),
                                         np.concatenate(all_target), CATEGORY_PARTS + [[9]])
    assert m.instance_miou == pytest.approx(instance) and m.class_miou == pytest.approx(klass)
    assert m.per_class[:3] == pytest.approx(table[:3]) and math.isnan(m.per_class[3])
    assert m.count == 21 and sum(m.per_class_count) == 21
    assert instance != pytest.approx(klass)  # the two means differ here, so each is checked


def test_part_absent_from_both_counts_as_one_and_predictions_stay_in_the_category() -> None:
    task = SegmentationTask(["a", "b"], [[0, 1, 2], [3, 4]], 5)
    meter = task.meter(CPU)
    logits = torch.full((1, 4, 5), -1.0)
    logits[0, :, 3] = 10.0  # a foreign part wins outright: never predicted for category 0
    logits[0, :2, 0], logits[0, 2:, 1] = 1.0, 1.0
    meter.add(logits, {"label": torch.tensor([0]), "parts": torch.tensor([[0, 0, 1, 0]])})
    m = meter.compute()
    # part 0: 2 / 3, part 1: 1 / 2, part 2 absent from both: 1
    assert m.instance_miou == pytest.approx(100 * (2 / 3 + 1 / 2 + 1) / 3)
    assert m.accuracy == pytest.approx(75.0)


def test_synthetic_parts_deterministic_and_labelled_by_category() -> None:
    cfg = {"type": "SyntheticParts", "num_points": 128, "train_size": 12, "val_size": 6, "test_size": 6}
    a, b = build_dataset(cfg, "train"), build_dataset(cfg, "train")
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x["points"], y["points"]) and torch.equal(x["parts"], y["parts"])
        parts = set(x["parts"].tolist())
        assert parts <= set(a.category_parts[x["label"]]) and len(parts) >= 2
        assert x["points"].norm(dim=1).max() == pytest.approx(1.0, abs=1e-5)
    assert [a[i]["label"] for i in range(6)] == list(range(6))
    other = build_dataset({**cfg, "seed": 1}, "train")
    assert not torch.equal(other[0]["points"], a[0]["points"])
    assert not torch.equal(build_dataset(cfg, "test")[0]["points"], a[0]["points"])
    trainval = build_dataset(cfg, "trainval")
    assert len(trainval) == 18 and torch.equal(trainval[12]["points"], build_dataset(cfg, "val")[0]["points"])
    assert a.num_parts == 16 and a.category_parts[1] == [2, 3, 4]
    two = build_dataset({**cfg, "categories": ["table", "mug"]}, "train")
    assert two.part_names == ["table/top", "table/legs", "mug/body", "mug/handle"]
    assert set(two[1]["parts"].tolist()) == {2, 3}
    with pytest.raises(ConfigError, match="unknown names"):
        build_dataset({**cfg, "categories": ["sofa"]}, "train")


# ------------------------------------------------------------------------------------------- ShapeNetPart
SYNSETS = {"Airplane": "02691156", "Bag": "02773838", "Cap": "02954340", "Car": "02958343", "Chair": "03001627",
           "Earphone": "03261776", "Guitar": "03467517", "Knife": "03624134", "Lamp": "03636649",
           "Laptop": "03642806", "Motorbike": "03790512", "Mug": "03797390", "Pistol": "03948459",
           "Rocket": "04099429", "Skateboard": "04225987", "Table": "04379243"}


def write_shapenetpart(root: Path, points: int = 40) -> dict[str, list[tuple[str, str]]]:
    """Two shapes per split in the release's layout: (category, shape id) per split."""
    rng = np.random.default_rng(0)
    (root / "train_test_split").mkdir(parents=True)
    (root / "synsetoffset2category.txt").write_text("".join(f"{c}\t{s}\n" for c, s in SYNSETS.items()))
    first = {c: sum(list(PARTS.values())[:k]) for k, c in enumerate(PARTS)}
    shapes = {"train": [("Mug", "m1"), ("Table", "t1")], "val": [("Lamp", "l1"), ("Mug", "m2")],
              "test": [("Airplane", "a1"), ("Table", "t2")]}
    for split, items in shapes.items():
        for category, shape in items:
            folder = root / SYNSETS[category]
            folder.mkdir(exist_ok=True)
            xyz = rng.normal(size=(points, 3)) * 3 + 5
            normals = rng.normal(size=(points, 3))
            part = first[category] + rng.integers(0, PARTS[category], points)
            np.savetxt(folder / f"{shape}.txt", np.column_stack([xyz, normals, part]), fmt="%.6f")
        entries = [f"shape_data/{SYNSETS[c]}/{s}" for c, s in items]
        (root / "train_test_split" / f"shuffled_{split}_file_list.json").write_text(json.dumps(entries))
    return shapes


def shapenetpart_config(tmp_path: Path, root: Path) -> Path:
    cfg = {"_base_": str(Path(__file__).resolve().parents[1] / "cfgs/shapenetpart/any2point_clip_text.yaml"),
           "dataset": {"root": str(root), "num_points": 32}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_shapenetpart_reads_its_layout_through_the_config(tmp_path: Path) -> None:
    root = tmp_path / "shapenetpart"
    shapes = write_shapenetpart(root)
    cfg = load_config(shapenetpart_config(tmp_path, root))
    train, test = build_dataset(cfg.dataset, "train"), build_dataset(cfg.dataset, "test")
    assert train.class_names == list(PARTS) and train.num_parts == 50 and len(train) == 2
    assert len(build_dataset(cfg.dataset, "trainval")) == 4
    assert [train.class_names[k] for k in train.labels()] == [c for c, _ in shapes["train"]]
    assert train.category_parts[11] == [36, 37] and train.category_parts[15] == [47, 48, 49]
    item = test[1]  # a table: parts 47-49
    assert item["points"].shape == (32, 3) and item["parts"].shape == (32,)
    assert set(item["parts"].tolist()) <= {47, 48, 49} and item["label"] == 15
    # the usual normalisation: the raw cloud is centred at its mean and fits the unit sphere
    raw = np.loadtxt(root / SYNSETS["Table"] / "t2.txt")
    xyz = raw[:, :3] - raw[:, :3].mean(0)
    xyz /= np.linalg.norm(xyz, axis=1).max()
    rows = [int(np.argmin(np.linalg.norm(xyz - p, axis=1))) for p in test.get_raw(1)[0][:, :3]]
    assert np.allclose(xyz[rows], test.get_raw(1)[0][:, :3], atol=1e-5)
    assert np.array_equal(raw[rows, 6], test.get_raw(1)[0][:, 6])
    # test points are fixed; training points are drawn again every epoch
    test.set_epoch(3)
    assert torch.equal(test[1]["points"], item["points"])
    first = train.get_raw(0)[0]
    train.set_epoch(1)
    assert not np.array_equal(train.get_raw(0)[0], first)
    # a shape with fewer points than num_points keeps them all, then repeats some
    many = build_dataset({**cfg.dataset, "num_points": 50}, "test").get_raw(0)[0]
    assert len(np.unique(many, axis=0)) == 40
    mugs = build_dataset({**cfg.dataset, "categories": ["Mug"]}, "train")
    assert len(mugs) == 1 and mugs.class_names == ["Mug"] and mugs.category_parts == [[36, 37]]


def test_shapenetpart_errors_name_the_file(tmp_path: Path) -> None:
    root = tmp_path / "shapenetpart"
    write_shapenetpart(root)
    cfg = {"type": "ShapeNetPart", "root": str(root), "num_points": 16}
    bad = root / SYNSETS["Mug"] / "m1.txt"
    bad.write_text("0 0 0 0 0 1\n")
    with pytest.raises(DataError, match=r"m1.txt: expected 7 values"):
        build_dataset(cfg, "train")[0]
    bad.write_text("0 0 0 0 0 1 47\n")
    with pytest.raises(DataError, match=r"m1.txt: part 47 .* not one of its category's parts \[36, 37\]"):
        build_dataset(cfg, "train")[0]
    with pytest.raises(DatasetNotFoundError, match="shapenetcore_partanno"):
        build_dataset({**cfg, "root": str(tmp_path / "missing")}, "train")
    (root / "train_test_split" / "shuffled_val_file_list.json").write_text("{")
    with pytest.raises(DataError, match="shuffled_val_file_list.json: not a readable JSON list"):
        build_dataset(cfg, "val")


def test_shapenetpart_parses_each_list_once_into_a_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shapes are parsed once per official list into a cache file next to the data; a second
    dataset reads no text file; a changed file has its list parsed again; ``cache: false`` reads
    the same points from the text files when items are fetched."""
    root = tmp_path / "shapenetpart"
    write_shapenetpart(root)
    cfg = {"type": "ShapeNetPart", "root": str(root), "num_points": 16}
    first = build_dataset(cfg, "trainval")
    assert sorted(p.name.split(".")[1] for p in root.glob("parsed.*.npz")) == ["train", "val"]
    parsed, read = [], shapenetpart.read_part_file
    monkeypatch.setattr(shapenetpart, "read_part_file", lambda path, parts: parsed.append(path.name) or read(path, parts))
    second = build_dataset(cfg, "trainval")
    assert parsed == []
    for i in range(len(first)):
        assert np.array_equal(first.get_raw(i)[0], second.get_raw(i)[0])
    changed = root / SYNSETS["Mug"] / "m1.txt"
    changed.write_text(changed.read_text() + "0.5 0.5 0.5 0 0 1 37\n")
    train = build_dataset({**cfg, "num_points": 41}, "train")
    assert parsed == ["m1.txt", "t1.txt"]
    assert train.starts.tolist() == [0, 41, 81]
    uncached = build_dataset({**cfg, "num_points": 41, "cache": False}, "train")
    parsed.clear()
    for i in range(len(train)):
        assert np.array_equal(uncached.get_raw(i)[0], train.get_raw(i)[0])
    assert parsed == ["m1.txt", "t1.txt"]


# -------------------------------------------------------------------------------------------------- model
def tiny_seg(source: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dict(type="Any2PointSeg", num_classes=6, num_parts=16, source=TINY_SOURCES[source],
               tokenizer=dict(type="PointPNTokenizer", k=8, recompute=False),
               tuner=dict(type="GuidedAdapter", bottleneck=4, voxel_size=0.5), levels=[1, 2], token_dim=32,
               head_widths=[32], head_dropout=0.0)
    cfg.update(overrides)
    return build_model(cfg)


def synthetic_batch(n: int = 128, batch: int = 6) -> dict:
    data = build_dataset({"type": "SyntheticParts", "num_points": n, "train_size": batch}, "train")
    return torch.utils.data.default_collate([data[i] for i in range(batch)])


@pytest.mark.parametrize("source", sorted(TINY_SOURCES))
def test_model_shapes_and_gradients_on_every_source(source: str) -> None:
    model = tiny_seg(source)
    batch = synthetic_batch()
    out = model(batch["points"], batch["label"])
    assert out.shape == (6, 128, 16) and torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out.transpose(1, 2), batch["parts"]).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    encoded = model.encode(batch["points"], [2])
    assert torch.allclose(encoded.levels[0], encoded.tokens)


def test_levels_are_checked_against_the_depth() -> None:
    with pytest.raises(ConfigError, match=r"levels \[1, 3\] must be block numbers from 1 to the source's depth 2"):
        tiny_seg("clip_text", levels=[1, 3])
    with pytest.raises(ConfigError, match="increasing"):
        tiny_seg("clip_text", levels=[2, 1])


@pytest.mark.parametrize("tuner", [dict(type="LoRA", rank=2), dict(type="PromptTuning", num_prompts=3)])
def test_model_runs_with_other_tuners(tuner: dict) -> None:
    model = tiny_seg("dinov2", tuner=tuner)
    batch = synthetic_batch(batch=2)
    assert model(batch["points"], batch["label"]).shape == (2, 128, 16)
    model.eval()
    with torch.no_grad():  # the last level is the point tokens, prompt tokens dropped
        encoded = model.encode(batch["points"], [2])
    assert encoded.levels[0].shape == encoded.tokens.shape and torch.allclose(encoded.levels[0], encoded.tokens)


def test_model_runs_on_a_3d_pretrained_source_with_point_peft() -> None:
    torch.manual_seed(0)
    model = build_model(dict(type="Any2PointSeg", num_classes=6, num_parts=16, levels=[1, 3], token_dim=16,
                             source=dict(type="PointMAESource", dim=32, depth=3, heads=2, num_groups=16, group_size=8),
                             tuner=dict(type="PointPEFT", num_prompts=4, prompt_depth=2, group_size=4)))
    batch = synthetic_batch(batch=2)
    out = model(batch["points"], batch["label"])
    assert out.shape == (2, 128, 16) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_training_steps_reduce_the_loss() -> None:
    model = tiny_seg("clip_text")
    task = build_task(build_dataset({"type": "SyntheticParts"}, "train"))
    batch = synthetic_batch(batch=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = task.loss(task.forward(model, batch, CPU), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# --------------------------------------------------------------------------------- trainer, test, voting
SEG_RUN = {"model": {"type": "Any2PointSeg", "num_classes": 2, "num_parts": 4, "source": TINY_SOURCES["clip_text"],
                     "tokenizer": {"type": "PointPNTokenizer", "k": 8, "recompute": False},
                     "tuner": {"type": "GuidedAdapter", "bottleneck": 4, "voxel_size": 0.5}, "levels": [1, 2],
                     "token_dim": 16, "head_widths": [16]},
           "dataset": {"type": "SyntheticParts", "num_points": 128, "train_size": 16, "val_size": 4, "test_size": 6,
                       "categories": ["mug", "table"],
                       "transforms": {"vote": [{"type": "RandomScale", "low": 0.9, "high": 1.1}]}},
           "scheduler": {"type": "CosineWarmup", "warmup_epochs": 0},
           "train": {"epochs": 1, "batch_size": 8, "num_workers": 0}}


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A one-epoch run of a tiny Any2PointSeg: its config file and its test instance mIoU."""
    path, m = train_once(tmp_path_factory.mktemp("seg"), "seg", SEG_RUN)
    return path, m.instance_miou


def test_trainer_test_and_voting_write_segmentation_results(seg_run: tuple[Path, float]) -> None:
    from any2point.engine.trainer import Trainer

    path, miou = seg_run
    folder = path.parent / "seg"
    record = json.loads((folder / "results.json").read_text())
    assert record["task"] == "part_segmentation" and record["metrics"]["count"] == 6
    assert record["metrics"]["instance_mIoU"] == pytest.approx(miou, abs=1e-4)
    assert set(record["per_class"]) == {"mug", "table"} and sum(record["per_class_count"].values()) == 6
    voted = evaluate_checkpoint(load_config(path), folder / "ckpt-best.pth", vote=2, results="vote.json")
    record = json.loads((folder / "vote.json").read_text())
    assert len(record["voting"]["pass_instance_mIoU"]) == 2 and voted.count == 6
    shuffled = {**SEG_RUN["dataset"], "transforms": {"vote": [{"type": "ShufflePoints"}]}}
    data = voting_dataset(shuffled, "test", 2, 0)
    with pytest.raises(ConfigError, match="keep the points in place"):
        evaluate(build_model(SEG_RUN["model"]), eval_loader(data, 6, 0, CPU), build_task(data.base), CPU, bf16=False)
    with pytest.raises(ConfigError, match="model.num_parts=5 but dataset SyntheticParts has 4"):
        Trainer(load_config(path, ["model.num_parts=5", "experiment.name=other"]))


def test_visualize_draws_true_and_predicted_parts(seg_run: tuple[Path, float], tmp_path: Path) -> None:
    from tests.test_visualize import assert_not_blank
    from tools.visualize import main

    ckpt = seg_run[0].parent / "seg" / "ckpt-best.pth"
    assert main(["--ckpt", str(ckpt), "--out", str(tmp_path), "--sample", "1"]) == 0
    names = {"per_class.png", "curves.png", "attention.png", "clusters.png", "pe_similarity.png", "parts.png"}
    assert {p.name for p in tmp_path.iterdir()} == names
    for name in names:
        assert_not_blank(tmp_path / name)


def test_predict_labels_the_points_of_a_file_with_the_category_parts(seg_run: tuple[Path, float], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """tools/predict.py on a segmentation checkpoint: the category is required and checked; each
    point of the prepared cloud gets one of that category's parts, the same as the model's own
    restricted prediction; the file lists the points with their parts."""
    from any2point.engine.loading import load_model
    from tools.predict import Preparer, main

    ckpt = str(seg_run[0].parent / "seg" / "ckpt-best.pth")
    cloud = tmp_path / "cloud.npy"
    np.save(cloud, np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32))
    assert main(["--ckpt", ckpt, str(cloud)]) == 2
    assert "give the shapes' category with --category (one of mug, table)" in capsys.readouterr().err
    assert main(["--ckpt", ckpt, str(cloud), "--category", "lamp"]) == 2
    assert "'lamp' is not one of the checkpoint's categories: mug, table" in capsys.readouterr().err
    out = tmp_path / "parts"
    torch.manual_seed(0)  # the tiny source is random (pretrained: null): build it the same way twice
    assert main(["--ckpt", ckpt, str(cloud), "--category", "table", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cloud.npy: table: points per part: table/" in printed and str(out / "cloud.parts.txt") in printed
    rows = np.loadtxt(out / "cloud.parts.txt")
    torch.manual_seed(0)
    model, cfg, state = load_model(ckpt)
    table_parts = state["category_parts"][1]
    assert rows.shape == (128, 4) and set(rows[:, 3].astype(int)) <= set(table_parts)
    points = Preparer(cfg, None, True, 0)(cloud, 0)
    assert np.allclose(rows[:, :3], points.numpy(), atol=1e-6)
    with torch.no_grad():
        logits = model(points[None], torch.tensor([1]))
    mask = torch.zeros(1, logits.shape[-1], dtype=torch.bool)
    mask[0, table_parts] = True
    expected = logits.masked_fill(~mask, float("-inf")).argmax(-1)[0]
    assert np.array_equal(rows[:, 3].astype(int), expected.numpy())
    assert main(["--ckpt", ckpt, str(cloud), "--category", "mug",
                 "--json", "--out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out)["results"][0]
    assert record["category"] == "mug" and sum(record["parts"].values()) == 128
