"""Count a config's model parameters: ``python tools/count_params.py --config CFG [key=value ...]``.

Prints one JSON object ``{"total", "trainable", "trainable_without_head"}``. The model is built on
the ``meta`` device at random init (the source's ``pretrained`` is set to null): counting needs no
weights and no memory, so this works offline, fast, and on a machine without the ``ckpts/`` files.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from any2point.errors import run_cli


def count_params(config: str, overrides: Sequence[str] = ()) -> dict[str, int]:
    """Build the model of ``config`` on the meta device at random init and count its parameters."""
    import torch

    from any2point import build_model, load_config
    from any2point.models.any2point.classifier import count_parameters

    cfg = load_config(config, overrides)
    source = cfg.model.get("source")
    if source is not None and "pretrained" in source:
        source.pretrained = None
    with torch.device("meta"):
        model = build_model(cfg.model)
    counts = count_parameters(model, getattr(model, "head", None))
    return {key: counts[key] for key in ("total", "trainable", "trainable_without_head")}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    return run_cli(lambda: print(json.dumps(count_params(args.config, args.overrides))), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
