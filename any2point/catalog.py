"""The catalogue of buildable pieces: importing this module fills every registry.

This is the one place that imports the packages whose modules register classes (datasets and
transforms, models with their sources, tokenizers, projections and tuners, optimizers and
schedules, tasks). The config loader imports it; nothing it imports imports the config loader, so
the registries never form an import cycle with it.
"""
from __future__ import annotations

import any2point.datasets  # noqa: F401
import any2point.engine.optim  # noqa: F401
import any2point.engine.tasks  # noqa: F401
import any2point.models  # noqa: F401
