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


def user_terms(variants, device: bool = True, listed: bool = False) -> tuple[str, tuple]:
    """The source that comes before kernel_source() in a module with the call's user terms, and the
    arrays it reads, in the order of their UserParams slots; ("", ()) without user terms.

    variant.cuh's CUPYFLASH_USER_KEEP is the conjunction of the mask_mod (translated by
    _expr.to_cpp), the mask tensor and the block mask's element rule (its kinds array, and its own
    mask_mod on its partial blocks); CUPYFLASH_USER_BIAS the sum of the bias_mod and the bias tensor.
    A tensor's size-1 (broadcast) axes are read at index 0. CUPYFLASH_DBIAS (a backward with
    variants.dbias) adds d loss / d logit into that float32 array at the bias's index (atomics:
    every logit a broadcast axis folds lands on one element). CUPYFLASH_BLOCK_* describe the block
    mask for the kernels that walk only its kept tiles (VARIANT_BLOCKS). ``listed``: the kernels walk
    those lists, so they know each tile's kind: the block mask leaves CUPYFLASH_USER_KEEP, and its
    own rule on partial blocks becomes CUPYFLASH_BLOCK_KEEP (full blocks evaluate nothing). The
    arrays (slots) are the same either way. ``device``: a block mask's arrays as its copies on the
    current GPU (False: its host arrays, for offline compilation)."""
    from . import _expr
    arrays: list = []

    def slot(array) -> int:
        for n, a in enumerate(arrays):
            if a is array:
                return n
        arrays.append(array)
        return len(arrays) - 1

    def translate(e, aux) -> str:
        read = {n: a for n, a in aux if n in e.names}
        slots = {n: (slot(a), _expr.CPP_TYPES[a.dtype.str], _expr.array_kind(a), a.ndim) for n, a in read.items()}
        return _expr.to_cpp(e, slots)

    def index(t) -> str:  # of a 4-D (batch, heads, seqlen_q, seqlen_k) tensor, size-1 axes broadcast
        return ", ".join("0" if n == 1 else name for n, name in zip(t.shape, ("b", "h", "q_idx", "kv_idx")))

    def dense(t, ctype) -> str:
        return f"static_cast<{ctype}>(aux_read<{_expr.CPP_TYPES[t.dtype.str]}>(u, {slot(t)}, bad, {index(t)}))"

    keep, bias, lines = [], [], []
    # the aux reads at an address of their own per score (_expr.element_reads; a tensor's, unless it
    # broadcasts over queries or keys)
    element_reads = sum(_expr.element_reads(e) for e in (variants.mask_mod, variants.bias_mod,
                                                          None if variants.block_mask is None else variants.block_mask.mask_mod)
                        if e is not None)
    element_reads += sum(t.shape[2] > 1 and t.shape[3] > 1 for t in (variants.mask, variants.bias) if t is not None)
    if variants.mask_mod is not None:
        keep.append(f"({translate(variants.mask_mod, variants.aux)} != 0)")
        lines.append(f"// mask_mod: {' '.join(variants.mask_mod.text.split())}")
    if variants.mask is not None:
        keep.append(dense(variants.mask, "bool"))
    bm = variants.block_mask
    if bm is not None:
        kinds = bm.device_kinds() if device else bm.kinds
        br, bc = bm.block
        at = ", ".join(["0" if kinds.shape[0] == 1 else "b", "0" if kinds.shape[1] == 1 else "h",
                        f"q_idx / {br}", f"kv_idx / {bc}"])
        kind = f"aux_read<signed char>(u, {slot(kinds)}, bad, {at})"
        rule = "true" if bm.mask_mod is None else f"({translate(bm.mask_mod, bm.device_aux() if device else bm.aux)} != 0)"
        if not listed:
            keep.append(f"(({kind}) == {bm.FULL} || (({kind}) == {bm.PARTIAL} && {rule}))")
        elif bm.mask_mod is not None:
            lines.append(f"#define CUPYFLASH_BLOCK_KEEP {rule}")
        lines.append(f"// block_mask: blocks of {br} x {bc}"
                     + ("" if bm.mask_mod is None else f", partial blocks by {' '.join(bm.mask_mod.text.split())}"))
        lines.append(f"#define CUPYFLASH_BLOCK_ROWS {br}\n#define CUPYFLASH_BLOCK_COLS {bc}\n"
                     f"#define CUPYFLASH_BLOCK_SLOT {slot(kinds)}")
    if variants.bias_mod is not None:
        bias.append(f"static_cast<float>({translate(variants.bias_mod, variants.aux)})")
        lines.append(f"// bias_mod: {' '.join(variants.bias_mod.text.split())}")
    if variants.bias is not None:
        bias.append(dense(variants.bias, "float"))
    if variants.dbias is not None:  # the backward adds d loss / d logit there (bias's axes: summed where it broadcasts)
        lines.append(f"#define CUPYFLASH_DBIAS(value) aux_add(u, {slot(variants.dbias)}, value, {index(variants.bias)})")
    if keep:
        lines.append(f"#define CUPYFLASH_USER_KEEP ({' && '.join(keep)})")
    if bias:
        lines.append(f"#define CUPYFLASH_USER_BIAS ({' + '.join(bias)})")
    if not (keep or bias or bm is not None):
        return "", ()
    if element_reads:
        lines.append(f"#define CUPYFLASH_ELEMENT_READS {element_reads}")
    return "\n".join(lines) + "\n", tuple(arrays)


def element_mask(variants, listed: bool) -> tuple[bool, bool]:
    """(Does the call leave the kernels a mask to evaluate element by element (VARIANT_USER_MASK)?
    Does that mask read memory on every tile: aux arrays, the mask tensor, a block mask's kinds?) A
    block mask whose tiles are listed needs none of its own unless its partial blocks have a rule,
    and that rule's reads, on the partial tiles only, do not count (the Hopper forward at 128 keys
    spills nothing with them since session 14; with the call's own aux mask_mod it spilled 188-220
    bytes: KernelSet.with_block_list)."""
    bm = variants.block_mask
    own = variants.mask_mod is not None and any(n in variants.mask_mod.names for n, _ in variants.aux)
    rule = bm is not None and bm.mask_mod is not None
    needed = (variants.mask_mod is not None or variants.mask is not None or (bm is not None and (not listed or rule)))
    reads = own or variants.mask is not None or (bm is not None and not listed)
    return needed, reads
