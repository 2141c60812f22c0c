"""The CUDA C++ sources in kernels_cu/, assembled into one translation unit.

CuPy's kernel cache is keyed on the source string it is handed, not on the contents of
files that source ``#include``s. So local ``#include "x.cuh"`` lines are inlined here (each
header once, as ``#pragma once`` would) and CuPy sees every byte it compiles: an edited header
is a new source and a cache miss, never stale code.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

#: kernel translation units, in the order they are concatenated
KERNEL_FILES = ("flash_fwd.cu", "flash_fwd_sm90.cu", "flash_bwd.cu", "flash_bwd_sm90.cu", "flash_bwd_dq.cu", "flash_bwd_preprocess.cu", "flash_bwd_convert.cu",
                "flash_bwd_dsinks.cu", "flash_f32.cu", "kvcache_append.cu", "flash_decode.cu",
                "flash_decode_combine.cu")

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def kernel_dir() -> Path:
    """Where the .cu/.cuh files are: inside the installed package, or beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels_cu", here.parent / "kernels_cu"):
        if (candidate / KERNEL_FILES[0]).is_file():
            return candidate
    raise FileNotFoundError(f"cupyflash's CUDA sources (kernels_cu/{KERNEL_FILES[0]}) were not found "
                            f"under {here} or {here.parent}; reinstall cupyflash")


def _inline(path: Path, seen: set) -> list[str]:
    out = [f"// ---- {path.name} ----"]
    for line in path.read_text().splitlines():
        m = _LOCAL_INCLUDE.match(line)
        if m:
            dep = (path.parent / m.group(1)).resolve()
            if dep not in seen:
                seen.add(dep)
                out.extend(_inline(dep, seen))
        elif line.strip() != "#pragma once":
            out.append(line)
    return out


@functools.lru_cache(maxsize=1)
def kernel_source() -> str:
    """All kernels as one self-contained source string (system headers stay #include <...>)."""
    d = kernel_dir()
    seen: set = set()
    lines: list[str] = []
    for name in KERNEL_FILES:
        path = (d / name).resolve()
        seen.add(path)
        lines.extend(_inline(path, seen))
    return "\n".join(lines) + "\n"


def user_terms(variants) -> tuple[str, tuple]:
    """The source that comes before kernel_source() in a module with the call's mask_mod and
    bias_mod (variant.cuh's CUPYFLASH_USER_KEEP and CUPYFLASH_USER_BIAS, translated by
    _expr.to_cpp), and the aux arrays they read, in the order of their UserParams slots; ("", ())
    without user expressions."""
    from . import _expr
    exprs = [(macro, e) for macro, e in (("CUPYFLASH_USER_KEEP", variants.mask_mod),
                                         ("CUPYFLASH_USER_BIAS", variants.bias_mod)) if e is not None]
    if not exprs:
        return "", ()
    read = tuple((n, a) for n, a in variants.aux if any(n in e.names for _, e in exprs))
    slots = {n: (slot, _expr.CPP_TYPES[a.dtype.str], "bool" if a.dtype == bool else "float" if a.dtype.kind == "f"
                 else "int", a.ndim) for slot, (n, a) in enumerate(read)}
    lines = [f"// {e.what}: {' '.join(e.text.split())}\n#define {macro} ({_expr.to_cpp(e, slots)})" for macro, e in exprs]
    return "\n".join(lines) + "\n", read
