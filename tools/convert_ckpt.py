"""Convert a released Any2Point or Point-PEFT checkpoint into one of ours:
``python tools/convert_ckpt.py --official FILE.pth --run RUN --out OUT.pth``.

``RUN`` names one of the six released Any2Point runs (``any2point.convert.any2point.RUNS``), whose preset
``cfgs/official/RUN.yaml`` rebuilds the official model exactly, or Point-PEFT's released Point-MAE
run ``point_peft_scanobjectnn_point_mae`` (``ckpt-best.pth``; ``any2point.convert.point_peft.POINT_PEFT_RUNS``,
preset ``cfgs/point_peft/scanobjectnn_point_mae.yaml``). The preset is stored in ``OUT.pth``, so
``python main.py --test --ckpt OUT.pth`` evaluates it with the official test protocol. Every
released tensor is mapped or dropped for a stated reason (printed); an unknown key, a missing one or
a shape mismatch is an error naming the keys. The released file also carries the frozen source's
weights: they are compared with the source file the preset names (or ``--source``) when it is
present, and a difference is a warning.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

from any2point.errors import run_cli

ROOT = Path(__file__).resolve().parent.parent
RUN_NAMES = ("scanobjectnn_clip_text", "scanobjectnn_dinov2", "scanobjectnn_imagebind_audio",
             "modelnet40_clip_text", "modelnet40_dinov2", "modelnet40_imagebind_audio",
             "point_peft_scanobjectnn_point_mae")


def _plain(value: Any) -> Any:
    """Numbers of the released file's bookkeeping as plain Python (tensors, NumPy scalars)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        return value.item()
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def convert(official: str, run_name: str, out: str, source_file: Optional[str] = None,
            verbose: bool = False, config: Optional[str] = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Convert ``official`` for ``run_name`` into ``out`` under the run's preset (or ``config``, with
    ``overrides``); print the report; return the checkpoint."""
    import torch
    from omegaconf import OmegaConf

    from any2point import build_model, load_config
    from any2point.engine.checkpoint import save_atomic
    from any2point.convert.any2point import RUNS, compare_frozen, convert_state, model_keys, read_released
    from any2point.convert.point_peft import POINT_PEFT_RUNS, point_peft_mapper
    from any2point.registry import SOURCES, build_from_cfg

    point_peft = run_name in POINT_PEFT_RUNS
    run = POINT_PEFT_RUNS[run_name] if point_peft else RUNS[run_name]
    state, meta = read_released(official, run)
    cfg = load_config(config if config is not None else ROOT / run.preset, overrides)
    source_cfg = cfg.model.source
    source_file = source_file if source_file is not None else source_cfg.get("pretrained")
    source_cfg.pretrained = None
    with torch.device("meta"):
        model = build_model(cfg.model)
    if point_peft:
        expected, frozen_expected, absent = model_keys(model, frozen_prefix="source.")
        conversion = convert_state(state, run.layout, expected, frozen_expected, frozen_allowed_missing=absent,
                                   mapper=point_peft_mapper(model.tuner.prompt_depth))
    else:
        expected, frozen_expected, absent = model_keys(model)
        imagebind = source_cfg.type == "ImageBindAudioSource"
        conversion = convert_state(state, run.layout, expected, frozen_expected, imagebind, absent)

    identity = None
    if source_file is not None and Path(source_file).exists():
        source_cfg.pretrained = str(source_file)
        source = build_from_cfg(OmegaConf.to_container(source_cfg, resolve=True), SOURCES)
        differ = compare_frozen(conversion.frozen, source.state_dict())
        identity = {**source.identity(), "name": model.source.name}
        frozen_note = (f"equal to {source_file}" if not differ else
                       f"WARNING: {len(differ)} of {len(conversion.frozen)} differ from {source_file}")
        if differ:
            print(f"warning: the released file's frozen source weights differ from {source_file}: "
                  f"{', '.join(differ[:8])}{' ...' if len(differ) > 8 else ''}; evaluation uses the source file's",
                  file=sys.stderr)
    else:
        source_cfg.pretrained = str(source_file) if source_file is not None else None
        frozen_note = ("not compared: no source file given" if source_file is None else
                       f"not compared: the source file {source_file} is not here (main.py --test needs it, and "
                       f"will not check the checkpoint's source identity)")

    ckpt = {"model": conversion.model, "config": OmegaConf.to_container(cfg, resolve=True), "source": identity,
            "epoch": int(_plain(meta.get("epoch", -1))), "protocol": "paper",
            "official": {"run": run.name, "file": str(official), "reported_oa": run.reported_oa,
                         **{k: _plain(meta[k]) for k in ("best_val", "best_metrics", "metrics") if k in meta}}}
    save_atomic(ckpt, out)

    groups: Counter = Counter(".".join(ours.split(".")[:2]) if ours.startswith("source.") else ours.split(".")[0]
                              for _, ours in conversion.mapped if ours not in conversion.frozen)
    print(f"{official} ({run.layout} layout, run {run.name}): {len(state)} tensors")
    print(f"mapped {sum(groups.values())} into {len(conversion.model)} of our tensors: "
          + ", ".join(f"{name} {count}" for name, count in sorted(groups.items())))
    if run.layout == "pointmae":
        print("  head.0.weight: column halves swapped (the released head reads [cls, max], ours [max, cls])")
    reasons: dict[str, list[str]] = defaultdict(list)
    for key, reason in conversion.dropped:
        reasons[reason].append(key)
    reasons[f"frozen source weight (loaded from the source file instead): {frozen_note}"] = [
        key for key, ours in conversion.mapped if ours in conversion.frozen]
    dropped_meta = sorted(meta)
    print(f"dropped {sum(len(v) for v in reasons.values())} tensors and the entries {dropped_meta} "
          f"(training state: optimizer, schedule, epoch, accuracies):")
    for reason, keys in reasons.items():
        print(f"  {len(keys):4d}  {reason} (e.g. {keys[0]})")
    if verbose:
        for key, ours in conversion.mapped:
            print(f"  {key} -> {ours}")
        for reason, keys in reasons.items():
            for key in keys:
                print(f"  {key} dropped: {reason}")
    print(f"wrote {out}: evaluate with python main.py --test --ckpt {out} (the authors report "
          f"{run.reported_oa}% overall accuracy)")
    return ckpt


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, help="the released checkpoint (.pth)")
    parser.add_argument("--run", required=True, choices=RUN_NAMES, help="which released run it is")
    parser.add_argument("--out", required=True, help="where to write our checkpoint")
    parser.add_argument("--source", help="the source's weight file to compare with and to record in the config "
                                         "(default: the preset's model.source.pretrained)")
    parser.add_argument("--config", help="a config to store instead of the run's preset, e.g. a copy with one "
                                         "deviation switched off (its model must take the released tensors)")
    parser.add_argument("--verbose", action="store_true", help="list every mapped and dropped key")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. model.pe_injection=once")
    args = parser.parse_args(argv)
    return run_cli(lambda: convert(args.official, args.run, args.out, args.source, args.verbose, args.config,
                                   args.overrides) and None, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
