"""cupyflash: exact FlashAttention on CuPy arrays (CUDA kernels compiled at run time by
NVRTC) and on NumPy arrays (the same blocked algorithm on the CPU). No PyTorch."""
__version__ = "0.1.0"  # first: the modules below read it

from .api import backward_workspace, dropout_mask, flash_attention, flash_attention_backward
from .varlen import flash_attention_varlen, flash_attention_varlen_backward
from .kvcache import flash_attention_with_kvcache, kvcache_workspace
from . import autodiff, optim, reference
from .blockmask import BlockMask, block_mask
from .tune import tune

__all__ = ["flash_attention", "flash_attention_backward", "flash_attention_varlen", "flash_attention_varlen_backward",
           "flash_attention_with_kvcache", "tune", "block_mask", "BlockMask", "dropout_mask",
           "backward_workspace", "kvcache_workspace", "autodiff", "optim",
           "reference", "__version__"]
