"""Point ops without a compile step: FPS, kNN, grouping, cell/voxel pooling, interpolation.

Pure PyTorch on every device (vectorised and batched; FPS loops only over its picks), with an
optional faster backend chosen automatically (see :mod:`any2point.extensions.backend`). Every op
validates its inputs and raises ``ValueError`` naming the offending argument.
"""

from any2point.extensions.backend import get_backend, set_backend
from any2point.extensions.grouping import gather, group
from any2point.extensions.neighbors import knn, three_nn_interpolate
from any2point.extensions.pooling import scatter_back, segment_reduce, voxel_ids
from any2point.extensions.sampling import furthest_point_sample

__all__ = [
    "furthest_point_sample",
    "knn",
    "gather",
    "group",
    "segment_reduce",
    "scatter_back",
    "voxel_ids",
    "three_nn_interpolate",
    "get_backend",
    "set_backend",
]
