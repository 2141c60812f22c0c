"""Tile selection measured on the user's own GPU (issue 21): ``cupyflash tune`` and :func:`tune`.

The built-in tile table (``_config``) was measured on one H200; other GPUs run tiles that were
only compiled offline for their architecture. ``tune`` times the candidate tiles of each
(dtype, head_dim class, mask, pass, key-length class) on the GPU that runs them, after each
candidate passed a correctness check, and writes the winners to a per-device table: JSON in
:func:`table_dir`, keyed by the device (name, compute capability, SM count) and the versions that
make a measurement stale (driver, NVRTC, cupyflash). Kernel selection then takes, in order:

1. the tuned table of the current device, unless ``CUPYFLASH_TUNE=0``; a stale table (another
   driver, NVRTC or cupyflash) is ignored with a one-line warning, never used silently;
2. the built-in table;
3. for a built-in entry that needs more shared memory than the device lets a block have,
   the shrink rule (``_config.shrink_to_fit``): keep its warps and layout, halve BLOCK_N, then
   BLOCK_M, then drop the backward's second query-tile stage, to the first tile that fits.

Only this module reads or writes tables; ``_config.kernel_set`` takes the lookup result.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import __version__, _config
from ._dtypes import BFLOAT16, FLOAT16, dtype_name

TABLE_FORMAT = 1
DISABLE_ENV = "CUPYFLASH_TUNE"   # "0": ignore tuned tables
DIR_ENV = "CUPYFLASH_TUNE_DIR"   # where tables live (default: the user's cache directory)
PASSES = ("fwd", "bwd")
LENGTHS = ("short", "long")      # key lengths up to _config.HOPPER_FWD_SHORT_SEQLEN_K, and above
#: (batch, seqlen) at which each length class is timed: 16384 tokens, heads * head_dim = 2048
TIMED_SHAPES = {"short": ((128, 128),), "long": ((16, 1024), (4, 4096))}
_CONFIG_TYPES = {t.__name__: t for t in (_config.FwdConfig, _config.BwdConfig, _config.Sm90FwdConfig,
                                         _config.Sm90BwdConfig)}


# ---- the device and where its table lives --------------------------------------------------

@dataclass(frozen=True)
class DeviceInfo:
    """What a table is measured on. The first three name the device; the last three make an
    earlier measurement stale when they change."""
    name: str
    cc: int
    sm_count: int
    smem_optin: int
    driver: int
    nvrtc: str
    cupyflash: str

    IDENTITY = ("name", "cc", "sm_count")
    VERSIONS = ("driver", "nvrtc", "cupyflash")

    @staticmethod
    def of(device_id: int = 0) -> "DeviceInfo":
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(device_id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        return DeviceInfo(name, int(cupy.cuda.Device(device_id).compute_capability), int(props["multiProcessorCount"]),
                          int(props["sharedMemPerBlockOptin"]), int(cupy.cuda.runtime.driverGetVersion()),
                          ".".join(map(str, cupy.cuda.nvrtc.getVersion())), __version__)

    def slug(self) -> str:
        return f"{re.sub(r'[^a-z0-9]+', '-', self.name.lower()).strip('-')}-sm{self.cc}-{self.sm_count}sm"

    def stale(self, recorded: dict) -> list[str]:
        """The version fields in which a table's recorded device differs from this one."""
        return [f"{f} {recorded.get(f)!r} (now {getattr(self, f)!r})" for f in self.VERSIONS
                if recorded.get(f) != getattr(self, f)]


def table_dir() -> Path:
    """$CUPYFLASH_TUNE_DIR, else $XDG_CACHE_HOME/cupyflash/tune, else ~/.cache/cupyflash/tune."""
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cupyflash" / "tune"


def table_path(device: DeviceInfo) -> Path:
    return table_dir() / f"{device.slug()}.json"


# ---- entries and configurations --------------------------------------------------------------

