"""ScanObjectNN (Uy et al., ICCV 2019): 15 classes of real indoor scans, from the authors' h5 files.

Layout (the ``h5_files`` of the release; ``root`` may also be the ``h5_files`` folder's parent):
``root/main_split/{training,test}_objectdataset[_SUFFIX].h5`` (objects with background) and
``root/main_split_nobg/...`` (object points only). Each file holds ``data`` (S, 2048, 3) float32 and
``label`` (S,) in ``[0, 15)``. The paper reports OBJ_BG, OBJ_ONLY and PB_T50_RS (the hardest).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from any2point.datasets.io import (InMemoryDataset, check_clouds, check_labels, file_signature, read_h5,
                                   require_path)
from any2point.registry import DATASETS, ConfigError, Fraction, Seed

CLASSES = ("bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table", "bed", "pillow",
           "sink", "sofa", "toilet")
"""The 15 class names in label order."""

VARIANTS = {
    "OBJ_BG": ("main_split", "objectdataset"),
    "OBJ_ONLY": ("main_split_nobg", "objectdataset"),
    "PB_T25": ("main_split", "objectdataset_augmented25_norot"),
    "PB_T25_R": ("main_split", "objectdataset_augmented25rot"),
    "PB_T50_R": ("main_split", "objectdataset_augmentedrot"),
    "PB_T50_RS": ("main_split", "objectdataset_augmentedrot_scale75"),
}
"""Variant -> (folder, file-name suffix)."""

HINT = ("Download h5_files.zip from the ScanObjectNN authors (https://hkust-vgd.github.io/scanobjectnn/, "
        "after agreeing to its terms of use), unzip it and move its main_split and main_split_nobg folders "
        "into data/ScanObjectNN/, or set dataset.root=PATH to the folder that holds them.")


def h5_path(root: Path, variant: str, official_split: str) -> Path:
    """The h5 file of ``variant`` for the official ``train`` or ``test`` set under ``root``."""
    folder, suffix = VARIANTS[variant]
    if not (root / folder).is_dir() and (root / "h5_files" / folder).is_dir():
        root = root / "h5_files"
    require_path(root / folder, f"(ScanObjectNN {variant}) {HINT}", folder=True)
    prefix = "training" if official_split == "train" else "test"
    return require_path(root / folder / f"{prefix}_{suffix}.h5", f"(ScanObjectNN {variant}, {official_split} set) {HINT}")


@DATASETS.register()
class ScanObjectNN(InMemoryDataset):
    """ScanObjectNN ``variant`` read from its h5 files (see the module docstring).

    ``val`` is held out of the official training set. In the PB_* variants that set holds several
    perturbed copies of each scanned object, which the files do not link, so copies of a training
    object can land in ``val`` and make it optimistic; ``test`` is a separate set of objects.

    Args:
        split: ``train``, ``val``, ``trainval`` or ``test``.
        root: folder holding ``main_split/`` and ``main_split_nobg/`` (or ``h5_files/`` with them).
        variant: ``OBJ_BG``, ``OBJ_ONLY``, ``PB_T25``, ``PB_T25_R``, ``PB_T50_R`` or ``PB_T50_RS``.
        transforms, seed, val_fraction, fps_cache: see :class:`InMemoryDataset`.
    """

    class_names = list(CLASSES)

    def __init__(self, split: str, root: str = "data/ScanObjectNN",
                 variant: Literal["OBJ_BG", "OBJ_ONLY", "PB_T25", "PB_T25_R", "PB_T50_R", "PB_T50_RS"] = "PB_T50_RS",
                 transforms: Optional[dict] = None, seed: Seed = 0, val_fraction: Fraction = 0.1,
                 fps_cache: bool = True) -> None:
        super().__init__(split, transforms, seed, val_fraction, fps_cache)
        if variant not in VARIANTS:
            raise ConfigError(f"ScanObjectNN.variant must be one of {', '.join(VARIANTS)}, got '{variant}'")
        path = h5_path(Path(root), variant, self.official_split)
        arrays = read_h5(path, ("data", "label"))
        points = check_clouds(arrays["data"], str(path))
        labels = check_labels(arrays["label"], len(points), len(CLASSES), str(path))
        self.variant, self.source = variant, str(path)
        self.finish(points, labels, [file_signature(path, path.parent)], path.with_suffix(""))
