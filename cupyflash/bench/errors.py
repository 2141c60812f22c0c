"""The errors a benchmark turns into result rows rather than tracebacks."""
from __future__ import annotations


class Unsupported(Exception):
    """This implementation cannot run this case (the row is 'skipped' with the reason)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """CuPy's and PyTorch's OutOfMemoryError, NumPy's MemoryError, XLA's RESOURCE_EXHAUSTED."""
    if isinstance(exc, MemoryError):
        return True
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return True
    text = str(exc)
    return ("out of memory" in text.lower() or "RESOURCE_EXHAUSTED" in text
            or "cudaErrorMemoryAllocation" in text)


def short_error(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."