def entry_key(dtype, head_dim_cls: int, causal: bool, pass_: str, length: str) -> str:
    return f"{dtype_name(dtype)}/d{head_dim_cls}/{'causal' if causal else 'full'}/{pass_}/{length}"


def length_class(seqlen_k: int | None) -> str:
    return "short" if seqlen_k is not None and seqlen_k <= _config.HOPPER_FWD_SHORT_SEQLEN_K else "long"


def config_json(cfg) -> dict:
    return {"type": type(cfg).__name__, **dataclasses.asdict(cfg)}


def config_from_json(doc: dict):
    fields = dict(doc)
    kind = _CONFIG_TYPES.get(fields.pop("type", None))
    if kind is None:
        raise ValueError(f"unknown tile type in a tuned table: {doc!r}")
    return kind(**fields)


# ---- candidates ---------------------------------------------------------------------------------

_FWD_GRID = tuple(_config.FwdConfig(m, n, w) for m in (64, 128) for n in (32, 64, 128) for w in (4, 8))
_BWD_GRID = tuple(_config.BwdConfig(m, n, w, st, bal) for m in (32, 64, 128) for n in (32, 64, 128) for w in (4, 8)
                  for st in (2, 1) for bal in (True, False))
_HOPPER_FWD_GRID = tuple(_config.Sm90FwdConfig(n, wg) for n in (32, 48, 64, 96, 112, 128, 160, 192) for wg in (2, 1))
_HOPPER_BWD_GRID = tuple(_config.Sm90BwdConfig(wg, split, m) for wg in (2, 1) for split, m in
                         (("keys", 64), ("panel", 64), ("panel", 128)))


def _hopper_ok(cfg, head_dim_cls: int) -> bool:
    """The static_asserts of FwdTraitsSm90 / BwdTraitsSm90 (traits.cuh), mirrored."""
    hd = _config.Sm90FwdConfig.head_dim(head_dim_cls)
    if isinstance(cfg, _config.Sm90FwdConfig):
        return hd <= 256 and cfg.block_n % 16 == 0 and cfg.block_n <= 256
    return hd in (64, 128) and (cfg.dq_split != "panel" or cfg.block_m * hd == cfg.num_wg * 64 * 64)


def candidates(pass_: str, dtype, head_dim_cls: int, causal: bool, device: DeviceInfo, length: str = "long") -> list:
    """The tiles ``tune`` may time for one entry, the built-in choice first: valid for the kernels,
    fitting the device's shared memory per block; the wgmma kernels on compute capability 9.0 only
    (and for the forward only above the short key lengths, as the built-in table)."""
    if pass_ not in PASSES or length not in LENGTHS:
        raise ValueError(f"pass must be one of {PASSES} and length one of {LENGTHS}, got {pass_!r}, {length!r}")
    itemsize = _config.np.dtype(dtype).itemsize
    builtin = _config.kernel_set(dtype, head_dim_cls, causal, device.cc,
                                 seqlen_k=_config.HOPPER_FWD_SHORT_SEQLEN_K if length == "short" else None)
    first = builtin.fwd if pass_ == "fwd" else builtin.bwd
    if pass_ == "fwd":
        grid = _FWD_GRID + (_HOPPER_FWD_GRID if device.cc == 90 and length == "long" else ())
    else:
        grid = _BWD_GRID + (_HOPPER_BWD_GRID if device.cc == 90 else ())
    out = []
    for cfg in (first, *grid):
        hopper = isinstance(cfg, (_config.Sm90FwdConfig, _config.Sm90BwdConfig))
        ok = _hopper_ok(cfg, head_dim_cls) if hopper else _config.valid_tile(cfg, head_dim_cls)
        if ok and cfg.smem_bytes(head_dim_cls, itemsize) <= device.smem_optin and cfg not in out:
            out.append(cfg)
    return out


