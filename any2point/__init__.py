"""any2point: frozen pretrained transformers of any modality as 3D point-cloud models."""
from any2point.config import load_config
from any2point.datasets import build_dataset
from any2point.models import build_model

__all__ = ["load_config", "build_model", "build_dataset"]
__version__ = "0.1.0"
