"""Source transformers (frozen pretrained models of other modalities) behind one contract."""
from any2point.utils.imports import import_submodules

import_submodules(__name__, __path__)
