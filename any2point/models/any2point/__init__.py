"""Any2Point (Tang et al., 2024): the Point-PN tokenizer, the 3D-to-any virtual projection, the
any-to-3D guided adapter and its tuner, and the classifier and part-segmentation models that
assemble a source, a tokenizer, a projection and a tuner."""
from any2point.utils.imports import import_submodules

import_submodules(__name__, __path__)
