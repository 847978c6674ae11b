"""Training on two nodes through the multi-node command of docs/usage.md: two torchrun agents on
this machine (``--nnodes=2``, c10d rendezvous on 127.0.0.1, Gloo, one process each) train a shrunk
demo for one epoch, then ``--resume`` on the same two-node launch continues it to a second epoch.

Each node runs in its own folder with the experiment folder relative to it, as on machines without
shared storage, so what each global rank wrote is visible; before the resume the test copies the
first node's checkpoints to the second, which a shared file system would do. A ``sitecustomize``
module on the workers' path records the indices each rank's training sampler dealt.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from any2point.engine import checkpoint

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
# The demo at a few seconds an epoch: small clouds and splits, batch 8 over the two ranks.
SHRINK = ["dataset.num_points=128", "dataset.train_size=32", "dataset.val_size=8", "dataset.test_size=8",
          "train.batch_size=8", "train.num_workers=0", "model.source.pretrained=null", "experiment.name=two_nodes",
          "experiment.output_dir=exp"]
RECORDER = '''
import os
if os.environ.get("RANK") is not None and os.environ.get("SEEN_DIR"):
    from any2point.engine import distributed

    dealt = distributed.EpochSampler.__iter__

    def record(self):
        indices = list(dealt(self))
        if self.shuffle:
            with open(os.path.join(os.environ["SEEN_DIR"], "rank%s.txt" % os.environ["RANK"]), "a") as f:
                f.write("%d %d %s\\n" % (self.epoch, self.world, " ".join(map(str, indices))))
        return iter(indices)

    distributed.EpochSampler.__iter__ = record
'''


def documented_command() -> list[str]:
    """The multi-node torchrun command of docs/usage.md."""
    text = (ROOT / "docs/usage.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("torchrun --nnodes=2"))
    return shlex.split(line.split("#")[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nodes: list[Path], extra: list[str], seen: Path) -> None:
    """Start the documented command on both "nodes" (folders) at once and wait for both."""
    port = free_port()
    command = []
    for word in documented_command():
        word = re.sub(r"--nproc_per_node=\d+", "--nproc_per_node=1", word)
        word = word.replace("HOST:29400", f"127.0.0.1:{port}")
        command.append(word)
    assert command[0] == "torchrun" and "--rdzv_backend=c10d" in command and "main.py" in command
    command[0] = TORCHRUN
    command[command.index("main.py")] = str(ROOT / "main.py")
    command[command.index("--config") + 1] = str(ROOT / "cfgs/demo.yaml")  # the demo, shrunk
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{seen}{os.pathsep}{ROOT}", "SEEN_DIR": str(seen),
           "GLOO_SOCKET_IFNAME": "lo"}
    procs = [subprocess.Popen([*command, *SHRINK, *extra], cwd=node, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for node in nodes]
    try:
        outputs = [proc.communicate(timeout=400)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]


def dealt(seen: Path, rank: int) -> dict[int, list[int]]:
    """Per epoch, the training indices rank ``rank`` was dealt (each line: epoch, world, indices)."""
    out = {}
    for line in (seen / f"rank{rank}.txt").read_text().splitlines():
        epoch, world, *indices = map(int, line.split())
        assert world == 2
        out[epoch] = indices
    return out


def files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed")
def test_two_nodes_train_on_disjoint_halves_rank_0_writes_and_resume_continues(tmp_path: Path) -> None:
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    seen = tmp_path / "seen"
    for folder in (*nodes, seen):
        folder.mkdir()
    (seen / "sitecustomize.py").write_text(RECORDER)
    launch(nodes, ["train.epochs=1"], seen)
    # Which node got global rank 0 is the rendezvous' choice: it is the one that wrote the run.
    written = [node for node in nodes if (node / "exp/two_nodes").exists()]
    assert len(written) == 1, "exactly one node (global rank 0's) writes the experiment folder"
    main, other = written[0], next(node for node in nodes if node != written[0])
    run = main / "exp/two_nodes"
    assert {"ckpt-last.pth", "ckpt-best.pth", "results.json", "config.yaml", "log.txt"} <= set(files(run))
    assert not (other / "exp").exists()
    ckpt = checkpoint.load(run / "ckpt-last.pth")
    assert ckpt["epoch"] == 0 and len(ckpt["rng"]) == 2  # both ranks' random states, gathered by rank 0
    first = [dealt(seen, rank)[0] for rank in (0, 1)]
    assert len(first[0]) == len(first[1]) > 0 and not set(first[0]) & set(first[1])  # disjoint halves
    assert sorted(first[0] + first[1]) == list(range(len(first[0]) * 2))  # of the whole (even) split
    # --resume on the same two-node launch: every node reads the checkpoint (here: copied to it).
    shutil.copytree(run, other / "exp/two_nodes", ignore=shutil.ignore_patterns(".lock", "tb"))
    before = {node: files(node) for node in nodes}
    launch(nodes, ["train.epochs=2", "--resume", "--allow-config-change"], seen)
    changed = [node for node in nodes if files(node) != before[node]]
    assert len(changed) == 1  # global rank 0 (either node this time) wrote, the other rank nothing
    run = changed[0] / "exp/two_nodes"
    resumed = checkpoint.load(run / "ckpt-last.pth")
    assert resumed["epoch"] == 1 and len(resumed["rng"]) == 2
    log = (run / "log.txt").read_text()
    assert "resumed from" in log and "epoch 2/2" in log and log.count("epoch 1/2") == 0
    second = [dealt(seen, rank)[1] for rank in (0, 1)]
    assert not set(second[0]) & set(second[1]) and second != first  # a new epoch's deal, still disjoint
