"""Train or evaluate a model from a YAML config.

    python main.py --config cfgs/demo.yaml [key=value ...]          # train
    python main.py --config cfgs/demo.yaml --resume                 # continue a killed run
    python main.py --test --ckpt experiments/demo/ckpt-best.pth     # test a checkpoint (results.json)
    python main.py --test --ckpt ... --vote 10                      # test with 10-pass voting
    python main.py --config CFG --folds 5                           # 5-fold cross-validation (PointFolder)
    torchrun --nproc_per_node=N main.py --config ...                # several GPUs (or CPU processes)

A mistake (a config key, a file, a flag) ends with one line "error: ..." and exit code 2; --debug
or ANY2POINT_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import argparse
import sys

from any2point.errors import run_cli
from any2point.registry import MAX_SEED
from any2point.utils.cpu_memory import restart_without_thread_cache


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (optional with --test: the checkpoint's own config is used)")
    p.add_argument("--test", action="store_true", help="evaluate --ckpt on the test split instead of training")
    p.add_argument("--ckpt", help="checkpoint to evaluate with --test")
    p.add_argument("--resume", action="store_true", help="continue the experiment from its ckpt-last.pth")
    p.add_argument("--resume-from", metavar="PATH",
                   help="continue the experiment from this checkpoint instead (e.g. its ckpt-best.pth)")
    p.add_argument("--overwrite", action="store_true",
                   help="empty the experiment folder first if it holds anything (an earlier run is lost)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue under a config that differs from the checkpoint's (the "
                        "differences are logged and recorded in config.yaml); with --test: test a checkpoint "
                        "with a model config that differs from its own (a warning names the keys)")
    p.add_argument("--ignore-source-mismatch", action="store_true",
                   help="use a checkpoint with other source weights than it was trained with (a warning)")
    p.add_argument("--folds", type=int, metavar="K",
                   help="K-fold cross-validation on a PointFolder dataset: K runs in the sub-folders fold0.. of the "
                        "experiment, every file tested once; cv_results.json holds the mean ± std over the folds and "
                        "the pooled accuracy")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    p.add_argument("--vote", type=int, default=1, metavar="N",
                   help="with --test: average the logits of N passes over the test set, each with its own draw "
                        "of the training (or dataset.transforms.vote) augmentations; never used to select a model")
    p.add_argument("--vote-seed", type=int, default=0, help="seed of the voting augmentations (default 0)")
    p.add_argument("--results", default="results.json", metavar="NAME",
                   help="with --test: results file written next to the checkpoint (default results.json)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (a new key: +key=value)")
    args = p.parse_args(argv)
    resuming = args.resume or args.resume_from is not None
    if args.test and not args.ckpt:
        p.error("--test needs --ckpt PATH")
    if args.ckpt and not args.test:
        p.error("--ckpt is only read with --test; to continue training use --resume or --resume-from PATH")
    if args.test and (resuming or args.overwrite):
        p.error("--test evaluates a checkpoint; --resume, --resume-from and --overwrite are training flags")
    if not args.test and not args.config:
        p.error("--config is required for training")
    if not args.test and (args.vote != 1 or args.vote_seed or args.results != "results.json"):
        p.error("--vote, --vote-seed and --results go with --test (model selection never votes)")
    if args.vote < 1 or not 0 <= args.vote_seed <= MAX_SEED:
        p.error(f"--vote must be at least 1 and --vote-seed in [0, {MAX_SEED}]")
    if "/" in args.results or not args.results.endswith(".json"):
        p.error("--results is a file name ending in .json (it is written next to the checkpoint)")
    if resuming and args.overwrite:
        p.error("--overwrite empties the experiment folder, so there is nothing left to --resume")
    if args.folds is not None and (args.test or args.resume_from is not None):
        p.error("--folds trains K runs; it goes with --config (and --resume, --overwrite), not --test or --resume-from")
    if args.folds is not None and args.folds < 2:
        p.error("--folds must be at least 2")
    if args.allow_config_change and not (resuming or args.test):
        p.error("--allow-config-change only applies with --resume, --resume-from or --test")
    return args


def run(args: argparse.Namespace) -> None:
    """Load the config (validated before anything is built or written), then train or evaluate."""
    from any2point.config import config_from_dict, load_config
    from any2point.engine import checkpoint, distributed
    from any2point.engine.cross_validation import cross_validate
    from any2point.engine.evaluate import evaluate_checkpoint
    from any2point.engine.trainer import Trainer

    try:
        if args.config:
            cfg = load_config(args.config, args.overrides)
        else:
            cfg = config_from_dict(checkpoint.load(args.ckpt)["config"], args.overrides)
        if args.folds is not None:
            cross_validate(cfg, args.folds, resume=args.resume, overwrite=args.overwrite,
                           ignore_source_mismatch=args.ignore_source_mismatch)
        elif args.test:
            evaluate_checkpoint(cfg, args.ckpt, args.vote, args.vote_seed, args.results,
                                ignore_source_mismatch=args.ignore_source_mismatch,
                                allow_model_change=args.allow_config_change)
        else:
            Trainer(cfg, resume=args.resume, resume_from=args.resume_from, overwrite=args.overwrite,
                    allow_config_change=args.allow_config_change,
                    ignore_source_mismatch=args.ignore_source_mismatch).fit()
    finally:
        distributed.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run_cli(lambda: run(args), debug=args.debug)
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch is in ckpt-last.pth; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    restart_without_thread_cache()  # less heap fragmentation on the CPU (any2point/utils/cpu_memory.py)
    sys.exit(main())
