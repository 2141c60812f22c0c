"""The ``cupyflash`` command: benchmark, check and describe cupyflash on this machine.

The installed ``cupyflash`` console script, ``python -m cupyflash`` and, in a checkout,
``python cli.py`` run the same click application, :func:`main`. The machinery lives in
:mod:`cupyflash.bench`.
"""
from __future__ import annotations

import contextlib
import math
import re
import sys

import click

from . import __version__, bench
from ._checks import HEAD_DIM_MULTIPLE, MAX_HEAD_DIM

GPU_DTYPES = ("bfloat16", "float16", "float32")
CPU_DTYPES = GPU_DTYPES + ("float64",)
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                 "float": "float32", "fp64": "float64", "double": "float64"}


# ---------------------------------------------------------------------------------------
# Option types: comma lists that click validates (usage error, exit 2, naming the option)

class CommaChoice(click.ParamType):
    """Comma-separated values from a fixed set; repeated options add up. 'all' means every one."""
    name = "choice-list"

    def __init__(self, choices, aliases=None, extra=None):
        self.choices = tuple(choices)
        self.aliases = dict(aliases or {})
        self.extra = dict(extra or {})  # e.g. {"all": choices, "none": ()}

    def get_metavar(self, param, ctx=None):
        return "[" + "|".join(self.choices) + "],..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        out = []
        for item in str(value).replace(" ", "").lower().split(","):
            item = self.aliases.get(item, item)
            if item in self.extra:
                out.extend(self.extra[item])
            elif item in self.choices:
                out.append(item)
            else:
                self.fail(f"{item!r} is not one of {', '.join(self.choices + tuple(self.extra))}",
                          param, ctx)
        return tuple(out)


class IntList(click.ParamType):
    """N, N,M,..., START:STOP (doubling) or START:STOP:STEP; positive; optional extra rule."""
    name = "int-list"

    def __init__(self, rule=None):
        self.rule = rule  # callable(int) -> error text or None

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            values = bench.parse_int_list(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)  # the message quotes the offending item
        for v in values:
            if self.rule and (msg := self.rule(v)):
                self.fail(f"{v}: {msg}", param, ctx)
        return values


class Window(click.ParamType):
    """L,R: a sliding window's left and right extents, integers >= 0 or -1 (unbounded)."""
    name = "L,R"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            left, right = (int(x) for x in str(value).replace(" ", "").split(","))
        except ValueError:
            self.fail(f"{value!r} is not L,R (two integers, -1 for unbounded)", param, ctx)
        if min(left, right) < -1:
            self.fail(f"{value!r}: each side is >= 0, or -1 for unbounded", param, ctx)
        return left, right


def _softcap(ctx, param, value):
    if not (math.isfinite(value) and value >= 0):
        raise click.BadParameter(f"{value} is not a finite number >= 0 (0 = off)", ctx, param)
    return value