def spill_free(cands: list, pass_: str, dtype, head_dim_cls: int, causal: bool, cc: int, report=None) -> list:
    """The candidates whose kernel compiles for ``cc`` without spills or serialised wgmma, by the
    offline report (``report(names, arch) -> {name: row}``; default: NVRTC here, no GPU)."""
    from . import _compile
    sets = {cfg: _config.kernel_set(dtype, head_dim_cls, causal, cc, **{pass_: cfg}) for cfg in cands}
    names = {cfg: ks.fwd_name() if pass_ == "fwd" else ks.bwd_name() for cfg, ks in sets.items()}
    arch = _compile.nvrtc_arch(cc)
    rows = (report or _offline_report)(tuple(sorted(set(names.values()))), arch)
    return [cfg for cfg in cands if rows.get(names[cfg]) and not (
        rows[names[cfg]].get("spill_stores") or rows[names[cfg]].get("stack_bytes")
        or rows[names[cfg]].get("wgmma_serialized"))]


def _offline_report(names: tuple, arch: str) -> dict:
    from . import _compile
    _, log, lowered = _compile.compile_offline(list(names), arch)
    stats = _compile._parse_ptxas(log)
    return {n: stats.get(lowered[n], {}) for n in names}


# ---- the table -------------------------------------------------------------------------------

def save_table(device: DeviceInfo, entries: dict, path: Path | None = None) -> Path:
    """Write ``entries`` (entry_key -> {"config": cfg, "ms": ..., "builtin_ms": ...}) for ``device``."""
    path = path or table_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": TABLE_FORMAT, "device": dataclasses.asdict(device),
           "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "entries": {k: {**v, "config": config_json(v["config"])} for k, v in entries.items()}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)  # readers never see half a table
    return path


def load_table(device: DeviceInfo, path: Path | None = None, warn: bool = True) -> dict | None:
    """entry_key -> tile of the device's table, or None: no table, another format, another device,
    or stale versions (then one warning says which, and the built-in table is used)."""
    path = path or table_path(device)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        _warn_once(path, f"cupyflash: ignoring the tuned table {path}: unreadable ({e})", warn)
        return None
    recorded = doc.get("device", {})
    reason = None
    if doc.get("format") != TABLE_FORMAT:
        reason = f"format {doc.get('format')!r}, this cupyflash reads {TABLE_FORMAT}"
    elif any(recorded.get(f) != getattr(device, f) for f in DeviceInfo.IDENTITY):
        reason = f"measured on {recorded.get('name')!r} sm_{recorded.get('cc')}"
    elif device.stale(recorded):
        reason = "stale: " + ", ".join(device.stale(recorded))
    if reason:
        _warn_once(path, f"cupyflash: ignoring the tuned table {path} ({reason}); run `cupyflash tune` again", warn)
        return None
    try:
        return {k: config_from_json(v["config"]) for k, v in doc.get("entries", {}).items()}
    except (TypeError, ValueError, KeyError) as e:
        _warn_once(path, f"cupyflash: ignoring the tuned table {path}: bad entry ({e})", warn)
        return None


_WARNED: set = set()


def _warn_once(path, message: str, warn: bool) -> None:
    if warn and str(path) not in _WARNED:
        _WARNED.add(str(path))
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def _device_table(device_id: int):
    try:
        return load_table(DeviceInfo.of(device_id))
    except Exception as e:  # no home directory, an odd driver: never a reason for a call to fail
        _warn_once(f"device {device_id}", f"cupyflash: tuned tables are not read on GPU {device_id} ({e})", True)
        return None


def active_table(device_id: int) -> dict | None:
    """The tuned tiles the kernels of ``device_id`` use (read once per process), or None."""
    if os.environ.get(DISABLE_ENV) == "0":
        return None
    return _device_table(device_id)


def table_status(device: DeviceInfo) -> str:
    """Which table kernel selection uses on ``device``, in words (``cupyflash info``)."""
    path = table_path(device)
    if os.environ.get(DISABLE_ENV) == "0":
        return f"built-in ({DISABLE_ENV}=0 ignores tuned tables)"
    table = load_table(device, warn=False)
    if table is not None:
        return f"tuned: {path} ({len(table)} entries), then built-in"
    if path.exists():
        return f"built-in (the tuned table {path} is ignored: run `cupyflash tune` again)"
    return f"built-in (no tuned table at {path}; `cupyflash tune` writes one)"


