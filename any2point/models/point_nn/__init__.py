"""Point-NN and Point-PN (Zhang et al., "Parameter is not all you need", CVPR 2023): the
training-free Point-NN (non-parametric encoder + point-memory bank, also a plug-in beside a trained
classifier) and Point-PN, its small parametric network trained from scratch; both reuse the
grouping, sin/cos encoding and residual blocks of Any2Point's Point-PN tokenizer."""
from any2point.utils.imports import import_submodules

import_submodules(__name__, __path__)
