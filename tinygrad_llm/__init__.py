"""tinygrad_llm: an LLM toolkit built from the autograd engine up, on NumPy (CPU) and CuPy (GPU)."""

from . import functional
from .backend import cuda_available, manual_seed
from .tensor import Function, Tensor, is_grad_enabled, no_grad

__version__ = "0.1.0"
__all__ = ["Tensor", "Function", "no_grad", "is_grad_enabled", "functional", "manual_seed",
           "cuda_available"]
