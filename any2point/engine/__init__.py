"""Training and evaluation engine; importing it registers the optimizers and schedules."""
from any2point.engine import optim  # noqa: F401  (registers optimizers and schedulers)