def clear_cache() -> None:
    """Forget the tables read so far (a new table takes effect in this process)."""
    _device_table.cache_clear()
    _WARNED.clear()


# ---- measuring -------------------------------------------------------------------------------

@dataclass
class TuneRow:
    key: str
    builtin: object
    chosen: object
    builtin_ms: float | None
    chosen_ms: float | None
    candidates: int

    @property
    def speedup(self) -> float | None:
        return self.builtin_ms / self.chosen_ms if self.builtin_ms and self.chosen_ms else None


def plan(dtypes=(BFLOAT16, FLOAT16), head_dims=(64, 128), causal=(False, True), passes=PASSES,
         device: DeviceInfo | None = None) -> list[tuple]:
    """(entry key, pass, dtype, head_dim class, causal, length, candidates) of each entry a tune
    run would time (the candidates before the spill check)."""
    device = device or DeviceInfo.of()
    out = []
    for dtype in dtypes:
        for hd in head_dims:
            cls = _config.head_dim_class(hd)
            for c in causal:
                for pass_ in passes:
                    for length in (LENGTHS if pass_ == "fwd" else ("long",)):
                        cands = candidates(pass_, dtype, cls, c, device, length)
                        out.append((entry_key(dtype, cls, c, pass_, length), pass_, dtype, cls, c, length, cands))
    return out


def tune(dtypes=(BFLOAT16, FLOAT16), head_dims=(64, 128), causal=(False, True), passes=PASSES,
         budget: float | None = None, device_id: int = 0, progress=None, report=None,
         started: float | None = None) -> list[TuneRow]:
    """Time the candidate tiles on GPU ``device_id`` and write the winners to its table.

    Each candidate must compile without spills (offline report) and match float64 attention
    within flash-attn's bound on a small problem before it is timed; the built-in choice is
    timed too, and a candidate replaces it only when faster at every timed shape's sum.
    ``budget`` (seconds) stops the run early: no candidate starts that would end past it at the
    pace of the slowest so far (_Budget); the entries measured so far are written. The budget
    counts from ``started`` (a ``time.monotonic()`` value; default: this call), so that a command
    line can count its own start-up (process_started()).
    ``progress(done, total, key)`` is called after each entry. Returns one TuneRow per entry.
    """
    import cupy
    device = DeviceInfo.of(device_id)
    clock = _Budget(budget, started=started)
    entries, rows = {}, []
    todo = plan(dtypes, head_dims, causal, passes, device)
    old = load_table(device, warn=False) or {}
    with cupy.cuda.Device(device_id):
        for done, (key, pass_, dtype, cls, c, length, cands) in enumerate(todo, 1):
            if not clock.allows():
                break
            builtin = cands[0]
            timed = {}
            for cfg in spill_free(cands, pass_, dtype, cls, c, device.cc, report):
                if not clock.allows():
                    break
                with clock.step():
                    if _accurate(cfg, pass_, dtype, cls, c):
                        timed[cfg] = _time_config(cfg, pass_, dtype, cls, c, length)
            if timed:
                chosen = min(timed, key=timed.get)
                entries[key] = {"config": chosen, "ms": timed[chosen], "builtin_ms": timed.get(builtin),
                                "builtin": config_json(builtin), "candidates": len(timed)}
                rows.append(TuneRow(key, old.get(key, builtin), chosen, timed.get(builtin), timed[chosen], len(timed)))
            if progress:
                progress(done, len(todo), key)
    if entries:
        previous = {k: {"config": v} for k, v in old.items()}
        save_table(device, {**previous, **entries})
        clear_cache()
    return rows


