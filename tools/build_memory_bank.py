"""Build Point-PEFT's memory bank (what the released ``cache_shape.pt`` holds) for a config.

    python tools/build_memory_bank.py --config cfgs/point_peft/scanobjectnn_point_mae.yaml [--out PATH] [key=value ...]
    python tools/build_memory_bank.py --released ckpts/cache_shape.pt --out ckpts/point_peft/bank.pt

The first form runs the config's frozen 3D-pretrained source (``model.source``, with its
``pretrained`` weights) over the dataset's training split, prepared with the *test* transforms (no
augmentation), and writes the global features ``(M, C)`` to ``--out`` (default: the config's
``model.tuner.memory_bank``). The second converts the released bank to ours. Prints one JSON line:
``{"out", "features": [M, C]}``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from any2point.errors import run_cli


def build_bank(config: str, overrides: Sequence[str] = (), out: Optional[str] = None, batch_size: int = 32,
               split: str = "train") -> dict:
    """Extract and save the bank of ``config``; returns where it went and its shape."""
    import torch
    from omegaconf import OmegaConf

    from any2point import build_dataset, load_config
    from any2point.models.point_peft.memory_bank import extract_features, save_memory_bank
    from any2point.registry import SOURCES, build_from_cfg
    from any2point.errors import ConfigError

    cfg = load_config(config, overrides)
    out = out or OmegaConf.select(cfg, "model.tuner.memory_bank")
    if out is None:
        raise ConfigError(f"{config}: no --out and no model.tuner.memory_bank to write the bank to")
    dataset_cfg = OmegaConf.to_container(cfg.dataset)
    transforms = dataset_cfg.get("transforms") or {}
    dataset_cfg["transforms"] = {**transforms, "train": transforms.get("test", [])}
    dataset = build_dataset(dataset_cfg, split=split)
    source = build_from_cfg(cfg.model.source, SOURCES)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    features = extract_features(source, (batch["points"] for batch in loader))
    save_memory_bank(features, source.identity(), out)
    return {"out": str(out), "features": list(features.shape)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file (its model.source and dataset)")
    parser.add_argument("--released", help="convert this released cache_shape.pt instead (needs --out)")
    parser.add_argument("--out", help="where to write the bank (default: the config's model.tuner.memory_bank)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--split", default="train", help="the dataset split to read (default: train)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the config")
    args = parser.parse_args(argv)
    if (args.config is None) == (args.released is None):
        parser.error("give exactly one of --config and --released")
    if args.released and not args.out:
        parser.error("--released needs --out")

    def command() -> None:
        if args.released:
            from any2point.models.point_peft.memory_bank import convert_released_bank

            features = convert_released_bank(args.released, args.out)
            print(json.dumps({"out": args.out, "features": list(features.shape)}))
        else:
            print(json.dumps(build_bank(args.config, args.overrides, args.out, args.batch_size, args.split)))

    return run_cli(command, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
