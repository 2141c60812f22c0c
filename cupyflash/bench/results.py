"""The result schema, the system description (the GPU, the versions, the kernel cache) and the
writers (JSON document, CSV rows, terminal tables, plot)."""
from __future__ import annotations

import csv
import datetime
import importlib
import json
import math
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .problem import Case, FLOP_CONVENTION, MODES
from .errors import short_error


RESULT_FIELDS = ("impl", "mode", "dtype", "batch", "heads", "seqlen_q", "seqlen_k", "head_dim",
                 "causal", "variant", "ms_median", "ms_min", "ms_max", "tflops", "peak_extra_mb",
                 "repeats", "timer", "status", "note")
STATUSES = ("ok", "skipped", "failed", "oom")
SCHEMA = "cupyflash-bench/2"  # /1 had no "variant" (its rows read as plain attention)
DOCUMENT_FIELDS = ("schema", "gpu", "versions", "date", "command", "settings", "results")


@dataclass
class Result:
    """One row: one implementation on one case. Times in milliseconds; None when not timed."""
    impl: str
    mode: str
    dtype: str
    batch: int
    heads: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    causal: bool
    variant: str = ""  # Variant.describe: '' for plain attention
    ms_median: float | None = None
    ms_min: float | None = None
    ms_max: float | None = None
    tflops: float | None = None
    peak_extra_mb: float | None = None
    repeats: int = 0
    timer: str = ""
    status: str = "ok"
    note: str = ""

    @classmethod
    def of(cls, case: Case, impl: str, status: str, note: str = "", **kw) -> "Result":
        return cls(impl, case.mode, case.dtype, case.batch, case.heads, case.seqlen_q,
                   case.seqlen_k, case.head_dim, case.causal, case.variant_text, status=status,
                   note=note, **kw)

    @classmethod
    def timed(cls, case: Case, impl: str, times_ms: Sequence[float], timer: str,
              peak_bytes: int | None, note: str = "") -> "Result":
        med = statistics.median(times_ms)
        return cls.of(case, impl, "ok", note, ms_median=med, ms_min=min(times_ms),
                      ms_max=max(times_ms), tflops=case.flops / (med * 1e-3) / 1e12,
                      peak_extra_mb=None if peak_bytes is None else peak_bytes / 2**20,
                      repeats=len(times_ms), timer=timer)

    @property
    def case_key(self) -> tuple:
        return (self.mode, self.dtype, self.batch, self.heads, self.seqlen_q, self.seqlen_k,
                self.head_dim, self.causal, self.variant)

    def to_dict(self) -> dict:
        return asdict(self)


def _cuda_version_text(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}" if v else "none"


def gpu_info(device_id: int = 0) -> dict:
    """Name, compute capability, multiprocessors, shared memory per block (opt-in), memory."""
    import cupy
    p = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
    with cupy.cuda.Device(device_id):
        free, total = cupy.cuda.runtime.memGetInfo()
    return {"device_id": device_id, "name": name, "cc": f"{p['major']}.{p['minor']}",
            "sm_count": int(p["multiProcessorCount"]),
            "shared_mem_per_block_optin": int(p.get("sharedMemPerBlockOptin", 0)),
            "memory_bytes": int(total), "memory_free_bytes": int(free),
            "memory_gib": round(total / 2**30, 1)}


def _try(fn, default=None):
    try:
        return fn()
    except Exception:
        return default


def _dist_version(name: str) -> str | None:
    from importlib import metadata
    return _try(lambda: metadata.version(name))


def versions(peers: Iterable[str] = ()) -> dict:
    """cupyflash, CuPy, CUDA runtime / driver / NVRTC, NumPy, Python; torch/jax for those peers."""
    from .. import __version__
    out: dict[str, Any] = {"cupyflash": __version__, "numpy": np.__version__,
                           "python": platform.python_version()}
    try:
        import cupy
        out["cupy"] = cupy.__version__
        out["cuda_runtime"] = _try(lambda: _cuda_version_text(cupy.cuda.runtime.runtimeGetVersion()))
        out["driver"] = _try(lambda: _cuda_version_text(cupy.cuda.runtime.driverGetVersion()))
        out["nvrtc"] = _try(lambda: ".".join(map(str, cupy.cuda.nvrtc.getVersion())))
    except Exception as e:
        out["cupy"] = f"not importable ({short_error(e)})"
    peers = set(peers)
    if peers & {"torch-flash", "torch-cudnn", "fa4"}:
        out["torch"] = _dist_version("torch")
        torch = sys.modules.get("torch")
        if torch is not None:
            out["torch_cuda"] = torch.version.cuda
            out["torch_cudnn"] = _try(lambda: torch.backends.cudnn.version())
    if "jax-cudnn" in peers:
        out["jax"] = _dist_version("jax")
        out["jaxlib"] = _dist_version("jaxlib")
    if "fa4" in peers:
        out["flash_attn_4"] = _dist_version("flash-attn-4")
    return out


