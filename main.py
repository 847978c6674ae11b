"""Train or evaluate a model from a YAML config.

    python main.py --config cfgs/demo.yaml [key=value ...]          # train
    python main.py --config cfgs/demo.yaml --resume                 # continue a killed run
    python main.py --test --ckpt experiments/demo/ckpt-best.pth     # test a checkpoint (results.json)
    python main.py --test --ckpt ... --vote 10                      # test with 10-pass voting
    torchrun --nproc_per_node=N main.py --config ...                # several GPUs (or CPU processes)
"""
from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf

from any2point.config import load_config, validate
from any2point.datasets.io import DataError
from any2point.engine import checkpoint, distributed
from any2point.engine.evaluate import RESULTS, evaluate_checkpoint
from any2point.engine.trainer import Trainer
from any2point.registry import ConfigError


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (optional with --test: the checkpoint's own config is used)")
    p.add_argument("--test", action="store_true", help="evaluate --ckpt on the test split instead of training")
    p.add_argument("--ckpt", help="checkpoint to evaluate with --test")
    p.add_argument("--resume", action="store_true", help="continue the experiment from its ckpt-last.pth")
    p.add_argument("--vote", type=int, default=1, metavar="N",
                   help="with --test: average the logits of N passes over the test set, each with its own draw "
                        "of the training (or dataset.transforms.vote) augmentations; never used to select a model")
    p.add_argument("--vote-seed", type=int, default=0, help="seed of the voting augmentations (default 0)")
    p.add_argument("--results", default=RESULTS, metavar="NAME",
                   help=f"with --test: results file written next to the checkpoint (default {RESULTS})")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (a new key: +key=value)")
    args = p.parse_args(argv)
    if args.test and not args.ckpt:
        p.error("--test needs --ckpt PATH")
    if not args.test and not args.config:
        p.error("--config is required for training")
    if not args.test and (args.vote != 1 or args.vote_seed or args.results != RESULTS):
        p.error("--vote, --vote-seed and --results go with --test (model selection never votes)")
    if args.vote < 1 or args.vote_seed < 0:
        p.error("--vote must be at least 1 and --vote-seed at least 0")
    if "/" in args.results or not args.results.endswith(".json"):
        p.error("--results is a file name ending in .json (it is written next to the checkpoint)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.config:
            cfg = load_config(args.config, args.overrides)
        else:
            cfg = OmegaConf.create(checkpoint.load(args.ckpt)["config"])
            validate(cfg)
        if args.test:
            evaluate_checkpoint(cfg, args.ckpt, args.vote, args.vote_seed, args.results)
        else:
            Trainer(cfg, resume=args.resume).fit()
    except (ConfigError, DataError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch is in ckpt-last.pth; continue with --resume", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
