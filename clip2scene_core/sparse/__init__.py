"""Sparse 3D convolution with torchsparse's API and weight layout (pure PyTorch or torchsparse)."""
from .backend import BACKENDS, ENV_VAR, backend_name, torchsparse_available
from .functional import conv3d, get_kernel_map
from .kernel_map import KernelMap, LookupTable, kernel_offsets
from .modules import BatchNorm, Conv3d, ReLU
from .tensor import SparseCache, SparseTensor, cat

__all__ = [
    "BACKENDS", "ENV_VAR", "BatchNorm", "Conv3d", "KernelMap", "LookupTable", "ReLU",
    "SparseCache", "SparseTensor", "backend_name", "cat", "conv3d", "get_kernel_map",
    "kernel_offsets", "torchsparse_available",
]