class _Budget:
    """The tuner's time budget: a step (one candidate's compile, check and timing) starts only when
    the slowest step so far would still end within it (None: no budget)."""

    def __init__(self, seconds: float | None, clock=time.monotonic, started: float | None = None):
        self.seconds, self.clock = seconds, clock
        self.started = clock() if started is None else started
        self.longest = 0.0

    def allows(self) -> bool:
        return self.seconds is None or self.clock() - self.started + self.longest <= self.seconds

    @contextlib.contextmanager
    def step(self):
        t0 = self.clock()
        try:
            yield
        finally:
            self.longest = max(self.longest, self.clock() - t0)


def process_started(clock=time.monotonic) -> float:
    """When this process started, on ``clock``'s scale: its age from /proc/self/stat (start time in
    clock ticks since boot) against CLOCK_BOOTTIME; now where that is unavailable (not Linux)."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(after_name[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        age = 0.0
    return clock() - max(age, 0.0)


def _inputs(dtype, cls: int, batch: int, seqlen: int):
    import cupy
    import numpy as np
    heads = max(1, 2048 // cls)
    rng = np.random.default_rng(0)
    return [cupy.asarray(rng.standard_normal((batch, seqlen, heads, cls), dtype=np.float32).astype(dtype))
            for _ in range(4)]


def _run(cfg, pass_: str, q, k, v, do, causal: bool):
    from . import _cuda_backend
    scale = q.shape[3] ** -0.5
    if pass_ == "fwd":
        return lambda: _cuda_backend.forward(q, k, v, causal=causal, scale=scale, fwd_config=cfg)
    o, l = _cuda_backend.forward(q, k, v, causal=causal, scale=scale)
    return lambda: _cuda_backend.backward(do, q, k, v, o, l, causal=causal, scale=scale, bwd_config=cfg)


def _accurate(cfg, pass_: str, dtype, cls: int, causal: bool) -> bool:
    """The candidate's outputs on a (1, 300, 2, head_dim) problem within flash-attn's bound
    (2x naive attention's error in the same precision, plus one rounding) of float64."""
    import cupy
    import numpy as np
    from . import reference
    q, k, v, do = (cupy.asnumpy(x)[:1, :300, :2] for x in _inputs(dtype, cls, 1, 300))
    gq, gk, gv, gdo = (cupy.asarray(x) for x in (q, k, v, do))
    got = _run(cfg, pass_, gq, gk, gv, gdo, causal)()
    if pass_ == "fwd":
        got, want, naive = [got[0]], [reference.attention(q, k, v, causal=causal)[0]], \
            [reference.attention(q, k, v, causal=causal, upcast=False)[0]]
    else:
        want = reference.attention_backward(do, q, k, v, causal=causal)
        naive = reference.attention_backward(do, q, k, v, causal=causal, upcast=False)
    eps = float(np.finfo(np.float32).eps) * 32 + (2.0 ** -7 if dtype == BFLOAT16 else 2.0 ** -10)
    for g, w, n in zip(got, want, naive):
        g, w, n = (np.asarray(cupy.asnumpy(x) if not isinstance(x, np.ndarray) else x, np.float64) for x in (g, w, n))
        if not np.all(np.isfinite(g)) or np.abs(g - w).max() > 2 * np.abs(n - w).max() + eps * max(1.0, np.abs(w).max()):
            return False
    return True


def _time_config(cfg, pass_: str, dtype, cls: int, causal: bool, length: str) -> float:
    """Sum over TIMED_SHAPES[length] of the median ms of back-to-back calls."""
    import cupy
    from .bench import CudaEventTimer
    import statistics
    timer = CudaEventTimer(cupy.cuda.get_current_stream())
    total = 0.0
    for batch, seqlen in TIMED_SHAPES[length]:
        fn = _run(cfg, pass_, *_inputs(dtype, cls, batch, seqlen), causal)
        total += statistics.median(timer(fn, warmup=2, repeats=10, max_seconds=1.0))
    return total
