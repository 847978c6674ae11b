"""Convert a released Any2Point checkpoint into one of ours:
``python tools/convert_ckpt.py --official FILE.pth --run RUN --out OUT.pth``.

``RUN`` names one of the six released runs (``any2point.official.RUNS``); its preset
``cfgs/official/RUN.yaml`` rebuilds the official model exactly and is stored in ``OUT.pth``, so
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
             "modelnet40_clip_text", "modelnet40_dinov2", "modelnet40_imagebind_audio")


def _plain(value: Any) -> Any:
    """Numbers of the released file's bookkeeping as plain Python (tensors, NumPy scalars)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        return value.item()
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def convert(official: str, run_name: str, out: str, source_file: Optional[str] = None,
            verbose: bool = False) -> dict[str, Any]:
    """Convert ``official`` for ``run_name`` into ``out``; print the report; return the checkpoint."""
    import torch
    from omegaconf import OmegaConf

    from any2point import build_model, load_config
    from any2point.engine.checkpoint import frozen_prefixes, save_atomic
    from any2point.official import RUNS, compare_frozen, convert_state, read_released
    from any2point.registry import MODELS, build_from_cfg

    run = RUNS[run_name]
    state, meta = read_released(official, run)
    cfg = load_config(ROOT / run.preset)
    source_cfg = cfg.model.source
    source_file = source_file if source_file is not None else source_cfg.get("pretrained")
    source_cfg.pretrained = None
    with torch.device("meta"):
        model = build_model(cfg.model)
    frozen = tuple(p + "." for p in frozen_prefixes(model))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    expected = {k: s for k, s in shapes.items() if not k.startswith(frozen)}
    frozen_expected = {k: s for k, s in shapes.items() if k.startswith("source.blocks.")}
    imagebind = source_cfg.type == "ImageBindAudioSource"
    allowed = {k: "ImageBind's bias key / value: not in the released file (the released code's attention has "
                  "none, deviation 8); unused with official_plain_qkv"
               for k in frozen_expected if imagebind and k.endswith(("attn.bias_k", "attn.bias_v"))}
    conversion = convert_state(state, run.layout, expected, frozen_expected, imagebind, allowed)

    identity = None
    if source_file is not None and Path(source_file).exists():
        source_cfg.pretrained = str(source_file)
        source = build_from_cfg(OmegaConf.to_container(source_cfg, resolve=True), MODELS)
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
        frozen_note = (f"not compared: the source file {source_file} is not here (main.py --test needs it; "
                       f"it will not check the checkpoint's source identity)")

    ckpt = {"model": conversion.model, "config": OmegaConf.to_container(cfg, resolve=True), "source": identity,
            "epoch": int(_plain(meta.get("epoch", -1))), "protocol": "paper",
            "official": {"run": run.name, "file": str(official), "reported_oa": run.reported_oa,
                         **{k: _plain(meta[k]) for k in ("best_val", "best_metrics", "metrics") if k in meta}}}
    save_atomic(ckpt, out)

    groups: Counter = Counter(ours.split(".")[0] if not ours.startswith("source.norm") else "source.norm"
                              for _, ours in conversion.mapped if not ours.startswith("source.blocks."))
    print(f"{official} ({run.layout} layout, run {run.name}): {len(state)} tensors")
    print(f"mapped {sum(groups.values())} into {len(conversion.model)} of our tensors: "
          + ", ".join(f"{name} {count}" for name, count in sorted(groups.items())))
    if run.layout == "pointmae":
        print("  head.0.weight: column halves swapped (the released head reads [cls, max], ours [max, cls])")
    reasons: dict[str, list[str]] = defaultdict(list)
    for key, reason in conversion.dropped:
        reasons[reason].append(key)
    reasons[f"frozen source weight (loaded from the source file instead): {frozen_note}"] = [
        key for key, ours in conversion.mapped if ours.startswith("source.blocks.")]
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
    parser.add_argument("--verbose", action="store_true", help="list every mapped and dropped key")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    args = parser.parse_args(argv)
    return run_cli(lambda: convert(args.official, args.run, args.out, args.source, args.verbose) and None,
                   debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