def cache_info() -> dict:
    """CuPy's kernel cache directory (CUPY_CACHE_DIR or ~/.cupy/kernel_cache) and its size."""
    path = Path(os.environ.get("CUPY_CACHE_DIR") or Path.home() / ".cupy" / "kernel_cache")
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return {"dir": str(path), "exists": path.is_dir(), "files": len(files),
            "bytes": sum(_try(lambda p=p: p.stat().st_size, 0) for p in files)}


def results_document(results: Sequence[Result], *, command: Sequence[str], gpu: dict | None,
                     versions: dict, settings: dict | None = None, date: str | None = None) -> dict:
    """The JSON document: where, what with, when, how invoked, and every row."""
    return {"schema": SCHEMA, "gpu": gpu, "versions": versions,
            "date": date or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": list(command),
            "settings": {"flops": FLOP_CONVENTION, **(settings or {})},
            "results": [r.to_dict() for r in results]}


def upgrade_document(doc: dict) -> dict:
    """A cupyflash-bench/1 document in this schema: its rows gain variant '' (plain attention)."""
    if doc.get("schema") == "cupyflash-bench/1":
        doc = {**doc, "schema": SCHEMA, "results": [
            {k: row.get(k, "") for k in RESULT_FIELDS} if set(row) == set(RESULT_FIELDS) - {"variant"} else row
            for row in doc.get("results", [])]}
    return doc


def validate_document(doc: dict) -> None:
    """Raise ValueError naming the first thing that does not follow the schema."""
    missing = [k for k in DOCUMENT_FIELDS if k not in doc]
    if missing:
        raise ValueError(f"document lacks {missing}")
    for i, row in enumerate(doc["results"]):
        if tuple(row) != RESULT_FIELDS:
            raise ValueError(f"results[{i}] has fields {tuple(row)}, expected {RESULT_FIELDS}")
        if row["status"] not in STATUSES:
            raise ValueError(f"results[{i}] has status {row['status']!r}, not one of {STATUSES}")
        if row["status"] == "ok" and not (row["ms_median"] and row["tflops"]):
            raise ValueError(f"results[{i}] is ok but has no time")


