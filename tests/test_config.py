"""Config loading: _base_ inheritance, dotted overrides, validation errors naming key and file."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from any2point.config import load_config
from any2point.provenance import origin_of
from any2point.registry import MODELS, Registry, build_from_cfg
from any2point.errors import ConfigError

BASE = {
    "model": {"type": "PointNet", "num_classes": 4, "widths": [8, 16]},
    "dataset": {"type": "SyntheticShapes", "train_size": 40, "val_size": 8, "test_size": 8},
    "train": {"epochs": 3, "batch_size": 8},
}


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_base_inheritance_relative_paths_and_lists(tmp_path: Path) -> None:
    write(tmp_path / "_base_/a.yaml", BASE)
    write(tmp_path / "_base_/b.yaml", {"train": {"epochs": 7, "grad_clip": 1.0}})
    leaf = write(tmp_path / "exp/leaf.yaml", {"_base_": ["../_base_/a.yaml", "../_base_/b.yaml"],
                                              "train": {"batch_size": 4}, "model": {"dropout": 0.1}})
    cfg = load_config(leaf)
    assert cfg.train.epochs == 7            # from b, which merges after a
    assert cfg.train.grad_clip == 1.0
    assert cfg.train.batch_size == 4        # leaf wins
    assert cfg.model.widths == [8, 16] and cfg.model.dropout == 0.1
    assert cfg.optimizer.type == "AdamW"    # schema default
    assert origin_of(cfg.train, "epochs").endswith("b.yaml")
    assert origin_of(cfg.train, "batch_size").endswith("leaf.yaml")


def test_single_string_base_and_chain(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", BASE)
    write(tmp_path / "b.yaml", {"_base_": "a.yaml", "train": {"epochs": 5}})
    cfg = load_config(write(tmp_path / "c.yaml", {"_base_": "b.yaml", "train": {"num_workers": 0}}))
    assert (cfg.train.epochs, cfg.train.num_workers, cfg.train.batch_size) == (5, 0, 8)


def test_a_new_type_replaces_the_inherited_mapping(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", {**BASE, "optimizer": {"type": "SGD", "momentum": 0.8}})
    cfg = load_config(write(tmp_path / "b.yaml", {"_base_": "a.yaml", "optimizer": {"type": "AdamW", "lr": 0.1}}))
    assert cfg.optimizer.type == "AdamW" and cfg.optimizer.lr == 0.1
    assert "momentum" not in cfg.optimizer


def test_overrides(tmp_path: Path) -> None:
    path = write(tmp_path / "a.yaml", BASE)
    cfg = load_config(path, ["optimizer.lr=1e-3", "train.epochs=2", "model.widths=[4, 4]", "+model.dropout=0.0"])
    assert cfg.optimizer.lr == pytest.approx(1e-3)
    assert cfg.train.epochs == 2
    assert list(cfg.model.widths) == [4, 4]
    assert cfg.model.dropout == 0.0
    assert origin_of(cfg.optimizer, "lr") == "the command line"


def test_override_of_unknown_key_needs_plus(tmp_path: Path) -> None:
    path = write(tmp_path / "a.yaml", BASE)
    with pytest.raises(ConfigError, match="model.dropuot"):
        load_config(path, ["model.dropuot=0.1"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(path, ["train.epochs"])


def test_misspelt_key_names_key_and_file(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", BASE)
    leaf = write(tmp_path / "leaf.yaml", {"_base_": "a.yaml", "model": {"num_clases": 3}})
    with pytest.raises(ConfigError) as e:
        load_config(leaf)
    assert "num_clases" in str(e.value) and str(leaf.resolve()) in str(e.value)


@pytest.mark.parametrize("section,data,needle", [
    ("train", {"train": {"epoch": 3}}, "train.epoch"),
    ("experiment", {"experiment": {"sed": 1}}, "experiment.sed"),
    ("top", {"trian": {}}, "trian"),
    ("dataset", {"dataset": {"train_sise": 3}}, "train_sise"),
    ("optimizer", {"optimizer": {"lr": 1e-3, "momentun": 0.9}}, "momentun"),
])
def test_unknown_keys_in_every_section(tmp_path: Path, section: str, data: dict, needle: str) -> None:
    write(tmp_path / "a.yaml", BASE)
    leaf = write(tmp_path / "leaf.yaml", {"_base_": "a.yaml", **data})
    with pytest.raises(ConfigError, match=needle) as e:
        load_config(leaf)
    assert "leaf.yaml" in str(e.value)


def test_wrong_types_and_values(tmp_path: Path) -> None:
    path = write(tmp_path / "a.yaml", BASE)
    with pytest.raises(ConfigError, match="train.epochs|'epochs'"):
        load_config(path, ["train.epochs=three"])
    with pytest.raises(ConfigError, match="num_classes"):
        load_config(path, ["model.num_classes=2.5"])
    with pytest.raises(ConfigError, match="protocol"):
        load_config(path, ["train.protocol=cheating"])
    with pytest.raises(ConfigError, match="norm"):
        load_config(path, ["+model.norm=layer"])


def test_missing_required(tmp_path: Path) -> None:
    no_model = {k: v for k, v in BASE.items() if k != "model"}
    with pytest.raises(ConfigError, match="missing required key 'model'"):
        load_config(write(tmp_path / "a.yaml", no_model))
    no_classes = {**BASE, "model": {"type": "PointNet"}}
    with pytest.raises(ConfigError, match="missing required key 'num_classes'"):
        load_config(write(tmp_path / "b.yaml", no_classes))


def test_unknown_type_lists_registered(tmp_path: Path) -> None:
    path = write(tmp_path / "a.yaml", {**BASE, "model": {"type": "PointNot", "num_classes": 3}})
    with pytest.raises(ConfigError, match="PointNet"):
        load_config(path)


def test_missing_file_and_cycle(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(write(tmp_path / "a.yaml", {"_base_": "nope.yaml", **BASE}))
    write(tmp_path / "x.yaml", {"_base_": "y.yaml"})
    write(tmp_path / "y.yaml", {"_base_": "x.yaml"})
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "x.yaml")


def test_registry_build_and_errors() -> None:
    reg = Registry("thing")

    @reg.register()
    class Thing:
        def __init__(self, size: int, name: str = "a") -> None:
            self.size, self.name = size, name

    built = build_from_cfg({"type": "Thing", "size": 3}, reg)
    assert (built.size, built.name) == (3, "a")
    with pytest.raises(ConfigError, match="unknown thing type 'Thng'.*Thing"):
        build_from_cfg({"type": "Thng"}, reg)
    with pytest.raises(ConfigError, match="unknown key 'sise'"):
        build_from_cfg({"type": "Thing", "sise": 3}, reg)
    with pytest.raises(ConfigError, match="wrong type for key 'size'"):
        build_from_cfg({"type": "Thing", "size": "3"}, reg)
    with pytest.raises(KeyError, match="already registered"):
        reg.register(type("Other", (), {}), name="Thing")
    assert "PointNet" in MODELS


def test_misspelt_mapping_key_names_key_and_file(tmp_path: Path) -> None:
    """A misspelt key whose value is a mapping (only its leaves have a recorded origin) is reported,
    with the file of its leaves' parent, instead of searching for an origin forever."""
    write(tmp_path / "a.yaml", BASE)
    leaf = write(tmp_path / "leaf.yaml", {"_base_": "a.yaml", "model": {"adaptr": {"type": "X", "width": 3}}})
    with pytest.raises(ConfigError, match="adaptr"):
        load_config(leaf)


