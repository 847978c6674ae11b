"""Check the code on a CUDA machine in one command and write every figure to one JSON file.

Run through ``bash scripts/gpu_check.sh [OUT.json]`` (default ``gpu_check.json``). Steps, each
with its own time limit so that the whole check ends within about 7 minutes on one H100 / H200:

1. the CUDA tests (``pytest -k cuda`` over the files that hold them);
2. ``scripts/bench_train.py`` at batch 32 in bf16 (``--amp``) for the three paper configs, eager;
3. the same with ``--compile``;
4. the CPU demo config (``cfgs/demo.yaml``) trained and tested on CUDA end to end;
5. where two GPUs exist, the demo for one epoch under ``torchrun --nproc_per_node=2`` (DDP, NCCL).

A step that fails or runs out of time is recorded with its exit status and the tail of its output,
and the next step runs. Without CUDA the check prints one line and exits with status 2.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = ("any2point_clip_text", "any2point_dinov2", "any2point_imagebind_audio")
TOTAL_S = 430  # every step's limit is cut to what is left of this
LIMITS_S = {"tests": 90, "bench": 40, "bench_compile": 60, "demo": 80, "ddp": 60}
NO_CUDA_EXIT = 2


def cuda_devices() -> int:
    """The number of CUDA devices torch sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run(cmd: list[str], limit: float, cwd: Path = ROOT) -> dict[str, Any]:
    """Run ``cmd`` for at most ``limit`` seconds: its status, time, last JSON line and output tail."""
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, timeout=max(1.0, limit))
        status, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = "timeout"
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
    result: dict[str, Any] = {"command": " ".join(cmd), "status": status, "seconds": round(time.monotonic() - start, 1)}
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            try:
                result["figures"] = json.loads(line)
                break
            except json.JSONDecodeError:
                pass
    if status != 0:
        result["output_tail"] = out[-3000:]
    return result


def main(argv: list[str]) -> int:
    out_path = Path(argv[0]) if argv else ROOT / "gpu_check.json"
    gpus = cuda_devices()
    if not gpus:
        print("gpu_check: no CUDA device (torch.cuda.is_available() is false): nothing checked; run it on a "
              "machine with an NVIDIA GPU", file=sys.stderr)
        return NO_CUDA_EXIT
    import torch

    py, deadline = sys.executable, time.monotonic() + TOTAL_S
    report: dict[str, Any] = {"host": platform.node(), "torch": torch.__version__, "gpus": gpus,
                              "device_name": torch.cuda.get_device_name(0), "steps": {}, "failures": []}

    def step(name: str, cmd: list[str], limit: float, cwd: Path = ROOT) -> None:
        left = deadline - time.monotonic()
        if left < 5:
            result = {"command": " ".join(cmd), "status": "skipped: the check's time was spent"}
        else:
            result = run(cmd, min(limit, left), cwd)
        report["steps"][name] = result
        if result["status"] != 0:
            report["failures"].append(name)
        print(f"gpu_check: {name}: {result['status']} ({result.get('seconds', 0)} s)", flush=True)
        out_path.write_text(json.dumps(report, indent=1))

    test_files = ["tests/test_ops_grouping.py", "tests/test_ops_sampling.py", "tests/test_ops_neighbors.py",
                  "tests/test_ops_pooling.py", "tests/test_backbones.py"]
    step("cuda_tests", [py, "-m", "pytest", "-q", "-k", "cuda", *test_files], LIMITS_S["tests"])
    for compile_ in (False, True):
        for name in PAPER_CONFIGS:
            cmd = [py, "scripts/bench_train.py", "--config", f"cfgs/scanobjectnn/{name}.yaml", "--device", "cuda",
                   "--amp", "--batch-size", "32", "--repeats", "5", "--no-breakdown"]
            label = f"bench_{name}" + ("_compile" if compile_ else "")
            step(label, cmd + (["--compile"] if compile_ else []), LIMITS_S["bench_compile" if compile_ else "bench"])
    with tempfile.TemporaryDirectory() as tmp:
        demo = [str(ROOT / "main.py"), "--config", str(ROOT / "cfgs/demo.yaml"), "train.device=cuda",
                f"experiment.output_dir={tmp}"]
        step("demo_cuda", [py, *demo, "experiment.name=demo_cuda"], LIMITS_S["demo"], cwd=Path(tmp))
        results = Path(tmp) / "demo_cuda" / "results.json"
        if results.is_file():
            report["steps"]["demo_cuda"]["results"] = json.loads(results.read_text())
        if gpus >= 2:
            step("ddp_two_gpus", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *demo,
                                  "experiment.name=demo_ddp", "train.epochs=1"], LIMITS_S["ddp"], cwd=Path(tmp))
        else:
            report["steps"]["ddp_two_gpus"] = {"status": "skipped: one GPU"}
    report["seconds"] = round(TOTAL_S - (deadline - time.monotonic()), 1)
    out_path.write_text(json.dumps(report, indent=1))
    print(f"gpu_check: {len(report['failures'])} failure(s); every figure in {out_path}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
