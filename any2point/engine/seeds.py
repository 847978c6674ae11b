"""The random streams of a training run and the seed of each.

A run draws from four independent streams:

* ``init``: the model's initial weights (the global generators while the model is built; a checkpoint's
  model is rebuilt with it too, so a frozen randomly initialised source is the one it trained with);
* ``order``: the order of the training items in every epoch (:class:`~any2point.engine.distributed.EpochSampler`);
* ``augment``: the per-item augmentations (:meth:`~any2point.datasets.base.PointDataset.item_rng`) and
  the global generators of the data-loader workers;
* ``dropout``: dropout, drop-path and every other draw from the global generators during training.

``experiment.seed`` drives all four: each stream's seed is derived from ``(seed, stream)``, so two
seeds of one config differ in every stream (and in none they should not: ``dataset.seed``, which
selects the data itself, stays). A config pins a stream on purpose with ``experiment.<stream>_seed``
(e.g. ``augment_seed: 0`` gives every seed the same augmentations); the pinned value is then used as
it is, whatever ``experiment.seed``. ``results.json`` records every seed of the run.
"""
from __future__ import annotations

import random
import zlib
from typing import Any, Mapping

import numpy as np
import torch

STREAMS = ("init", "order", "augment", "dropout")


def derive_seed(*entropy: int) -> int:
    """A 32-bit seed that is a pure function of the non-negative integers ``entropy``; distinct
    tuples give statistically independent seeds (NumPy's ``SeedSequence`` hashing)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def stream_seed(seed: int, stream: str) -> int:
    """The seed of ``stream`` derived from the experiment's ``seed`` (the stream's name is hashed
    into the entropy, so adding a stream never changes the others)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream '{stream}'; streams: {', '.join(STREAMS)}")
    return derive_seed(seed, zlib.crc32(stream.encode()))


def run_seeds(experiment: Mapping[str, Any]) -> dict[str, Any]:
    """Every seed of a run from its ``experiment`` section: ``{"experiment": seed, "init": ...,
    "order": ..., "augment": ..., "dropout": ..., "pinned": [streams set by <stream>_seed]}``.

    Keys missing from ``experiment`` (a config written before a pin existed) count as unpinned.
    """
    seed = experiment.get("seed", 0)
    seeds: dict[str, Any] = {"experiment": seed}
    pinned = []
    for stream in STREAMS:
        value = experiment.get(f"{stream}_seed")
        if value is None:
            value = stream_seed(seed, stream)
        else:
            pinned.append(stream)
        seeds[stream] = int(value)
    seeds["pinned"] = pinned
    return seeds


def seed_globals(seed: int) -> None:
    """Seed the global generators of Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def describe_seeds(seeds: Mapping[str, Any]) -> str:
    """One log line's worth: ``experiment 0: init 123, order 456, augment 7 (pinned), ...``."""
    streams = ", ".join(f"{s} {seeds[s]}" + (" (pinned)" if s in seeds["pinned"] else "") for s in STREAMS)
    dataset = f"; dataset.seed {seeds['dataset']}" if "dataset" in seeds else ""
    return f"experiment {seeds['experiment']}: {streams}{dataset}"