ROOT = Path(__file__).resolve().parents[1]
TINY_ANY2POINT = ["model.source.width=32", "model.source.depth=2"]


def test_experiment_name_defaults_to_the_path_under_cfgs(tmp_path: Path) -> None:
    assert load_config(ROOT / "cfgs/paper/table2/lora_dinov2.yaml").experiment.name == "paper_table2_lora_dinov2"
    assert load_config(ROOT / "cfgs/demo.yaml").experiment.name == "demo"
    outside = write(tmp_path / "mine" / "run_a.yaml", BASE)
    assert load_config(outside).experiment.name == "run_a"
    nested = write(tmp_path / "cfgs" / "sub" / "run_b.yaml", BASE)
    assert load_config(nested).experiment.name == "sub_run_b"
    named = write(tmp_path / "cfgs" / "run_c.yaml", {**BASE, "experiment": {"name": "mine"}})
    assert load_config(named).experiment.name == "mine"
    assert load_config(nested, ["experiment.name=other"]).experiment.name == "other"


def test_an_argument_absent_from_the_yaml_is_overridden_without_plus() -> None:
    path = ROOT / "cfgs/scanobjectnn/any2point_clip_text.yaml"
    assert "dense_cell_norm" not in load_config(path).model.tuner
    cfg = load_config(path, ["model.tuner.dense_cell_norm=true", "model.head_dropout=0.3"])
    assert cfg.model.tuner.dense_cell_norm is True and cfg.model.head_dropout == 0.3
    with pytest.raises(ConfigError, match=r"unknown key 'model.tuner.dense_cel_norm'.*GuidedAdapter.*dense_cell_norm"):
        load_config(path, ["model.tuner.dense_cel_norm=true"])
    with pytest.raises(ConfigError, match=r"unknown key 'model.sauce.pretrained'.*'\+model.sauce.pretrained"):
        load_config(path, ["model.sauce.pretrained=null"])


def test_a_key_of_the_wrong_kind_names_the_kind_and_its_types() -> None:
    path = ROOT / "cfgs/scanobjectnn/any2point_clip_text.yaml"
    with pytest.raises(ConfigError, match=r"unknown tuner type 'CLIPTextSource' at 'model.tuner'.*registered tuner "
                                          r"types: .*GuidedAdapter.*LoRA"):
        load_config(path, ["model.tuner={type: CLIPTextSource}"])
    with pytest.raises(ConfigError, match=r"unknown source type 'GuidedAdapter' at 'model.source'"):
        load_config(path, ["model.source={type: GuidedAdapter}"])
    with pytest.raises(ConfigError, match=r"wrong type for key 'tokenizer'.*got int 16, expected Optional\[dict\]"):
        load_config(path, ["model.tokenizer=16"])
    with pytest.raises(ConfigError, match=r"'model.tokenizer' must be a tokenizer mapping with a 'type' key; "
                                          r"registered tokenizer types: PointPNTokenizer"):
        load_config(path, ["model.tokenizer={k: 16}"])
    with pytest.raises(ConfigError, match=r"unknown transform type 'PointNet' at 'dataset.transforms.train\[0\]'"):
        load_config(path, ["dataset.transforms.train=[{type: PointNet}]"])
