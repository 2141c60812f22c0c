"""The published benchmark: cupyflash beside its peers on this GPU.

Sweep (flash-attn's convention: batch*seqlen = 16384 tokens, heads*head_dim = 2048):
seqlen 512..16384, head_dim 64 and 128, causal and not, forward and backward, bfloat16
and float16, against naive attention (CuPy), PyTorch SDPA (FlashAttention-2 and cuDNN
backends), JAX's cuDNN attention and FlashAttention-4 (flash_attn.cute, where installed), all
in this process, on the same inputs and stream.

Writes bench/results/<gpu>-<date>[-<dtype>][-quick].json (GPU name, versions, date, every
row) and one PNG per dtype beside it (TFLOP/s against seqlen, one panel per head_dim x
causal x mode), then prints cupyflash's ratio to each peer. About 2-3 minutes per dtype on
an H200 (kernel compilation on first use not included); --quick takes about a minute.

    python bench/run_peers.py                      # the published numbers, both dtypes
    python bench/run_peers.py --dtype bfloat16     # one dtype per run (file suffix -bfloat16)
    python bench/run_peers.py --quick              # a smoke run (file suffix -quick)
    python bench/run_peers.py --plot-only bench/results/<file>.json
"""
from __future__ import annotations

import datetime
import re
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from cupyflash import bench  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
FULL = dict(seqlens=[512, 1024, 2048, 4096, 8192, 16384], head_dims=[64, 128],
            warmup=3, repeats=10, max_seconds=2.0)
QUICK = dict(seqlens=[1024, 4096], head_dims=[64, 128], warmup=2, repeats=5, max_seconds=1.0)


def published_cases(quick: bool, dtypes) -> list[bench.Case]:
    """The sweep behind the published numbers (or its quick subset)."""
    s = QUICK if quick else FULL
    return bench.make_cases(s["seqlens"], s["head_dims"], dtypes, [False, True], ["fwd", "bwd"])


def median_ms(fn, repeats: int, max_seconds: float = 2.0) -> float:
    """The median ms of back-to-back calls of fn between CUDA events on CuPy's current stream."""
    import statistics
    import cupy
    timer = bench.CudaEventTimer(cupy.cuda.get_current_stream())
    return statistics.median(timer(fn, warmup=3, repeats=repeats, max_seconds=max_seconds))


def write_result(doc: dict, name: str, gpu: dict, out_dir: str | None) -> Path:
    """bench/results/<name>-<gpu>-<date>.json (and a copy in out_dir), with the command and date."""
    import json
    doc = {**doc, "command": sys.argv, "gpu": gpu, "date": datetime.datetime.now().isoformat(timespec="seconds")}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{slug(gpu.get('name', 'gpu'))}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    if out_dir:
        (Path(out_dir) / path.name).write_text(path.read_text())
    return path


def slug(text: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (file names)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def plot_per_dtype(results, stem: Path, title: str) -> list[Path]:
    """One PNG per dtype: <stem>-<dtype>.png (<stem>.png when the stem already names the dtype)."""
    paths = []
    for dtype in dict.fromkeys(r.dtype for r in results):
        rows = [r for r in results if r.dtype == dtype]
        if any(r.status == "ok" for r in rows):
            name = stem.name if stem.name.endswith(f"-{dtype}") else f"{stem.name}-{dtype}"
            path = stem.with_name(f"{name}.png")
            bench.plot_results(rows, path, title=f"{title}, {dtype}")
            paths.append(path)
    return paths


def _plot(results, stem: Path, title: str) -> None:
    try:
        for path in plot_per_dtype(results, stem, title):
            click.echo(f"wrote {path}")
    except bench.PlotUnavailable as e:
        click.echo(f"no plot: {e}; rerun later with --plot-only {stem}.json", err=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="seqlen 1024 and 4096 only, fewer repeats.")
@click.option("--dtype", "dtypes", type=click.Choice(["bfloat16", "float16"]), multiple=True,
              help="Only this dtype (repeatable) [default: both].")
@click.option("--compare", default="all", show_default=True,
              help=f"Comma list of peers ({', '.join(bench.PEERS)}) or all.")
@click.option("--device", "device_id", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=RESULTS_DIR,
              show_default=True)
@click.option("--plot-only", "plot_only", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Only redraw the plots of an existing results JSON.")
def run(quick, dtypes, compare, device_id, out_dir, plot_only):
    """Run the published sweep and write results JSON, plots and a summary."""
    if plot_only:
        doc, results = bench.load_results(plot_only)
        name = (doc.get("gpu") or {}).get("name", "CPU")
        _plot(results, plot_only.with_suffix(""), f"cupyflash vs peers on {name} ({doc['date'][:10]})")
        return
    peers = list(bench.PEERS) if compare == "all" else [p for p in compare.split(",") if p]
    if unknown := [p for p in peers if p not in bench.PEERS]:
        raise click.BadParameter(f"unknown peer(s) {unknown}; choose from {bench.PEERS}",
                                 param_hint="'--compare'")
    if reason := bench.cuda_unavailable_reason():
        raise click.ClickException(f"run_peers needs a CUDA device: {reason}")
    dtypes = list(dtypes) or ["bfloat16", "float16"]
    s = QUICK if quick else FULL
    cases = published_cases(quick, dtypes)
    device = bench.cuda_device(device_id)
    impls_by_name = bench.implementations()
    impls = [impls_by_name["cupyflash"]] + [impls_by_name[p] for p in peers]
    gpu = bench.gpu_info(device_id)
    click.echo(f"{len(cases)} cases x {len(impls)} implementations on {gpu['name']}; {bench.FLOP_CONVENTION}")

    with click.progressbar(length=len(cases) * len(impls), label="run_peers", show_pos=True,
                           file=sys.stderr) as bar:
        results = bench.run_benchmark(cases, impls, device, warmup=s["warmup"], repeats=s["repeats"],
                                      max_seconds=s["max_seconds"], on_result=lambda r: bar.update(1))

    date = datetime.datetime.now(datetime.timezone.utc)
    subset = "".join(f"-{d}" for d in dtypes) if len(dtypes) < 2 else ""  # runs per dtype do not overwrite
    stem = out_dir / f"{slug(gpu['name'])}-{date:%Y-%m-%d}{subset}{'-quick' if quick else ''}"
    doc = bench.results_document(results, command=[sys.executable, *sys.argv], gpu=gpu,
                                 versions=bench.versions(peers), date=date.isoformat(timespec="seconds"),
                                 settings={"sweep": "quick" if quick else "full", "warmup": s["warmup"],
                                           "repeats": s["repeats"], "max_time_s": s["max_seconds"]})
    bench.write_json(stem.with_suffix(".json"), doc)
    click.echo(f"wrote {stem.with_suffix('.json')}")
    _plot(results, stem, f"cupyflash vs peers on {gpu['name']} ({date:%Y-%m-%d})")

    click.echo("TFLOP/s; (x) = cupyflash's speed-up over that peer")
    click.echo(bench.format_comparison(results))
    failed = [r for r in results if r.impl == "cupyflash" and r.status != "ok"]
    for r in failed:
        click.echo(f"cupyflash {r.status}: {r.mode} {r.dtype} S={r.seqlen_q} D={r.head_dim} "
                   f"causal={r.causal}: {r.note}", err=True)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    run()
