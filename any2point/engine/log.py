"""Logging: a plain-text log file and the console (rank 0 only), and TensorBoard scalars."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

from any2point.engine import distributed

LOGGER_NAME = "any2point"


def setup_logging(log_file: Optional[Path] = None) -> logging.Logger:
    """Configure the ``any2point`` logger: INFO to stderr and to ``log_file`` on rank 0;
    other ranks log warnings only."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO if distributed.is_main() else logging.WARNING)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if log_file is not None and distributed.is_main():
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


class ScalarWriter:
    """TensorBoard scalars on rank 0; a no-op elsewhere."""

    def __init__(self, log_dir: Path, purge_step: Optional[int] = None) -> None:
        """``purge_step``: a resumed run's first step; TensorBoard drops what an earlier run logged
        from that step on (an epoch killed before its checkpoint), so no step appears twice."""
        self._writer = None
        if distributed.is_main():
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def add(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
