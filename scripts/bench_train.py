"""Benchmark full training steps of a config: time, FLOPs, model FLOP utilisation, memory, stages.

A step is what the trainer does per batch: forward, cross-entropy, backward, gradient clipping and
the optimizer step, on random clouds of ``--points`` points. The script prints one JSON line:

- ``step_s_median`` / ``step_s_min`` over ``--repeats`` timed steps after two warm-up steps,
  ``samples_per_s`` from the median, and ``step_thread_cpu_s_min``, the least CPU time of the
  calling thread over those steps (with ``--threads 1`` a figure a busy shared machine disturbs
  far less than wall time);
- ``flops_per_step``: the model FLOPs of a step, counted by ``torch.utils.flop_counter`` (matmuls,
  convolutions and attention; element-wise work is not counted, as usual for MFU) without the work
  the memory-saving paths add (the tokenizer's lean path, activation checkpointing), so that
  recomputed work does not count as useful; ``flops_executed_per_step`` counts the step as it runs
  (recomputation included; the counter's registry misses in-place ``addmm_``). Both come from one
  counted step of the model as configured (:class:`StepFlops`), so counting needs no more memory
  than the step;
- ``matmul_flops_per_s``: the best rate of dense square matmuls of 512, 1024 and 2048 (fp32, or
  bf16 with ``--amp``) timed in the same run, before and after the steps; ``mfu`` = FLOPs per step /
  median step time / that figure, and ``mfu_thread_cpu`` the same from thread CPU times (step and
  matmul);
- ``device_waits_per_step``: operators of one step's forward and backward passes that would make
  the host wait for a CUDA device (reading a value, data-dependent output sizes;
  ``any2point/utils/device_waits.py``), counted on any device, and ``device_waits`` per operator;
- ``peak_memory_bytes``: CUDA ``max_memory_allocated`` over a step; on the CPU the peak resident
  memory of a fresh process that builds the model and runs two steps (``memory_process``), and its
  resident memory before the first step (``rss_before_step_bytes``); ``bench_peak_rss_bytes`` is the
  peak of the benchmark's own process (steps, FLOP count and breakdown);
- ``stages``: per stage of the model (tokenizer, projection, blocks, adapters, head, other) the time
  of its operators, forward and backward, its counted FLOPs and FLOP/s, and the optimizer's time
  (clipping and the update). An operator belongs to the stage of the innermost frame of the model's
  source files that called it (``models/any2point/tokenizer.py`` -> tokenizer, ``models/sources/`` ->
  blocks, ...); in the backward pass, outside such frames (custom autograd functions run their
  own), an operator belongs to the stage whose forward operator created the autograd node being
  run. The FLOPs are those of the registry of ``torch.utils.flop_counter``, which does not count
  in-place ``addmm_``. The attribution therefore follows the files, not module
  names, and survives refactors of the model classes. Timing every operator adds overhead, so these
  figures come from one extra step and are reported as times and shares of their own sum.

With ``--eval`` a "step" is a forward pass as ``main.py --test`` runs it (eval mode, no gradient,
autocast with ``--amp``): the same figures for that pass (``mode: eval``; ``flops_per_sample`` is
given in both modes), the stages of the forward pass only.

    python scripts/bench_train.py --config cfgs/scanobjectnn/any2point_clip_text.yaml \\
        [--batch-size 8] [--points 1024] [--threads 1] [--device cpu|cuda] [--amp] [--compile] \\
        [--repeats 3] [--eval] [key=value ...]

Config overrides (``key=value``) follow the options; ``model.source.pretrained=null`` is applied
by default so no weight file is needed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without pip install

from any2point import build_model, load_config  # noqa: E402
from any2point.engine.optim import build_optimizer  # noqa: E402
from any2point.utils.device_waits import DeviceWaits  # noqa: E402
from any2point.engine.runtime import autocast  # noqa: E402
from any2point.utils.cpu_memory import keep_freed_memory, restart_without_thread_cache  # noqa: E402
from any2point.models.any2point.tokenizer import PointPNStage  # noqa: E402
from any2point.utils.activation_checkpoint import is_recomputing  # noqa: E402

STAGES = ("tokenizer", "projection", "blocks", "adapters", "head", "other")
# Source files of the model -> stage; the innermost matching frame of a call decides.
MODEL_DIR = ROOT / "any2point" / "models"
FILE_STAGES = (
    (MODEL_DIR / "any2point" / "tokenizer.py", "tokenizer"),
    (MODEL_DIR / "pointnet.py", "tokenizer"),
    (MODEL_DIR / "any2point" / "projection.py", "projection"),
    (MODEL_DIR / "any2point" / "adapter.py", "adapters"),
    (MODEL_DIR / "any2point" / "tuner.py", "adapters"),
    (MODEL_DIR / "point_peft", "adapters"),
    (MODEL_DIR / "tuners", "adapters"),
    (MODEL_DIR / "sources", "blocks"),
)
# Top-level children of the classifier whose work in its own file is the head's.
HEAD_CHILDREN = ("head", "norm")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--points", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--amp", action="store_true",
                        help="bf16 autocast (train.amp on CUDA, train.cpu_amp on the CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval", action="store_true",
                        help="time --test-style forward passes (eval mode, no gradient) instead of training steps")
    parser.add_argument("--system-malloc", action="store_true",
                        help="CPU: let glibc's malloc return freed memory, as the trainer does with "
                             "train.keep_freed_memory=false (by default it keeps freed memory for reuse; "
                             "either way the script runs without glibc's tcache, as main.py does)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-stage step")
    parser.add_argument("--no-memory-process", action="store_true",
                        help="CPU: skip the fresh process that measures peak resident memory")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser.parse_args(argv)


class Step:
    """One training step of the config's model on fixed random clouds, as the trainer runs it."""

    def __init__(self, args: argparse.Namespace) -> None:
        overrides = ["model.source.pretrained=null", *args.overrides]
        self.cfg = load_config(args.config, overrides=overrides)
        self.device = torch.device(args.device)
        self.amp = args.amp
        torch.manual_seed(0)
        self.evaluating = args.eval
        self.model = build_model(self.cfg.model).to(self.device).train(not args.eval)
        self.net = torch.compile(self.model) if args.compile else self.model
        self.optimizer = build_optimizer(self.cfg.optimizer, self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.grad_clip = self.cfg.train.get("grad_clip")
        num_classes = self.cfg.model.num_classes
        points = torch.randn(args.batch_size, args.points, 3)
        self.points = (points / points.norm(dim=-1, keepdim=True) * torch.rand(args.batch_size, args.points, 1) ** (1 / 3))
        self.points = self.points.to(self.device)
        self.labels = torch.randint(num_classes, (args.batch_size,), device=self.device)

    def forward(self) -> torch.Tensor:
        with autocast(self.device, self.amp):
            logits = self.net(self.points)
        return F.cross_entropy(logits.float(), self.labels)

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def update(self) -> None:
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()

    def infer(self) -> torch.Tensor:
        """A forward pass as ``--test`` runs it: eval mode (set at construction), no gradient."""
        with torch.no_grad(), autocast(self.device, self.amp):
            return self.net(self.points)

    def __call__(self) -> None:
        if self.evaluating:
            self.infer()
            return
        self.backward(self.forward())
        self.update()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def timed_with_cpu(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[float, float]:
    """Wall time and this thread's CPU time of ``fn`` (the latter is robust to a busy machine)."""
    start = time.thread_time()
    wall = timed(fn, sync)
    return wall, time.thread_time() - start


def matmul_flops_per_s(device: torch.device, amp: bool, sizes: tuple[int, ...] = (512, 1024, 2048),
                       repeats: int = 5) -> tuple[float, float]:
    """The best rate of dense square matmuls of ``sizes`` (bf16 under ``amp``, else fp32), by wall time
    and by this thread's CPU time; each timing runs as many products as make one of the largest size.
    On a 2-core Zen 3 VM the 512^3 product ran at 94 GFLOP/s against 81 for 2048^3 (1 thread)."""
    dtype = torch.bfloat16 if amp else torch.float32
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    best_wall = best_cpu = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        calls = max(1, (max(sizes) // size) ** 3)

        def run() -> None:
            for _ in range(calls):
                torch.mm(a, b)

        run()
        wall, cpu = zip(*[timed_with_cpu(run, sync) for _ in range(repeats)])
        flops = 2 * size**3 * calls
        best_wall, best_cpu = max(best_wall, flops / min(wall)), max(best_cpu, flops / min(cpu))
    return best_wall, best_cpu


class StepFlops(FlopCounterMode):
    """Counts a step's FLOPs as it runs (``executed``) and as the model's (``model``): the latter
    leaves out what the memory-saving paths add, so that recomputed work does not count as useful.

    - Activation checkpointing (``any2point/utils/activation_checkpoint.py``: the tuner's and the
      blocks'): what runs while :func:`is_recomputing` is true is the forward pass again.
    - The tokenizer's lean path (a Point-PN stage in training with ``recompute``): its fused function
      rebuilds activations in several passes (and its in-place ``addmm_`` escapes the counter's
      registry). Its operators, forward and backward, are left out, and the stage's blocks on plain
      autograd are counted instead, on the ``meta`` device at the same shapes (no memory, no time).

    The count therefore needs no more memory than the step itself, and equals the count of the same
    step on a copy of the model with every recomputation switched off (``tests/test_bench_train.py``).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(display=False)
        self.model = model
        self.lean_depth = 0  # > 0 while a lean stage's operators run
        self.not_model = 0
        self.lean_runs: list[tuple[PointPNStage, int, bool, bool]] = []
        self.handles: list[Any] = []

    @property
    def executed(self) -> int:
        return self.get_total_flops()

    @property
    def model_flops(self) -> int:
        """Counted after the step, outside this mode: the lean stages' plain FLOPs on ``meta``."""
        plain = sum(plain_stage_flops(*run) for run in self.lean_runs)
        return self.executed - self.not_model + plain

    def __enter__(self) -> "StepFlops":
        for module in self.model.modules():
            if isinstance(module, PointPNStage):
                self.handles += [module.register_forward_pre_hook(self._enter_stage),
                                 module.register_forward_hook(self._leave_stage)]
        self.not_model = 0
        self.lean_runs.clear()
        return super().__enter__()

    def __exit__(self, *args: Any) -> Any:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        return super().__exit__(*args)

    def _count_flops(self, func_packet, out, args, kwargs):  # noqa: ANN001, ANN202
        # FlopCounterMode's per-operator hook: whatever it adds to the total is also left out of the
        # model's count inside a recomputation or a lean stage.
        before = self.flop_counts["Global"][func_packet]
        out = super()._count_flops(func_packet, out, args, kwargs)
        if self.lean_depth or is_recomputing():
            self.not_model += self.flop_counts["Global"][func_packet] - before
        return out

    @staticmethod
    def _is_lean(stage: PointPNStage) -> bool:
        return stage.training and stage.recompute

    def _enter_stage(self, stage: PointPNStage, args: tuple) -> None:
        if self._is_lean(stage):
            self.lean_depth += 1

    def _leave_stage(self, stage: PointPNStage, args: tuple, output: tuple) -> None:
        if not self._is_lean(stage):
            return
        self.lean_depth -= 1
        tokens = output[1]
        grad = torch.is_grad_enabled() and tokens.grad_fn is not None
        if not is_recomputing():
            self.lean_runs.append((stage, tokens.shape[0] * tokens.shape[1], args[1].requires_grad, grad))
        if grad:  # the fused function's backward: its operators are the lean path's too
            node = tokens.grad_fn
            node.register_prehook(self._enter_backward)
            node.register_hook(self._leave_backward)

    def _enter_backward(self, *_: Any) -> None:
        self.lean_depth += 1

    def _leave_backward(self, *_: Any) -> None:
        self.lean_depth -= 1


def plain_stage_flops(stage: PointPNStage, groups: int, input_grad: bool, backward: bool) -> int:
    """The counted FLOPs of ``stage``'s residual blocks and max on plain autograd over ``groups``
    groups of its ``k`` neighbours (forward, and backward if ``backward``; the grouped input needs a
    gradient if ``input_grad``), run on the ``meta`` device. Batch norms count no FLOPs, so the copy
    runs them with its running statistics (eval mode: no step counter to read on ``meta``)."""
    twin = copy.deepcopy(stage).to("meta").eval()
    rows = torch.empty(groups * stage.k, stage.width, device="meta", requires_grad=input_grad)
    with FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(backward):
            x = rows
            for block in twin.blocks:
                x = twin._block(block, x)
            out = x.unflatten(0, (groups, stage.k)).max(dim=1).values
        if backward and out.requires_grad:
            out.backward(torch.empty_like(out))
    return counter.get_total_flops()


def count_flops(step: Step, waits: Optional[DeviceWaits] = None) -> tuple[int, int]:
    """The FLOPs of one step as executed and as the model's (:class:`StepFlops`); ``waits`` counts
    the device waits of its forward and backward passes (not the optimizer's: its step counters are
    CPU tensors by design)."""
    with StepFlops(step.model) as counter:
        if step.evaluating:
            with waits or contextlib.nullcontext():
                step.infer()
        else:
            with waits or contextlib.nullcontext():
                step.backward(step.forward())
            step.update()
    return counter.executed, counter.model_flops


class StageTimer:
    """Times every operator of a step and adds its time and FLOPs to the stage that ran it.

    Forward operators are charged by the call stack (innermost frame in the model's files); each
    autograd node made in the forward pass is tagged with that stage, and a pre-hook on the node
    makes the backward operators it runs count for the same stage.
    """

    def __init__(self, model: torch.nn.Module, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)
        self.flops: dict[str, int] = defaultdict(int)
        self.backward_stage: Optional[str] = None
        self.in_backward = False
        self.tagged: set[int] = set()
        self.files = [(str(path), stage) for path, stage in FILE_STAGES]
        self.classifier_file = str(MODEL_DIR / "any2point" / "classifier.py")
        self.child_of = {id(module): name for name, child in model.named_children() for module in child.modules()}
        self.active: list[str] = []

    def frame_stage(self) -> Optional[str]:
        """The stage of the innermost frame in the model's files, if any (also in the backward of
        custom autograd functions, which runs their Python code)."""
        frame = sys._getframe(1)
        while frame is not None:
            filename = frame.f_code.co_filename
            for prefix, stage in self.files:
                if filename.startswith(prefix):
                    return stage
            if filename == self.classifier_file:
                owners = [name for name in self.active if name]
                return "head" if owners and owners[-1] in HEAD_CHILDREN else "other"
            frame = frame.f_back
        return None

    def tag(self, node: Any, stage: str) -> None:
        """Charge the backward of ``node`` (and of untagged nodes feeding it, e.g. custom
        autograd functions, which no operator hook sees) to ``stage``."""
        if node is None or id(node) in self.tagged:
            return
        self.tagged.add(id(node))

        def prehook(*_: Any) -> None:
            self.backward_stage = stage

        node.register_prehook(prehook)
        for parent, _ in node.next_functions:
            if parent is not None and id(parent) not in self.tagged and type(parent).__name__ != "AccumulateGrad":
                self.tag(parent, stage)

    def record(self, stage: str, seconds: float, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        self.seconds[stage] += seconds
        packet = func._overloadpacket
        if packet in flop_registry:
            self.flops[stage] += flop_registry[packet](*args, **kwargs, out_val=out)


class _TimeOps(TorchDispatchMode):
    def __init__(self, timer: StageTimer) -> None:
        super().__init__()
        self.timer = timer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        timer = self.timer
        stage = timer.frame_stage() or (timer.backward_stage if timer.in_backward else None) or "other"
        timer.sync()
        start = time.perf_counter()
        out = func(*args, **kwargs)
        timer.sync()
        timer.record(stage, time.perf_counter() - start, func, args, kwargs, out)
        return out


class _TagNodes(TorchFunctionMode):
    def __init__(self, timer: StageTimer) -> None:
        super().__init__()
        self.timer = timer

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled() and not self.timer.in_backward:
            stage = self.timer.frame_stage() or "other"
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor):
                    self.timer.tag(tensor.grad_fn, stage)
        return out


def stage_breakdown(step: Step) -> dict[str, dict[str, Any]]:
    """Per-stage operator time and FLOPs of one step (see the module docstring)."""
    timer = StageTimer(step.model, step.sync)

    def enter(module: torch.nn.Module, _: Any) -> None:
        timer.active.append(timer.child_of.get(id(module), ""))

    def leave(*_: Any) -> None:
        timer.active.pop()

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
             torch.nn.modules.module.register_module_forward_hook(leave)]
    try:
        with _TimeOps(timer), _TagNodes(timer):
            if step.evaluating:
                step.infer()
            else:
                loss = step.forward()
                timer.in_backward = True
                step.backward(loss)
    finally:
        for hook in hooks:
            hook.remove()
    optimizer_s = 0.0 if step.evaluating else timed(step.update, step.sync)
    total = sum(timer.seconds.values()) + optimizer_s
    out: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        seconds, flops = timer.seconds.get(stage, 0.0), timer.flops.get(stage, 0)
        if seconds or flops:
            out[stage] = {"s": round(seconds, 4), "share": round(seconds / total, 4), "flops": flops,
                          "gflop_per_s": round(flops / 1e9 / seconds, 2) if seconds else None}
    if not step.evaluating:
        out["optimizer"] = {"s": round(optimizer_s, 4), "share": round(optimizer_s / total, 4)}
    return out


def machine_name() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_bytes() -> int:
    """The process's peak resident memory: ``VmHWM`` on Linux (``ru_maxrss`` there can carry the
    parent's resident memory over ``fork`` and ``exec``, so a fresh process spawned by a large one
    would report the parent's), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_in_fresh_process(argv: list[str]) -> dict[str, int]:
    """Run this script with ``--memory-only`` in a new process and return what it measured."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-only"]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cpu" and not args.system_malloc:
        keep_freed_memory()
    step = Step(args)
    if args.memory_only:
        before = current_rss_bytes()
        step()
        step()
        report = {"peak_rss_bytes": peak_rss_bytes(), "rss_before_step_bytes": before}
        print(json.dumps(report))
        return report

    rates = [matmul_flops_per_s(step.device, args.amp)]
    for _ in range(2):
        step()
    if step.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(step.device)
    times, cpu_times = zip(*[timed_with_cpu(step, step.sync) for _ in range(args.repeats)])
    rates.append(matmul_flops_per_s(step.device, args.amp))
    peak_rate, peak_cpu_rate = max(r[0] for r in rates), max(r[1] for r in rates)
    waits = DeviceWaits()
    executed, model_flops = count_flops(step, waits)
    flops = executed if args.compile else model_flops
    median = statistics.median(times)
    report: dict[str, Any] = {
        "config": args.config, "mode": "eval" if args.eval else "train", "device": args.device,
        "machine": machine_name(),
        "threads": args.threads, "batch_size": args.batch_size, "points": args.points, "amp": args.amp,
        "compile": args.compile, "repeats": args.repeats, "system_malloc": args.system_malloc,
        "step_s_median": round(median, 4), "step_s_min": round(min(times), 4),
        "samples_per_s": round(args.batch_size / median, 2),
        "step_thread_cpu_s_min": round(min(cpu_times), 4),
        "flops_per_step": flops, "flops_per_sample": round(flops / args.batch_size),
        "flops_executed_per_step": executed, "matmul_flops_per_s": round(peak_rate),
        "matmul_flops_per_thread_cpu_s": round(peak_cpu_rate),
        "mfu": round(flops / median / peak_rate, 4),
        "mfu_thread_cpu": round(flops / min(cpu_times) / peak_cpu_rate, 4),
        "device_waits_per_step": waits.total, "device_waits": dict(sorted(waits.counts.items())),
    }
    if step.device.type == "cuda":  # the host thread's CPU time says nothing about the GPU
        for key in ("step_thread_cpu_s_min", "matmul_flops_per_thread_cpu_s", "mfu_thread_cpu"):
            del report[key]
        report["device_name"] = torch.cuda.get_device_name(step.device)
        report["peak_memory_bytes"] = torch.cuda.max_memory_allocated(step.device)
    elif not args.no_memory_process:
        fresh = memory_in_fresh_process(argv)
        report["peak_memory_bytes"] = fresh["peak_rss_bytes"]
        report["rss_before_step_bytes"] = fresh["rss_before_step_bytes"]
        report["memory_process"] = "fresh"
    if not args.no_breakdown and not args.compile:
        report["stages"] = stage_breakdown(step)
    if step.device.type == "cpu":
        report["bench_peak_rss_bytes"] = peak_rss_bytes()  # this process: the steps, the count, the breakdown
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    restart_without_thread_cache()  # as main.py does
    main()
