"""Compile every kernel instantiation offline (no GPU needed) and report its resources.

Uses the low-level NVRTC bindings that CuPy ships, with the CUDA headers of the NVIDIA
wheels that ``cupy-cuda13x[ctk]`` installs, so CI can check for sm_80 and sm_90 that every
kernel compiles, how many registers it uses and that the main kernels do not spill.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from . import _config
from ._dtypes import BFLOAT16, FLOAT16, FLOAT32, dtype_name
from ._sources import kernel_source

#: options handed to NVRTC by both the runtime launcher (RawModule) and the offline compiler
NVRTC_OPTIONS = ("-std=c++17",)


def nvrtc_arch(cc: int) -> str:
    """The architecture the kernels are built for on compute capability ``cc``: sm_90 becomes
    sm_90a, whose wgmma and setmaxnreg instructions the Hopper kernels use."""
    return "sm_90a" if cc == 90 else f"sm_{cc}"


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\S+)'")
# ptxas infos C7511-C7513: it could not keep the wgmma instructions asynchronous
_SERIALIZED = re.compile(r"wgmma.mma_async instructions are serialized.*function '(\S+)'")
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def cuda_include_dirs() -> list[str]:
    """CUDA headers as CuPy would find them: the NVIDIA wheels first, then CUDA_PATH."""
    dirs = []
    try:
        import nvidia
        for root in nvidia.__path__:
            for sub in ("cu13", "cu12", "cuda_runtime"):
                inc = Path(root) / sub / "include"
                if (inc / "cuda_fp16.h").is_file():
                    dirs.append(str(inc))
    except ImportError:
        pass
    cuda_path = os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    if (Path(cuda_path) / "include" / "cuda_fp16.h").is_file():
        dirs.append(str(Path(cuda_path) / "include"))
    return dirs


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except Exception as e:  # CuPy missing or its NVRTC library not loadable
        raise RuntimeError("offline compilation needs CuPy with NVRTC: pip install 'cupyflash[cuda13]'") from e
    return nvrtc


def compile_offline(name_expressions, arch: str, extra_options=(), user: str = ""):
    """Compile the kernel source for ``arch`` (e.g. 'sm_90'), after ``user`` (the source of a call's
    mask_mod and bias_mod, _sources.user_terms); returns (ptx, log, {name: lowered})."""
    nvrtc = _nvrtc()
    if not re.fullmatch(r"sm_\d+a?", arch):
        raise ValueError(f"arch must look like 'sm_90' or 'sm_90a', got {arch!r}")
    incs = cuda_include_dirs()
    if not incs:
        raise RuntimeError("CUDA headers not found: install 'cupyflash[cuda13]' (the NVIDIA wheels) or set CUDA_PATH")
    prog = nvrtc.createProgram(user + kernel_source(), "cupyflash_kernels.cu", [], [])
    try:
        for n in name_expressions:
            nvrtc.addNameExpression(prog, n)
        opts = [*NVRTC_OPTIONS, f"-arch={arch}", "-ftz=true", *[f"-I{d}" for d in incs],
                "-Xptxas", "-v", *extra_options]
        try:
            nvrtc.compileProgram(prog, opts)
        except Exception as e:
            raise RuntimeError(f"NVRTC failed for {arch}:\n{nvrtc.getProgramLog(prog)}") from e
        log = nvrtc.getProgramLog(prog)
        lowered = {n: nvrtc.getLoweredName(prog, n) for n in name_expressions}
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return (ptx.decode() if isinstance(ptx, bytes) else ptx), log, lowered


def _parse_ptxas(log: str) -> dict:
    """{mangled name: {registers, spill_stores, spill_loads, stack_bytes, shared_bytes}} from a ptxas -v log."""
    out: dict = {}
    current = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1)
            out.setdefault(current, {})  # ptxas may have reported on it already (C7512 comes first)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            out[current].update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = _SERIALIZED.search(line)
        if m:
            out.setdefault(m.group(1), {})["wgmma_serialized"] = True
            continue
        m = _USED.search(line)
        if m and current:
            out[current].update(registers=int(m.group(1)), shared_bytes=int(m.group(2) or 0))
    return out


def _kind(name: str) -> str:
    for key, kind in (("preprocess", "bwd_preprocess"), ("convert", "bwd_convert"), ("bwd_dq", "bwd_dq"), ("bwd", "bwd"),
                      ("fwd", "fwd"), ("combine", "decode_combine"), ("decode", "decode")):
        if key in name:
            return kind
    return "other"


def arch_cc(arch: str) -> int:
    """'sm_90' or 'sm_90a' -> 90."""
    return int(re.fullmatch(r"sm_(\d+)a?", arch).group(1))


def _kernel_sets(arch: str, dtypes=None, head_dims=None):
    if not re.fullmatch(r"sm_\d+a?", arch):
        raise ValueError(f"arch must look like 'sm_90' or 'sm_80', got {arch!r}")
    dtypes = [FLOAT16, BFLOAT16, FLOAT32] if dtypes is None else [_config.np.dtype(d) for d in dtypes]
    head_dims = list(_config.HEAD_DIM_CLASSES) if head_dims is None else [int(h) for h in head_dims]
    cc = arch_cc(arch)
    short = _config.HOPPER_FWD_SHORT_SEQLEN_K  # the forward of short problems too
    dense = tuple(_config.kernel_set(dt, hd, causal, cc, deterministic=det, seqlen_k=sk)
                  for dt in dtypes for hd in head_dims for causal in (False, True) for det in (False, True)
                  for sk in (None, short))
    variant_dims = [hd for hd in head_dims if hd in VARIANT_HEAD_DIMS] or head_dims[:1]
    # on sm_90 both loaders: TMA (the default) and cp.async (DECODE_TMA off, every other GPU's)
    configs = [(hd, _config.decode_config(hd, rows, dt.itemsize, cc, tma=tma), dt) for dt in dtypes if dt != FLOAT32
               for hd in head_dims for rows in (16, 32) for tma in ((False, True) if cc == 90 else (False,))]
    decode = tuple(_config.DecodeSet(dt, hd, cfg, bits, paged) for hd, cfg, dt in configs
                   for bits in DECODE_VARIANTS for paged in (False, True))
    return dense + tuple(_config.kernel_set(dt, hd, False, cc, seqlen_k=sk, variant=bits)
                         for dt in dtypes for hd in variant_dims for bits in CHECKED_VARIANTS
                         for sk in (None, short)) + tuple(dict.fromkeys(decode))


#: the variant instantiations the offline check compiles besides the dense and causal ones: each
#: variant alone and the combinations of today's models (Mistral's causal window, Gemma 2's
#: causal softcap, gpt-oss's window with sinks, MPT's causal ALiBi), packed sequences, at these head dims
CHECKED_VARIANTS = (_config.MASK_WINDOW, _config.VARIANT_SOFTCAP, _config.VARIANT_ALIBI, _config.VARIANT_SINKS,
                    _config.MASK_CAUSAL | _config.VARIANT_SOFTCAP, _config.MASK_WINDOW | _config.VARIANT_SINKS,
                    _config.MASK_CAUSAL | _config.VARIANT_ALIBI,
                    # packed sequences (varlen) alone, causal, and with gpt-oss's window and sinks
                    _config.VARIANT_VARLEN, _config.MASK_CAUSAL | _config.VARIANT_VARLEN,
                    _config.MASK_WINDOW | _config.VARIANT_SINKS | _config.VARIANT_VARLEN)
VARIANT_HEAD_DIMS = (64, 128, 256)
#: the decode kernel's variants checked: a full cache, decode's causal with per-sequence lengths,
#: gpt-oss's window with sinks, and Gemma 2's softcap with ALiBi
DECODE_VARIANTS = (_config.MASK_NONE, _config.MASK_CAUSAL | _config.VARIANT_KVLEN,
                   _config.MASK_WINDOW | _config.VARIANT_SINKS | _config.VARIANT_KVLEN,
                   _config.MASK_CAUSAL | _config.VARIANT_SOFTCAP | _config.VARIANT_ALIBI | _config.VARIANT_KVLEN)


@functools.lru_cache(maxsize=8)
def _compile_sets(arch: str, sets: tuple):
    names = sorted({n for ks in sets for n in ks.name_expressions()})
    ptx, log, lowered = compile_offline(names, nvrtc_arch(arch_cc(arch)))
    return ptx, _parse_ptxas(log), lowered


def kernel_ptx(arch: str = "sm_90", dtypes=None, head_dims=None) -> str:
    """The PTX of every instantiation ``arch`` would run (to check which instructions it uses)."""
    return _compile_sets(arch, _kernel_sets(arch, dtypes, head_dims))[0]


def compile_report(arch: str = "sm_90", dtypes=None, head_dims=None) -> list[dict]:
    """Compile every instantiation that ``arch`` would run, with no GPU, and report each kernel.

    Returns one dict per kernel: kernel, kind (fwd, bwd, bwd_dq, bwd_preprocess, bwd_convert, decode,
    decode_combine, other), dtype,
    head_dim (the compile-time class), causal, arch, registers, spill_stores, spill_loads,
    stack_bytes, shared_bytes (static), dynamic_shared_bytes (what the launcher requests),
    wgmma_serialized (ptxas had to make the Hopper kernel's wgmma instructions synchronous).
    """
    sets = _kernel_sets(arch, dtypes, head_dims)
    _, stats, lowered = _compile_sets(arch, sets)
    rows, done = [], set()
    for ks in sets:
        if isinstance(ks, _config.DecodeSet):
            dyn = {ks.decode_name(): ks.smem()}
        else:
            dyn = {ks.fwd_name(): ks.fwd_smem(), ks.bwd_name(): ks.bwd_smem()}
            if ks.deterministic:
                dyn[ks.dq_name()] = ks.dq_smem()
        for n in ks.name_expressions():
            if n in done:
                continue
            done.add(n)
            s = stats.get(lowered[n], {})
            rows.append({
                "kernel": n, "kind": _kind(n), "dtype": dtype_name(ks.dtype), "head_dim": ks.head_dim_cls,
                "causal": bool(ks.variant & 3) if n in dyn else None, "variant": _config.variant_text(ks.variant) if n in dyn else None,
                "arch": arch,
                "registers": s.get("registers", -1), "spill_stores": s.get("spill_stores", 0),
                "spill_loads": s.get("spill_loads", 0), "stack_bytes": s.get("stack_bytes", 0),
                "shared_bytes": s.get("shared_bytes", 0), "dynamic_shared_bytes": dyn.get(n, 0),
                "wgmma_serialized": s.get("wgmma_serialized", False),
            })
    return rows