def write_json(path: str | Path, doc: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def load_results(path: str | Path) -> tuple[dict, list[Result]]:
    doc = upgrade_document(json.loads(Path(path).read_text()))
    validate_document(doc)
    return doc, [Result(**row) for row in doc["results"]]


def write_csv(path: str | Path, results: Sequence[Result]) -> None:
    """One row per result, the header fixed to RESULT_FIELDS; None is an empty cell."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
        w.writeheader()
        for r in results:
            w.writerow({k: ("" if v is None else v) for k, v in r.to_dict().items()})


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _fmt_tflops(x: float | None) -> str:
    """One decimal from 10 TFLOP/s up, three significant digits below."""
    return "-" if x is None else format(x, ".1f" if x >= 10 else ".3g")


def format_grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _baseline(results: Sequence[Result]) -> dict:
    return {r.case_key: r for r in results if r.impl == "cupyflash" and r.status == "ok"}


def speedup(flash: Result | None, peer: Result) -> float | None:
    """cupyflash's speed-up over a peer: peer time / cupyflash time (None if either missing)."""
    if flash is None or peer.status != "ok" or not flash.ms_median or not peer.ms_median:
        return None
    return peer.ms_median / flash.ms_median


def format_table(results: Sequence[Result]) -> str:
    """One line per (case, implementation): times, TFLOP/s, memory, cupyflash's speed-up."""
    base = _baseline(results)
    variants = _has_variants(results)
    header = ["mode", "dtype", "B", "H", "Sq", "Sk", "D", "causal", *["variant"] * variants, "impl",
              "median ms", "min ms", "max ms", "TFLOP/s", "peak MB", "cupyflash speed-up", "status / note"]
    rows, last = [], None
    for r in results:
        case_cells = [r.mode, r.dtype, str(r.batch), str(r.heads), str(r.seqlen_q),
                      str(r.seqlen_k), str(r.head_dim), "yes" if r.causal else "no",
                      *[r.variant or "-"] * variants]
        if r.case_key == last:
            case_cells = [""] * len(case_cells)
        last = r.case_key
        x = None if r.impl == "cupyflash" else speedup(base.get(r.case_key), r)
        status = r.note if r.status == "ok" else ": ".join(filter(None, [r.status, r.note]))
        rows.append(case_cells + [r.impl, _fmt(r.ms_median, ".3f"), _fmt(r.ms_min, ".3f"),
                                  _fmt(r.ms_max, ".3f"), _fmt_tflops(r.tflops),
                                  _fmt(r.peak_extra_mb, ".1f"), "-" if x is None else f"{x:.2f}x",
                                  status])
    return format_grid(header, rows)


def _has_variants(results: Sequence[Result]) -> bool:
    """Whether any row is more than plain attention (tables then show a variant column)."""
    return any(r.variant for r in results)


def format_comparison(results: Sequence[Result]) -> str:
    """One line per case: cupyflash's TFLOP/s, then each peer's with cupyflash's ratio to it."""
    impls = list(dict.fromkeys(r.impl for r in results))
    peers = [i for i in impls if i != "cupyflash"]
    by_case: dict[tuple, dict[str, Result]] = {}
    for r in results:
        by_case.setdefault(r.case_key, {})[r.impl] = r
    variants = _has_variants(results)
    header = ["mode", "dtype", "D", "causal", *["variant"] * variants, "Sq", "cupyflash TF/s"]
    header += [f"{p} TF/s (x)" for p in peers]
    rows = []
    for key, row in by_case.items():
        mode, dtype, _, _, sq, _, d, causal, variant = key
        flash = row.get("cupyflash")
        cells = [mode, dtype, str(d), "yes" if causal else "no", *[variant or "-"] * variants, str(sq),
                 _fmt_tflops(flash.tflops) if flash and flash.status == "ok" else (flash.status if flash else "-")]
        for p in peers:
            r = row.get(p)
            if r is None or r.status != "ok":
                cells.append(r.status if r else "-")
                continue
            x = speedup(flash, r)
            cells.append(_fmt_tflops(r.tflops) + (f" ({x:.2f}x)" if x else ""))
        rows.append(cells)
    return format_grid(header, rows)


class PlotUnavailable(RuntimeError):
    """matplotlib is missing."""


PLOT_HINT = "plotting needs matplotlib: pip install 'cupyflash[plot]' (or pip install matplotlib)"


def require_matplotlib() -> None:
    """Raise PlotUnavailable with the install hint when matplotlib cannot be imported."""
    try:
        importlib.import_module("matplotlib")
    except Exception as e:
        raise PlotUnavailable(f"{PLOT_HINT} ({short_error(e)})") from None


def plot_results(results: Sequence[Result], path: str | Path, *, title: str = "") -> None:
    """TFLOP/s against seqlen, one panel per (dtype, head_dim, causal, mode, variant), one line per
    implementation."""
    require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok"]
    panels = sorted({(r.dtype, r.head_dim, r.causal, MODES.index(r.mode), r.variant) for r in ok})
    if not panels:
        raise ValueError("no successful results to plot")
    impls = list(dict.fromkeys(r.impl for r in results))
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (dtype, d, causal, m, variant) in zip(axes.flat, panels):
        for impl in impls:
            pts = sorted((r.seqlen_q, r.tflops) for r in ok if r.impl == impl and
                         (r.dtype, r.head_dim, r.causal, r.mode, r.variant) == (dtype, d, causal, MODES[m], variant))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl,
                        linewidth=2.5 if impl == "cupyflash" else 1.2)
        ax.set_xscale("log", base=2)
        seqlens = sorted({r.seqlen_q for r in ok})
        ax.set_xticks(seqlens, [f"{s // 1024}k" if s >= 1024 and s % 1024 == 0 else str(s) for s in seqlens])
        ax.minorticks_off()
        ax.set_title(f"{MODES[m]}, {dtype}, head_dim {d}{', causal' if causal else ''}"
                     f"{', ' + variant if variant else ''}", fontsize=9)
        ax.set_xlabel("seqlen")
        ax.set_ylabel("TFLOP/s")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(title or "cupyflash vs peers", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
