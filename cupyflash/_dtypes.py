"""The dtypes cupyflash accepts, in one table."""
import numpy as np
from ml_dtypes import bfloat16

BFLOAT16 = np.dtype(bfloat16)
FLOAT16 = np.dtype(np.float16)
FLOAT32 = np.dtype(np.float32)
FLOAT64 = np.dtype(np.float64)

#: dtypes of q, k, v on the GPU (cupy arrays)
SUPPORTED_GPU_DTYPES = (FLOAT16, BFLOAT16, FLOAT32)
#: dtypes of q, k, v on the CPU (numpy arrays); float64 computes in float64
SUPPORTED_CPU_DTYPES = (FLOAT16, BFLOAT16, FLOAT32, FLOAT64)


def dtype_name(dt) -> str:
    dt = np.dtype(dt)
    return "bfloat16" if dt == BFLOAT16 else dt.name


def lse_dtype(dt) -> np.dtype:
    """lse is float32, except float64 inputs (CPU only) which keep float64 throughout."""
    return FLOAT64 if np.dtype(dt) == FLOAT64 else FLOAT32