def variant_options(command):
    """The variant flags of bench and check: --kv-heads, --window, --softcap, --alibi, --sinks."""
    options = [
        click.option("--kv-heads", type=click.IntRange(min=1),
                     help="Key/value heads (grouped-query attention); must divide the heads [default: = heads]."),
        click.option("--window", type=Window(), default="-1,-1", show_default=True,
                     help="Sliding window L,R: query i sees keys i+o-L .. i+o+R, o = Sk - Sq; -1 unbounded."),
        click.option("--softcap", type=float, default=0.0, show_default=True, callback=_softcap,
                     help="Softcap X: each scaled score s becomes X*tanh(s/X); 0 = off."),
        click.option("--alibi", is_flag=True, help="ALiBi with the standard slopes 2^(-8(h+1)/H)."),
        click.option("--sinks", is_flag=True, help="One float32 sink logit per head, random (from --seed)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _check_kv_heads(cases) -> None:
    """--kv-heads must divide every case's number of heads."""
    if bad := sorted({c.heads for c in cases if c.heads % c.heads_kv}):
        raise click.BadParameter(f"{cases[0].heads_kv} does not divide the number of heads "
                                 f"({', '.join(map(str, bad))})", param_hint="'--kv-heads'")


def _head_dim_rule(d: int):
    if d % HEAD_DIM_MULTIPLE or d > MAX_HEAD_DIM:
        return f"head_dim must be a multiple of {HEAD_DIM_MULTIPLE} from {HEAD_DIM_MULTIPLE} to {MAX_HEAD_DIM}"
    return None


def _merge(lists, default):
    """Values of a multiple=True list option, flattened and deduplicated (default if none)."""
    out = [v for values in lists for v in values]
    return list(dict.fromkeys(out)) if out else list(default)


HEAD_DIMS = IntList(_head_dim_rule)
SEQLENS = IntList()
MODES = CommaChoice(bench.MODES, extra={"all": bench.MODES})
PEERS = CommaChoice(bench.PEERS, extra={"all": bench.PEERS, "none": ()})


def _dtype_type(choices, all_means=None):
    return CommaChoice(choices, aliases=DTYPE_ALIASES, extra={"all": all_means or choices})


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


# ---------------------------------------------------------------------------------------

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cupyflash")
def main():
    """cupyflash: exact FlashAttention on CuPy (and NumPy).

    Benchmark it beside the peers you would otherwise pick (bench), check it on this
    device (check), describe this machine (info) or its compiled kernels (kernels), or
    time the kernels' tiles on this GPU and remember the fastest (tune).
    Run `cupyflash COMMAND --help` for each command's options.
    """


# ---------------------------------------------------------------------------------------
# info

def _kernel_paths(device_id: int):
    """[(dtype, 'first-last' head dims, path)], or a sentence saying why not."""
    try:
        from cupyflash import _cuda_backend
        kernel_path = _cuda_backend.kernel_path
    except Exception as e:
        return f"not available (cupyflash._cuda_backend.kernel_path: {bench.short_error(e)})"
    rows = []
    try:
        for dtype in GPU_DTYPES:
            groups = []  # [first, last, path]
            for d in range(HEAD_DIM_MULTIPLE, MAX_HEAD_DIM + 1, HEAD_DIM_MULTIPLE):
                path = str(kernel_path(bench.DTYPES[dtype], d, device=device_id))
                if groups and groups[-1][2] == path:
                    groups[-1][1] = d
                else:
                    groups.append([d, d, path])
            rows += [(dtype, f"{a}" if a == b else f"{a}-{b}", p) for a, b, p in groups]
    except Exception as e:
        return f"not available ({bench.short_error(e)})"
    return rows


def _size_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@main.command()
@click.option("--device", "device_id", type=click.IntRange(min=0), default=0, show_default=True,
              help="CUDA device to describe.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True),
              help="Also write the description as JSON.")
def info(device_id, json_path):
    """Describe this machine: GPU, CUDA/CuPy versions, kernel cache and kernel paths."""
    doc = {"cupyflash": __version__, "gpu": None, "no_gpu_reason": None}
    click.echo(f"cupyflash {__version__}")
    reason = bench.cuda_unavailable_reason()
    if reason is None:
        try:
            doc["gpu"] = bench.gpu_info(device_id)
        except Exception as e:
            reason = f"device {device_id}: {bench.short_error(e)}"
    if doc["gpu"]:
        g = doc["gpu"]
        click.echo(f"GPU {device_id}: {g['name']}")
        click.echo(f"  compute capability       {g['cc']}")
        click.echo(f"  multiprocessors          {g['sm_count']}")
        click.echo(f"  shared memory per block  {g['shared_mem_per_block_optin'] // 1024} KB (opt-in)")
        click.echo(f"  memory                   {g['memory_bytes'] / 2**30:.1f} GiB "
                   f"({g['memory_free_bytes'] / 2**30:.1f} GiB free)")
        tuning = _tuning()
        doc["tile_table"] = tuning.table_status(tuning.DeviceInfo.of(device_id))
        click.echo(f"  tile table               {doc['tile_table']}")
    else:
        doc["no_gpu_reason"] = reason
        click.echo(f"No CUDA device: {reason}")
    v = doc["versions"] = bench.versions()
    click.echo("Versions:")
    for key, label in (("cupy", "CuPy"), ("cuda_runtime", "CUDA runtime"), ("driver", "CUDA driver"),
                       ("nvrtc", "NVRTC"), ("numpy", "NumPy"), ("python", "Python")):
        if key in v:
            click.echo(f"  {label:<13} {v[key] if v[key] is not None else 'unknown'}")
    c = doc["kernel_cache"] = bench.cache_info()
    state = f"{c['files']} files, {_size_text(c['bytes'])}" if c["exists"] else "not created yet"
    click.echo(f"Kernel cache: {c['dir']} ({state})")
    if doc["gpu"]:
        paths = _kernel_paths(device_id)
    else:
        paths = "need a CUDA device (`cupyflash kernels --arch sm_90` reports kernels offline)"
    if isinstance(paths, str):
        click.echo(f"Kernel paths: {paths}")
        doc["kernel_paths"] = paths
    else:
        click.echo(f"Kernel paths on GPU {device_id}:")
        click.echo(bench.format_grid(["dtype", "head_dim", "path"], [list(r) for r in paths]))
        doc["kernel_paths"] = [{"dtype": d, "head_dims": h, "path": p} for d, h, p in paths]
    if json_path:
        bench.write_json(json_path, doc)
        click.echo(f"wrote {json_path}")


# ---------------------------------------------------------------------------------------
# bench

def _bench_device(device_id: int) -> bench.Device:
    """The GPU the benchmark runs on (tests replace this with bench.cpu_device)."""
    reason = bench.cuda_unavailable_reason()
    if reason:
        raise click.ClickException(f"bench needs a CUDA device: {reason}. "
                                   "`cupyflash check` tests correctness on the CPU.")
    import cupy
    count = cupy.cuda.runtime.getDeviceCount()
    if device_id >= count:
        raise click.BadParameter(f"device {device_id} does not exist ({count} found)",
                                 param_hint="'--device'")
    return bench.cuda_device(device_id)


def _progress(total: int, enabled: bool):
    if not enabled or total <= 1:
        return None
    return click.progressbar(length=total, label="benchmarking", file=sys.stderr,
                             show_pos=True, item_show_func=lambda r: r and f"{r.impl} {r.mode} S={r.seqlen_q}")


@main.command("bench")
@click.option("-b", "--batch", type=click.IntRange(min=1),
              help=f"Batch size [default: {bench.DEFAULT_TOKENS} // seqlen].")
@click.option("-H", "--heads", type=click.IntRange(min=1),
              help=f"Heads [default: {bench.DEFAULT_HIDDEN} // head_dim].")
@click.option("-s", "--seqlen", "seqlens", type=SEQLENS, multiple=True,
              help="Query length(s): N, N,M,..., START:STOP (doubling) or START:STOP:STEP "
                   "[default: 512:16384].")
@click.option("--seqlen-k", type=click.IntRange(min=1), help="Key length [default: seqlen].")
@click.option("-d", "--head-dim", "head_dims", type=HEAD_DIMS, multiple=True,
              help="Head dimension(s), multiples of 8 up to 256 [default: 128].")
@click.option("--dtype", "dtypes", type=_dtype_type(GPU_DTYPES), multiple=True,
              help="bfloat16, float16, float32 (comma list or 'all') [default: bfloat16].")
@click.option("--causal", type=click.Choice(["no", "yes", "both"]), is_flag=False, flag_value="yes",
              default="no", show_default=True, help="Causal mask; bare --causal means yes.")
@click.option("--mode", "modes", type=MODES, multiple=True,
              help="fwd, bwd (backward only), fwd+bwd, comma list or 'all' [default: fwd].")
@variant_options
@click.option("--compare", "peers", type=PEERS, multiple=True,
              help="Peers: naive, torch-flash, torch-cudnn, jax-cudnn, fa4, 'all' or 'none' [default: all]. "
                   "A peer that cannot run (or cannot do the variant) is reported as skipped with the reason.")
@click.option("--deterministic", is_flag=True,
              help="Also time cupyflash's bitwise-reproducible backward (deterministic=True) beside the default.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True,
              help="Untimed calls before timing (the first also measures peak memory).")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed calls; the median, min and max are reported.")
@click.option("--max-time", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds one row may take; slow calls get fewer warm-ups and repeats (at least 3).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random inputs.")
@click.option("--device", "device_id", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write results as JSON.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write results as CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a PNG of TFLOP/s against seqlen (needs matplotlib).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bar on stderr during sweeps.")
def bench_command(batch, heads, seqlens, seqlen_k, head_dims, dtypes, causal, modes, kv_heads, window, softcap,
                  alibi, sinks, peers, deterministic, warmup, repeats, max_time, seed, device_id, json_path,
                  csv_path, plot_path, progress):
    """Time cupyflash beside its peers, same process, inputs and stream.

    Times are CUDA events after warm-up (median of repeats, with min and max); every
    configuration is first checked against a float64 reference, and a wrong result is
    reported as FAILED instead of timed (exit status 1). The variant flags apply to every
    case and every implementation.
    """
    if plot_path:
        try:
            bench.require_matplotlib()
        except bench.PlotUnavailable as e:
            raise click.ClickException(f"--plot: {e}") from None
    seqlens = _merge(seqlens, bench.DEFAULT_SEQLENS)
    head_dims = _merge(head_dims, [128])
    dtypes = _merge(dtypes, ["bfloat16"])
    modes = _merge(modes, ["fwd"])
    peers = _merge(peers, []) if peers else list(bench.PEERS)  # --compare none: no peers
    causals = {"no": [False], "yes": [True], "both": [False, True]}[causal]
    variant = bench.Variant(kv_heads, window, softcap, alibi, sinks)
    cases = bench.make_cases(seqlens, head_dims, dtypes, causals, modes,
                             batch=batch, heads=heads, seqlen_k=seqlen_k, variant=variant)
    _check_kv_heads(cases)
    device = _bench_device(device_id)
    all_impls = bench.implementations()
    impls = [all_impls["cupyflash"]] + [all_impls["cupyflash-deterministic"]] * deterministic + [all_impls[p] for p in peers]

    gpu = bench.gpu_info(device_id) if device.on_gpu else None
    where = f"{gpu['name']} (cc {gpu['cc']})" if gpu else "CPU (numpy)"
    click.echo(f"cupyflash bench on {where}")
    if variants := sorted({c.variant_text for c in cases} - {""}):
        click.echo(f"variant: {'; '.join(variants)}")
    click.echo(f"{bench.FLOP_CONVENTION}")
    click.echo(f"time: median of {repeats} after {warmup} warm-up calls "
               f"({'CUDA events on one stream' if device.on_gpu else 'host clock'}); "
               "peak MB: extra device memory of one call")

    bar = _progress(len(cases) * len(impls), progress)
    with bar or contextlib.nullcontext():
        results = bench.run_benchmark(cases, impls, device, warmup=warmup, repeats=repeats,
                                      max_seconds=max_time, seed=seed,
                                      on_result=bar and (lambda r: bar.update(1, r)))
    click.echo(bench.format_table(results))
    _report_problems(results)

    doc = bench.results_document(results, command=["cupyflash", *sys.argv[1:]], gpu=gpu,
                                 versions=bench.versions(peers),
                                 settings={"warmup": warmup, "repeats": repeats, "seed": seed,
                                           "max_time_s": max_time})
    if json_path:
        bench.write_json(json_path, doc)
        click.echo(f"wrote {json_path}")
    if csv_path:
        bench.write_csv(csv_path, results)
        click.echo(f"wrote {csv_path}")
    if plot_path:
        try:
            bench.plot_results(results, plot_path, title=f"cupyflash on {where}")
            click.echo(f"wrote {plot_path}")
        except ValueError as e:
            _echo_err(f"no plot: {e}")

    flash = [r for r in results if r.impl == "cupyflash"]
    if any(r.status == "failed" for r in flash):
        raise SystemExit(1)
    if not any(r.status == "ok" for r in flash):
        _echo_err("cupyflash produced no timing (see the status column).")
        raise SystemExit(1)


def _report_problems(results):
    """Plain sentences under the table for wrong results and out-of-memory sizes."""
    for r in results:
        what = f"{r.impl} at {r.mode} {r.dtype} B={r.batch} H={r.heads} S={r.seqlen_q} D={r.head_dim}"
        what += f" {r.variant}" if r.variant else ""
        if r.status == "failed" and r.impl == "cupyflash":
            _echo_err(f"FAILED: {what}: {r.note}")
        elif r.status == "oom":
            _echo_err(f"Out of memory: {what} does not fit on this device; try a smaller "
                      f"--batch or --seqlen ({r.note}).")


# ---------------------------------------------------------------------------------------
# check

CHECK_LENGTHS = [(1, 1), (113, 203), (203, 113), (128, 128), (256, 512), (1023, 1024)]
CHECK_LENGTHS_QUICK = [(113, 203), (203, 113), (128, 128)]
CHECK_HEAD_DIMS = [8, 40, 64, 96, 128, 160, 256]
CHECK_HEAD_DIMS_QUICK = [64, 128]
# the NumPy backend is ~100x slower: a lighter default sweep (under a minute on two cores)
CHECK_LENGTHS_CPU = CHECK_LENGTHS[:-1]
CHECK_HEAD_DIMS_CPU = [8, 40, 64, 128, 256]


def _check_device(backend: str, device_id: int) -> bench.Device:
    reason = bench.cuda_unavailable_reason()
    if backend == "cuda" and reason:
        raise click.ClickException(f"--backend cuda needs a CUDA device: {reason}")
    if backend == "numpy" or reason:
        return bench.cpu_device()
    return bench.cuda_device(device_id)


def _check_case(case: bench.Case, device: bench.Device, seed: int) -> list[bench.Check]:
    from . import api
    inputs = device.random_inputs(case, seed)
    q, k, v, do = inputs.q, inputs.k, inputs.v, inputs.dout
    kw = dict(causal=case.causal, **inputs.variants)
    out, lse = api.flash_attention(q, k, v, return_lse=True, **kw)
    grads = api.flash_attention_backward(do, q, k, v, out, lse, **kw)  # (dq, dk, dv[, dsinks])
    outputs = dict(zip(bench.OUTPUT_NAMES, (out, lse, *grads)))
    return bench.check_outputs(outputs, inputs, case.causal, device.xp, max_batch=None, max_heads=None)


@main.command()
@click.option("--backend", type=click.Choice(["auto", "cuda", "numpy"]), default="auto", show_default=True,
              help="auto: the GPU when there is one, else the NumPy backend.")
@click.option("--quick", is_flag=True, help="A few cases only (seconds).")
@click.option("--dtype", "dtypes", type=_dtype_type(CPU_DTYPES, all_means=("all",)), multiple=True,
              help="dtypes to check, or 'all' [default: all the backend supports].")
@click.option("-d", "--head-dim", "head_dims", type=HEAD_DIMS, multiple=True,
              help=f"Head dims [default: GPU {','.join(map(str, CHECK_HEAD_DIMS))}, CPU "
                   f"{','.join(map(str, CHECK_HEAD_DIMS_CPU))}; quick: {','.join(map(str, CHECK_HEAD_DIMS_QUICK))}].")
@click.option("-H", "--heads", type=click.IntRange(min=1),
              help="Query heads [default: 3; with --kv-heads N, 2N].")
@variant_options
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", "device_id", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Print every tensor's error, not just the worst.")
def check(backend, quick, dtypes, head_dims, heads, kv_heads, window, softcap, alibi, sinks, seed, device_id,
          verbose):
    """Correctness sweep: out, lse, dq, dk, dv (and dsinks) against a float64 reference.

    Each tensor's bound is twice the error of naive attention in the same precision plus a
    rounding tolerance. The variant flags apply to every case. Exit status 1 when any case fails.
    """
    device = _check_device(backend, device_id)
    supported = GPU_DTYPES if device.on_gpu else CPU_DTYPES
    dtypes = _merge(dtypes, ["all"])
    dtypes = list(supported) if "all" in dtypes else dtypes
    if bad := [d for d in dtypes if d not in supported]:
        raise click.BadParameter(f"{', '.join(bad)} not supported on this backend "
                                 f"(supported: {', '.join(supported)})", param_hint="'--dtype'")
    if quick:
        default_dims, lengths = CHECK_HEAD_DIMS_QUICK, CHECK_LENGTHS_QUICK
    elif device.on_gpu:
        default_dims, lengths = CHECK_HEAD_DIMS, CHECK_LENGTHS
    else:
        default_dims, lengths = CHECK_HEAD_DIMS_CPU, CHECK_LENGTHS_CPU
    head_dims = _merge(head_dims, default_dims)
    heads = heads or (2 * kv_heads if kv_heads else 3)
    variant = bench.Variant(kv_heads, window, softcap, alibi, sinks)
    cases = [bench.Case(2, heads, sq, sk, d, dt, causal, "fwd+bwd", variant)
             for dt in dtypes for d in head_dims for sq, sk in lengths for causal in (False, True)]
    _check_kv_heads(cases)
    shape = " ".join(filter(None, [f"B=2 H={heads}", variant.describe(heads)]))
    click.echo(f"cupyflash check on {'GPU ' + str(device.id) if device.on_gpu else 'the CPU (NumPy backend)'}: "
               f"{len(cases)} cases ({shape}); bound = 2 x naive same-precision error + rounding atol")
    failures = 0
    with device.activate():
        for n, case in enumerate(cases):
            label = (f"{case.dtype:<8} D={case.head_dim:<3} Sq={case.seqlen_q:<4} Sk={case.seqlen_k:<4} "
                     f"{'causal' if case.causal else 'full  '}")
            try:
                checks = _check_case(case, device, seed + n)
            except Exception as e:
                failures += 1
                click.echo(f"{label}  ERROR {bench.short_error(e, 300)}  FAIL")
                continue
            worst = max(checks, key=lambda c: c.max_err / c.bound if c.bound else float("inf"))
            ok = all(c.ok for c in checks)
            failures += not ok
            shown = checks if verbose or not ok else [worst]
            click.echo(f"{label}  {'; '.join(c.text() for c in shown)}  {'PASS' if ok else 'FAIL'}")
            device.free_memory()
    click.echo(f"{len(cases) - failures} passed, {failures} failed")
    if failures:
        raise SystemExit(1)


# ---------------------------------------------------------------------------------------
# kernels

def _compile_report(**kwargs):
    """cupyflash._compile.compile_report, imported when needed (tests replace this)."""
    try:
        from cupyflash._compile import compile_report
    except ImportError as e:
        raise click.ClickException(f"the offline compile report is not available: {e}") from None
    return compile_report(**kwargs)


def _fmt_kb(n) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def _arch(ctx, param, value):
    if value is None:
        return None
    if not re.fullmatch(r"sm_\d{2,3}[a-z]?", value):
        raise click.BadParameter(f"{value!r} is not an architecture like sm_80, sm_90 or sm_90a",
                                 ctx, param)
    return value


def _this_arch() -> str:
    if bench.cuda_unavailable_reason() is None:
        try:
            cc = bench.gpu_info(0)["cc"].replace(".", "")
            return f"sm_{cc}"
        except Exception:
            pass
    return "sm_90"


@main.command()
@click.option("--arch", callback=_arch, help="Target, e.g. sm_80, sm_90, sm_90a [default: this GPU's, else sm_90].")
@click.option("--dtype", "dtypes", type=_dtype_type(GPU_DTYPES), multiple=True, help="Only these dtypes.")
@click.option("-d", "--head-dim", "head_dims", type=HEAD_DIMS, multiple=True, help="Only these head dims.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--fail-on-spill", is_flag=True, help="Exit 1 when any kernel spills registers.")
def kernels(arch, dtypes, head_dims, json_path, fail_on_spill):
    """Offline compile report (NVRTC, no GPU needed): registers, spills, stack, shared memory."""
    arch = arch or _this_arch()
    dtypes = [bench.DTYPES[d] for d in _merge(dtypes, [])] or None
    rows = _compile_report(arch=arch, dtypes=dtypes, head_dims=_merge(head_dims, []) or None)
    header = ["kernel", "dtype", "head_dim", "causal", "registers", "spill st", "spill ld",
              "stack B", "static smem KB", "dynamic smem KB"]
    cells = [[str(r["kernel"]), str(r["dtype"]), str(r["head_dim"]), "yes" if r["causal"] else "no",
              str(r["registers"]), str(r["spill_stores"]), str(r["spill_loads"]), str(r["stack_bytes"]),
              f"{r['shared_bytes'] / 1024:.1f}", _fmt_kb(r.get("dynamic_shared_bytes"))] for r in rows]
    click.echo(f"compile report for {arch} ({len(rows)} instantiations)")
    click.echo(bench.format_grid(header, cells))
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    click.echo(f"{len(spilling)} of {len(rows)} spill registers" if spilling else "no register spills")
    if any("_sm90_kernel" in r["kernel"] for r in rows):
        click.echo("sm90 kernels: `registers` is the cap at entry; setmaxnreg then moves registers from the "
                   "producer warpgroup (40) to the consumers (up to 240)")
    if json_path:
        bench.write_json(json_path, {"arch": arch, "kernels": list(rows)})
        click.echo(f"wrote {json_path}")
    if fail_on_spill and spilling:
        raise SystemExit(1)


# ---------------------------------------------------------------------------------------
# tune

def _tuning():
    """The cupyflash.tune module (the package's attribute of that name is its tune function)."""
    import importlib
    return importlib.import_module("cupyflash.tune")


def _tune_device(device_id: int):
    """The device a tune run measures (tests replace this with a fake description)."""
    tuning = _tuning()
    reason = bench.cuda_unavailable_reason()
    if reason is not None:
        raise click.ClickException(f"tuning times kernels on a CUDA device: {reason} (--dry-run lists the candidates)")
    return tuning.DeviceInfo.of(device_id)


def _tile_text(cfg) -> str:
    return (str(cfg).replace("Sm90FwdConfig", "wgmma").replace("Sm90BwdConfig", "wgmma-bwd").replace("FwdConfig", "")
            .replace("BwdConfig", "").replace("block_", "").replace("num_warps", "warps").replace("q_stages", "stages"))


@main.command("tune")
@click.option("--dtype", "dtypes", type=_dtype_type(("bfloat16", "float16")), multiple=True,
              help="Dtypes to tune [default: bfloat16,float16].")
@click.option("-d", "--head-dim", "head_dims", type=HEAD_DIMS, multiple=True, help="Head dims [default: 64,128].")
@click.option("--causal", type=click.Choice(["no", "yes", "both"]), default="both", show_default=True)
@click.option("--mode", "modes", type=CommaChoice(("fwd", "bwd"), extra={"all": ("fwd", "bwd")}), multiple=True,
              help="Passes [default: fwd,bwd].")
@click.option("--budget", type=click.FloatRange(min=0, min_open=True),
              help="Stop within this many seconds of the command's start.")
@click.option("--dry-run", is_flag=True, help="List the candidate tiles of each entry; time nothing.")
@click.option("--device", "device_id", type=click.IntRange(min=0), default=0, show_default=True)
def tune_command(dtypes, head_dims, causal, modes, budget, dry_run, device_id):
    """Time the candidate tiles on this GPU and remember the fastest (a per-device table).

    Each candidate fits the device's shared memory, compiles without spills and matches float64
    attention before it is timed; the winners go to a JSON table in the cache directory
    (CUPYFLASH_TUNE_DIR), which later processes on this device use first. CUPYFLASH_TUNE=0
    ignores it; a table from another driver, NVRTC or cupyflash is ignored with a warning.
    """
    tuning = _tuning()
    dts = [bench.DTYPES[d] for d in _merge(dtypes, ("bfloat16", "float16"))]
    hds = _merge(head_dims, (64, 128))
    masks = {"no": (False,), "yes": (True,), "both": (False, True)}[causal]
    passes = tuple(_merge(modes, ("fwd", "bwd")))
    if dry_run:
        device = _tune_device(device_id) if bench.cuda_unavailable_reason() is None else _dry_run_device()
        todo = tuning.plan(dts, hds, masks, passes, device)
        click.echo(f"{device.name} (sm_{device.cc}, {device.smem_optin // 1024} KB shared memory per block): "
                   f"{len(todo)} entries, {sum(len(t[-1]) for t in todo)} candidates before the spill check")
        for key, *_, cands in todo:
            click.echo(f"{key}: " + ", ".join(_tile_text(c) for c in cands))
        return
    device = _tune_device(device_id)
    todo = len(tuning.plan(dts, hds, masks, passes, device))
    with click.progressbar(length=todo, label=f"tuning {device.name}", file=sys.stderr) as bar:
        rows = tuning.tune(dts, hds, masks, passes, budget=budget, device_id=device_id,
                           progress=lambda done, total, key: bar.update(1), started=tuning.process_started())
    cells = [[r.key, _tile_text(r.builtin), _tile_text(r.chosen), f"{r.chosen_ms:.3f}",
              f"{r.speedup:.2f}x" if r.speedup else "-"] for r in rows]
    click.echo(bench.format_grid(["entry", "before", "tuned", "ms", "speed-up"], cells))
    click.echo(f"wrote {tuning.table_path(device)} ({len(rows)} of {todo} entries measured)")


def _dry_run_device():
    """With no GPU, --dry-run describes an H200 (the built-in table's GPU)."""
    tuning = _tuning()
    return tuning.DeviceInfo("NVIDIA H200 (no GPU here: assumed)", 90, 132, 227 * 1024, 0, "", __version__)


if __name__ == "__main__":
    main()
