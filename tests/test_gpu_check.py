"""scripts/gpu_check.sh on a machine without CUDA: one clear line and exit status 2, nothing written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_gpu_check_without_cuda_says_so_and_exits_2(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), str(out)], check=False, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device") and "nothing checked" in lines[0]
    assert not out.exists()
