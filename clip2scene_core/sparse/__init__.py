"""Sparse 3D convolution with torchsparse's API and weight layout (pure PyTorch or torchsparse)."""
from .backend import BACKENDS, ENV_VAR, backend_name, torchsparse_available
from .fold import SPARSE_PRECISIONS, resolve_sparse_precision
from .functional import conv3d, get_kernel_map
from .kernel_map import KernelMap, LookupTable, kernel_offsets
from .modules import BatchNorm, Conv3d, ReLU, set_precision
from .tensor import SparseCache, SparseTensor, cat

__all__ = [
    "BACKENDS", "ENV_VAR", "SPARSE_PRECISIONS", "BatchNorm", "Conv3d", "KernelMap", "LookupTable", "ReLU",
    "SparseCache", "SparseTensor", "backend_name", "cat", "conv3d", "get_kernel_map",
    "kernel_offsets", "resolve_sparse_precision", "set_precision", "torchsparse_available",
]
