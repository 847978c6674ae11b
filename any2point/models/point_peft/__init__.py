"""Point-PEFT (Tang et al., AAAI 2024) on 3D-pretrained sources: the point-prior prompt, the
geometry-aware adapter (its tuner) and the memory bank of training-set features."""
from any2point.utils.imports import import_submodules

import_submodules(__name__, __path__)
