"""The cupyflash command (cupyflash/cli.py) and its machinery (cupyflash.bench).

CPU tests run every command through click's CliRunner: help, bad options (usage error,
exit 2, the option named), the no-GPU behaviour, the JSON / CSV schema (bench on a NumPy
"device" with a fake clock), the correctness gate and out-of-memory rows. GPU tests
(marker ``gpu``) run small real benchmarks on the device.
"""
import csv
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX must not take 75% of the GPU
ROOT = Path(__file__).resolve().parents[1]
from cupyflash import api, bench, cli, reference  # noqa: E402
from cupyflash._dtypes import BFLOAT16  # noqa: E402
from conftest import GPU_SKIP_REASON, error_report  # noqa: E402

COMMANDS = ["info", "bench", "check", "kernels"]


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


class FakeClock:
    """Advances by ``step`` seconds on every read: every host-timed call lasts one step."""

    def __init__(self, step=0.002):
        self.t, self.step = 0.0, step

    def __call__(self):
        self.t += self.step
        return self.t


@pytest.fixture
def cpu_bench(monkeypatch):
    """`cupyflash bench` runs on the NumPy backend with a fake clock (each call 2 ms)."""
    monkeypatch.setattr(cli, "_bench_device", lambda device_id: bench.cpu_device(clock=FakeClock()))


TINY = ["--seqlen", "32,64", "--batch", "1", "--heads", "2", "--head-dim", "32",
        "--warmup", "1", "--repeats", "3", "--no-progress"]


# ---------------------------------------------------------------------------------------
# Help and the checkout entry point

def test_group_help_lists_every_command():
    r = invoke("--help")
    assert r.exit_code == 0, r.output
    for name in COMMANDS:
        assert name in r.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output and "--help" in r.output


def test_bench_help_documents_the_options_the_issue_names():
    out = invoke("bench", "--help").output
    for opt in ("--batch", "--heads", "--seqlen", "--head-dim", "--dtype", "--causal", "--mode",
                "--warmup", "--repeats", "--json", "--csv", "--plot", "--compare"):
        assert opt in out, f"{opt} missing from bench --help"


def test_python_cli_py_help_works_from_a_checkout():
    r = subprocess.run([sys.executable, "cli.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "bench" in r.stdout and "check" in r.stdout


def test_python_m_cupyflash_runs_the_command_under_its_own_name(tmp_path):
    """From any directory (no checkout on sys.path but the installed package)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "cupyflash", "--help"], cwd=tmp_path, capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: cupyflash ") and "kernels" in r.stdout


def test_run_peers_help_works_from_a_checkout():
    r = subprocess.run([sys.executable, "bench/run_peers.py", "--help"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "--quick" in r.stdout


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and "cupyflash" in r.output


# ---------------------------------------------------------------------------------------
# Bad options: click's usage error, exit 2, the option named

BAD_OPTIONS = [
    (["bench", "--dtype", "int8"], "--dtype"),
    (["bench", "--dtype", "bf16,float64"], "--dtype"),
    (["bench", "--seqlen", "-5"], "--seqlen"),
    (["bench", "--seqlen", "0"], "--seqlen"),
    (["bench", "--seqlen", "abc"], "--seqlen"),
    (["bench", "--seqlen", "4096:512"], "--seqlen"),
    (["bench", "--seqlen", "512:4096:512:2"], "--seqlen"),
    (["bench", "--seqlen", "512,,1024"], "--seqlen"),
    (["bench", "--seqlen-k", "0"], "--seqlen-k"),
    (["bench", "--mode", "sideways"], "--mode"),
    (["bench", "--compare", "flashy"], "--compare"),
    (["bench", "--compare", "naive,torch"], "--compare"),
    (["bench", "--head-dim", "12"], "--head-dim"),
    (["bench", "--head-dim", "512"], "--head-dim"),
    (["bench", "--batch", "0"], "--batch"),
    (["bench", "--heads", "-1"], "--heads"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--warmup", "-1"], "--warmup"),
    (["bench", "--causal", "maybe"], "--causal"),
    (["bench", "--max-time", "0"], "--max-time"),
    (["bench", "--no-such-option"], "--no-such-option"),
    (["check", "--backend", "tpu"], "--backend"),
    (["check", "--dtype", "complex64"], "--dtype"),
    (["check", "--head-dim", "7"], "--head-dim"),
    (["kernels", "--arch", "90"], "--arch"),
    (["kernels", "--arch", "compute_90"], "--arch"),
    (["kernels", "--dtype", "int8"], "--dtype"),
    (["info", "--device", "-1"], "--device"),
    (["bench", "--kv-heads", "0"], "--kv-heads"),
    (["bench", "--kv-heads", "3", "--heads", "4"], "--kv-heads"),  # must divide the heads
    (["bench", "--kv-heads", "3", "--head-dim", "64"], "--kv-heads"),  # default heads 2048 // 64 = 32
    (["bench", "--window", "8"], "--window"),
    (["bench", "--window", "1,2,3"], "--window"),
    (["bench", "--window", "a,0"], "--window"),
    (["bench", "--window", "-2,0"], "--window"),
    (["bench", "--softcap", "-1"], "--softcap"),
    (["bench", "--softcap", "nan"], "--softcap"),
    (["bench", "--softcap", "inf"], "--softcap"),
    (["bench", "--softcap", "soft"], "--softcap"),
    (["bench", "--alibi=yes"], "--alibi"),
    (["check", "--kv-heads", "2", "--heads", "3"], "--kv-heads"),
    (["check", "--kv-heads", "-1"], "--kv-heads"),
    (["check", "--window", "8;0"], "--window"),
    (["check", "--softcap", "-0.5"], "--softcap"),
    (["check", "--sinks=1"], "--sinks"),
]


@pytest.mark.parametrize("args, option", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_is_a_usage_error_naming_the_option(args, option):
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert option in r.output, r.output
    assert "Traceback" not in r.output


def test_check_rejects_float64_on_the_gpu_backend(monkeypatch):
    monkeypatch.setattr(cli, "_check_device", lambda backend, device_id: _fake_gpu_device())
    r = invoke("check", "--dtype", "float64")
    assert r.exit_code == 2 and "--dtype" in r.output, r.output


def _fake_gpu_device():
    dev = bench.cpu_device()
    dev.stream = object()  # on_gpu without touching a GPU: only the dtype check runs
    return dev


# ---------------------------------------------------------------------------------------
# Option parsing helpers

@pytest.mark.parametrize("text, expected", [
    ("1024", [1024]),
    ("512,1024", [512, 1024]),
    ("512:4096", [512, 1024, 2048, 4096]),
    ("512:3000", [512, 1024, 2048]),
    ("100:300:100", [100, 200, 300]),
    ("1024,512:1024", [512, 1024]),
    ("113, 203", [113, 203]),
])
def test_parse_int_list(text, expected):
    assert bench.parse_int_list(text) == expected


def test_seqlen_option_merges_repeats_and_default_sweep(cpu_bench):
    r = invoke("bench", "--seqlen", "64", "--seqlen", "32:64", "--batch", "1", "--heads", "1",
               "--head-dim", "32", "--compare", "none", "--warmup", "0", "--repeats", "1", "--no-progress")
    assert r.exit_code == 0, r.output
    assert r.output.count("cupyflash") >= 2  # seqlen 32 and 64, each once
    assert bench.DEFAULT_SEQLENS == (512, 1024, 2048, 4096, 8192, 16384)


def test_default_shape_follows_flash_attn_convention():
    assert bench.default_shape(2048, 128) == (8, 16)
    assert bench.default_shape(16384, 64) == (1, 32)
    assert bench.default_shape(32768, 4096) == (1, 1)
    cases = bench.make_cases([512, 16384], [64], ["bfloat16"], [False], ["fwd"])
    for c in cases:
        assert c.batch * c.seqlen_q == 16384 and c.heads * c.head_dim == 2048


# ---------------------------------------------------------------------------------------
# FLOPs and timing

def test_flops_convention():
    fwd = bench.attention_flops(2, 4, 128, 256, 64)
    assert fwd == 4 * 2 * 4 * 128 * 256 * 64
    assert bench.attention_flops(2, 4, 128, 256, 64, mode="bwd") == 2.5 * fwd
    assert bench.attention_flops(2, 4, 128, 256, 64, mode="fwd+bwd") == 3.5 * fwd
    assert bench.attention_flops(2, 4, 128, 256, 64, causal=True) == fwd / 2
    assert bench.attention_flops(2, 4, 128, 256, 64, causal=True, mode="bwd") == 1.25 * fwd


def test_host_timer_reports_every_repeat_after_warmup():
    calls = []
    timer = bench.HostTimer(clock=FakeClock(0.001), min_sample_ms=0)
    times = timer(lambda: calls.append(1), warmup=3, repeats=7)
    assert len(calls) == 10
    assert times == pytest.approx([1.0] * 7)


def test_host_timer_batches_short_calls_and_syncs_each_sample():
    synced = []
    timer = bench.HostTimer(sync=synced.append, clock=FakeClock(0.0005), min_sample_ms=2.0)
    times = timer(lambda: "out", warmup=1, repeats=4)
    assert timer.inner == 4  # 0.5 ms per call: 4 calls per sample reach 2 ms
    assert len(times) == 4 and len(synced) == 5  # one per warm-up call, one per sample
    assert times == pytest.approx([0.5 / 4] * 4)  # the fake clock moves once per sample read pair


def test_time_cap_shortens_warmup_of_slow_calls():
    calls = []
    timer = bench.HostTimer(clock=FakeClock(0.5), min_sample_ms=0)  # every call "takes" 500 ms
    times = timer(lambda: calls.append(1), warmup=5, repeats=20, max_seconds=4.0)
    assert len(calls) == 1 + 2 + 8  # timed warm-up, 2 more (1 s budget), 8 repeats (4 s)
    assert len(times) == 8


def test_time_cap_lowers_repeats_but_never_below_three():
    assert bench.timing._capped_repeats(None, 20, 1.0) == 20
    assert bench.timing._capped_repeats(100.0, 20, None) == 20
    assert bench.timing._capped_repeats(100.0, 20, 1.0) == 10
    assert bench.timing._capped_repeats(5000.0, 20, 1.0) == 3
    assert bench.timing._capped_repeats(5000.0, 2, 1.0) == 2


def test_result_statistics_and_tflops():
    case = bench.Case(1, 2, 64, 64, 32, "float16", False, "fwd")
    r = bench.Result.timed(case, "x", [3.0, 1.0, 2.0, 10.0, 2.0], "host-clock", 2 * 2**20)
    assert (r.ms_median, r.ms_min, r.ms_max, r.repeats) == (2.0, 1.0, 10.0, 5)
    assert r.tflops == pytest.approx(case.flops / 2e-3 / 1e12)
    assert r.peak_extra_mb == 2.0 and r.status == "ok"


def test_out_of_memory_errors_are_recognised():
    class OutOfMemoryError(RuntimeError):
        pass

    assert bench.is_out_of_memory(MemoryError("x"))
    assert bench.is_out_of_memory(OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert bench.is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying"))
    assert not bench.is_out_of_memory(RuntimeError("No available kernel. Aborting execution."))


def test_peak_memory_hook_counts_only_blocks_allocated_inside():
    hook = bench.peak_memory_hook()  # a cupy.cuda.MemoryHook; callbacks called directly here
    hook.malloc_postprocess(device_id=0, size=100, mem_size=512, mem_ptr=1, pmem_id=0)
    hook.malloc_postprocess(device_id=0, size=1000, mem_size=1024, mem_ptr=2, pmem_id=0)
    hook.free_postprocess(device_id=0, mem_size=512, mem_ptr=1, pmem_id=0)
    hook.free_postprocess(device_id=0, mem_size=4096, mem_ptr=99, pmem_id=0)  # allocated before
    hook.malloc_postprocess(device_id=0, size=10, mem_size=512, mem_ptr=3, pmem_id=0)
    assert hook.peak == 1536 and hook.current == 1536
    assert hook.name == "cupyflash_bench_peak"


# ---------------------------------------------------------------------------------------
# Naive peer and the correctness gate

@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_naive_peer_matches_the_reference_in_the_same_precision(rng, dtype, causal):
    q = rng.standard_normal((2, 37, 3, 32)).astype(dtype)
    k = rng.standard_normal((2, 53, 3, 32)).astype(dtype)
    v = rng.standard_normal((2, 53, 3, 32)).astype(dtype)
    do = rng.standard_normal((2, 37, 3, 32)).astype(dtype)
    scale = 1 / math.sqrt(32)
    out, P = bench.naive_forward(np, q, k, v, causal, scale)
    grads = bench.naive_backward(np, do, q, k, v, out, P, scale)
    want_out, _ = reference.attention(q, k, v, causal=causal, upcast=True)
    want_grads = reference.attention_backward(do, q, k, v, causal=causal, upcast=True)
    tol = 2e-5 if dtype == np.float32 else (3e-2 if dtype == BFLOAT16 else 4e-3)
    assert out.dtype == dtype and out.shape == q.shape
    np.testing.assert_allclose(out.astype(np.float64), want_out, atol=tol, err_msg=error_report(out, want_out))
    for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
        assert g.shape == w.shape and g.dtype == dtype
        np.testing.assert_allclose(g.astype(np.float64), w, atol=5 * tol, err_msg=f"{name}: {error_report(g, w)}")


def test_naive_peer_gives_zero_for_fully_masked_rows(rng):
    q = rng.standard_normal((1, 8, 1, 16)).astype(np.float32)
    k = rng.standard_normal((1, 4, 1, 16)).astype(np.float32)
    out, _ = bench.naive_forward(np, q, k, k, True, 0.25)
    assert np.all(np.isfinite(out))
    assert np.all(out[0, :4] == 0)  # queries 0..3 see no key (bottom-right alignment)


def _inputs(rng, shape=(2, 40, 3, 32), dtype=np.float16):
    arrays = [rng.standard_normal(shape).astype(dtype) for _ in range(4)]
    return bench.Inputs(*arrays, scale=1 / math.sqrt(shape[-1]))


def test_gate_passes_cupyflash_and_fails_a_perturbed_result(rng):
    inp = _inputs(rng)
    out, lse = api.flash_attention(inp.q, inp.k, inp.v, causal=True, return_lse=True)
    checks = bench.check_outputs({"out": out, "lse": lse}, inp, True, np)
    assert [c.tensor for c in checks] == ["out", "lse"]
    assert all(c.ok for c in checks), [c.text() for c in checks]
    bad = out.copy()
    bad[0, 5, 1, 3] += 0.05  # batch 0, head 1: inside the checked slice
    checks = bench.check_outputs({"out": bad}, inp, True, np)
    assert not checks[0].ok and "max err" in checks[0].text()


def test_gate_checks_gradients(rng):
    inp = _inputs(rng, dtype=BFLOAT16)
    out, lse = api.flash_attention(inp.q, inp.k, inp.v, return_lse=True)
    dq, dk, dv = api.flash_attention_backward(inp.dout, inp.q, inp.k, inp.v, out, lse)
    checks = bench.check_outputs({"dq": dq, "dk": dk, "dv": dv}, inp, False, np, max_batch=None, max_heads=None)
    assert all(c.ok for c in checks), [c.text() for c in checks]
    checks = bench.check_outputs({"dq": dq, "dk": dk * 1.1, "dv": dv}, inp, False, np)
    assert [c.ok for c in checks] == [True, False, True]


@pytest.mark.parametrize("causal", [False, True])
def test_gate_on_long_problems_checks_the_last_query_rows(rng, monkeypatch, causal):
    monkeypatch.setattr(bench.gate, "MAX_REFERENCE_SCORES", 24 * 50)  # 24 rows of 50 keys
    inp = bench.Inputs(*(rng.standard_normal(s).astype(np.float32) for s in
                         [(1, 70, 2, 16), (1, 50, 2, 16), (1, 50, 2, 16), (1, 70, 2, 16)]), scale=0.25)
    out, lse = api.flash_attention(inp.q, inp.k, inp.v, causal=causal, return_lse=True)
    grads = api.flash_attention_backward(inp.dout, inp.q, inp.k, inp.v, out, lse, causal=causal)
    outputs = dict(zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads)))
    checks = bench.check_outputs(outputs, inp, causal, np)
    assert [c.tensor for c in checks] == ["out", "lse", "dq"]  # dk, dv need every row
    assert all(c.ok for c in checks), [c.text() for c in checks]
    outputs["out"] = out.copy()
    outputs["out"][0, 69, 0, 0] += 0.01  # the last row is checked
    assert not bench.check_outputs(outputs, inp, causal, np)[0].ok


# ---------------------------------------------------------------------------------------
# bench: no GPU, schema, gate, out of memory, plot

@pytest.mark.skipif(GPU_SKIP_REASON is None, reason="a CUDA device is present")
def test_bench_without_gpu_says_so_and_exits_1():
    r = invoke("bench", "--seqlen", "128")
    assert r.exit_code == 1, r.output
    assert "bench needs a CUDA device" in r.output and "Traceback" not in r.output


def test_bench_json_and_csv_follow_the_schema(cpu_bench, tmp_path):
    j, c = tmp_path / "out" / "r.json", tmp_path / "r.csv"
    r = invoke("bench", *TINY, "--mode", "fwd,bwd", "--causal", "both",
               "--compare", "naive,torch-flash,jax-cudnn", "--json", j, "--csv", c)
    assert r.exit_code == 0, r.output
    doc = json.loads(j.read_text())
    bench.validate_document(doc)
    assert tuple(doc) == bench.DOCUMENT_FIELDS
    assert doc["command"][0] == "cupyflash" and doc["date"][:2] == "20"
    assert {"cupyflash", "numpy", "cupy", "cuda_runtime", "driver", "nvrtc", "torch", "jax"} <= set(doc["versions"])
    assert doc["settings"]["warmup"] == 1 and doc["settings"]["repeats"] == 3
    assert "4*B*H*Sq*Sk*D" in doc["settings"]["flops"]
    rows = doc["results"]
    assert len(rows) == 2 * 2 * 2 * 4  # seqlens x modes x causal x implementations
    by_impl = {}
    for row in rows:
        assert tuple(row) == bench.RESULT_FIELDS
        by_impl.setdefault(row["impl"], []).append(row)
    for row in by_impl["cupyflash"] + by_impl["naive"]:
        assert row["status"] == "ok", row
        assert row["ms_median"] == pytest.approx(2.0) and row["repeats"] == 3
        flops = bench.attention_flops(row["batch"], row["heads"], row["seqlen_q"], row["seqlen_k"],
                                      row["head_dim"], row["causal"], row["mode"])
        assert row["tflops"] == pytest.approx(flops / 2e-3 / 1e12)
    for row in by_impl["torch-flash"] + by_impl["jax-cudnn"]:
        assert row["status"] == "skipped" and row["note"] == "needs a CUDA device"
        assert row["ms_median"] is None
    with c.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench.RESULT_FIELDS
        csv_rows = list(reader)
    assert len(csv_rows) == len(rows)
    assert [r["impl"] for r in csv_rows] == [r["impl"] for r in rows]
    assert csv_rows[0]["ms_median"] == str(rows[0]["ms_median"])
    skipped = next(r for r in csv_rows if r["status"] == "skipped")
    assert skipped["ms_median"] == "" and skipped["tflops"] == ""


def test_bench_table_shows_header_and_speedup(cpu_bench):
    r = invoke("bench", *TINY, "--compare", "naive,torch-cudnn")
    assert r.exit_code == 0, r.output
    assert "FLOPs = 4*B*H*Sq*Sk*D forward" in r.output
    assert "cupyflash speed-up" in r.output and "1.00x" in r.output  # fake clock: equal times
    assert "skipped: needs a CUDA device" in r.output


def test_bench_refuses_to_time_a_wrong_result(cpu_bench, monkeypatch):
    real = api.flash_attention

    def wrong(*args, **kwargs):
        res = real(*args, **kwargs)
        if isinstance(res, tuple):
            return (res[0] + np.asarray(0.1, res[0].dtype),) + res[1:]
        return res + np.asarray(0.1, res.dtype)

    monkeypatch.setattr(api, "flash_attention", wrong)
    r = invoke("bench", *TINY, "--compare", "naive")
    assert r.exit_code == 1, r.output
    assert "FAILED" in r.output and "wrong result, not timed" in r.output
    assert "Traceback" not in r.output


def test_bench_reports_out_of_memory_without_a_traceback(cpu_bench, monkeypatch):
    def oom(self, case, inputs, device):
        raise MemoryError("Out of memory allocating 1,099,511,627,776 bytes")

    monkeypatch.setattr(bench.NaiveImpl, "prepare", oom)
    r = invoke("bench", *TINY, "--compare", "naive")
    assert r.exit_code == 0, r.output  # cupyflash itself ran
    assert "Out of memory: naive" in r.output and "oom" in r.output
    assert "Traceback" not in r.output


def test_bench_exits_1_when_cupyflash_itself_runs_out_of_memory(cpu_bench, monkeypatch):
    def oom(self, case, inputs, device):
        raise MemoryError("Out of memory allocating 1 TB")

    monkeypatch.setattr(bench.CupyflashImpl, "prepare", oom)
    r = invoke("bench", *TINY, "--compare", "none")
    assert r.exit_code == 1 and "Out of memory: cupyflash" in r.output, r.output
    assert "Traceback" not in r.output


def test_bench_reports_input_allocation_oom_for_every_implementation(monkeypatch):
    dev = bench.cpu_device(clock=FakeClock())
    monkeypatch.setattr(dev, "random_inputs", lambda case, seed: (_ for _ in ()).throw(MemoryError("oom")))
    cases = bench.make_cases([64], [32], ["float16"], [False], ["fwd"], batch=1, heads=1)
    impls = [bench.CupyflashImpl(), bench.NaiveImpl()]
    results = bench.run_benchmark(cases, impls, dev)
    assert [r.status for r in results] == ["oom", "oom"]


def test_unsupported_case_is_skipped_with_the_reason():
    dev = bench.cpu_device(clock=FakeClock())
    cases = bench.make_cases([64], [32], ["float16"], [True], ["fwd"], batch=1, heads=1, seqlen_k=32)

    class Picky(bench.Impl):
        name = "picky"

        def prepare(self, case, inputs, device):
            bench.impls._same_alignment(case, "picky")

    (r,) = bench.run_benchmark(cases, [Picky()], dev)
    assert r.status == "skipped" and "top-left aligned" in r.note


def test_progress_bar_goes_to_stderr(cpu_bench):
    r = CliRunner().invoke(cli.main, ["bench", *TINY[:-1], "--compare", "naive"])
    assert r.exit_code == 0, r.output
    assert "benchmarking" in r.stderr and "benchmarking" not in r.stdout


def test_bench_plot_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    r = invoke("bench", "--plot", tmp_path / "p.png")
    assert r.exit_code == 1, r.output
    assert "--plot" in r.output and "pip install" in r.output and "matplotlib" in r.output
    assert "Traceback" not in r.output


def test_bench_plot_writes_a_png(cpu_bench, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "p.png"
    r = invoke("bench", *TINY, "--compare", "naive", "--mode", "fwd,bwd", "--plot", png)
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_round_trip_and_comparison_table(tmp_path):
    case = bench.Case(1, 2, 64, 64, 32, "float16", True, "bwd")
    results = [bench.Result.timed(case, "cupyflash", [1.0], "cuda-events", 0),
               bench.Result.timed(case, "naive", [4.0], "cuda-events", 2**20),
               bench.Result.of(case, "jax-cudnn", "skipped", "JAX is not importable")]
    doc = bench.results_document(results, command=["x"], gpu={"name": "G"}, versions={})
    bench.write_json(tmp_path / "r.json", doc)
    doc2, back = bench.load_results(tmp_path / "r.json")
    assert back == results and doc2["gpu"] == {"name": "G"}
    table = bench.format_comparison(results)
    assert "(4.00x)" in table and "skipped" in table


def test_validate_document_names_the_problem():
    with pytest.raises(ValueError, match="lacks"):
        bench.validate_document({"results": []})
    doc = bench.results_document([], command=[], gpu=None, versions={})
    doc["results"] = [{"impl": "x"}]
    with pytest.raises(ValueError, match="fields"):
        bench.validate_document(doc)


# ---------------------------------------------------------------------------------------
# Variants: the flags reach cupyflash, the reference, the peers and the results

VARIANT_FLAGS = ["--kv-heads", "2", "--window", "8,0", "--softcap", "5", "--alibi", "--sinks"]
ALL_VARIANTS = "kv_heads=2 window=8,0 softcap=5 alibi sinks"
QUICK_CHECK = ["check", "--backend", "numpy", "--quick", "--dtype", "float32", "-d", "8"]
#: one variant each, as Variant arguments
ONE_VARIANT = {"gqa": dict(kv_heads=2), "window": dict(window=(8, 0)), "softcap": dict(softcap=5.0),
               "alibi": dict(alibi=True), "sinks": dict(sinks=True)}


@pytest.fixture
def api_calls(monkeypatch):
    """[(function name, k's shape, keyword arguments)] of every cupyflash call; calls unchanged."""
    calls = []
    for name, k_arg in (("flash_attention", 1), ("flash_attention_backward", 2)):
        def spy(*args, _real=getattr(api, name), _name=name, _k=k_arg, **kwargs):
            calls.append((_name, args[_k].shape, kwargs))
            return _real(*args, **kwargs)
        monkeypatch.setattr(api, name, spy)
    return calls


def _assert_all_variants_passed(calls, heads=4):
    assert {name for name, _, _ in calls} == {"flash_attention", "flash_attention_backward"}
    for name, k_shape, kw in calls:
        assert k_shape[2] == 2, name  # 2 kv heads
        assert kw["window_size"] == (8, 0) and kw["softcap"] == 5.0, name
        np.testing.assert_array_equal(kw["alibi_slopes"], 2.0 ** (-8.0 * np.arange(1, heads + 1) / heads))
        assert kw["sinks"].shape == (heads,) and kw["sinks"].dtype == np.float32, name


def test_check_runs_every_variant_on_the_numpy_backend(api_calls):
    r = invoke(*QUICK_CHECK, *VARIANT_FLAGS, "-v")
    assert r.exit_code == 0, r.output
    assert f"6 cases (B=2 H=4 {ALL_VARIANTS})" in r.output  # --kv-heads 2: 4 query heads by default
    assert "6 passed, 0 failed" in r.output
    assert r.output.count("dsinks max err") == 6  # the sinks' gradient is checked too
    _assert_all_variants_passed(api_calls)


@pytest.mark.parametrize("flag, kwarg", [(["--window", "8,0"], "window_size"), (["--softcap", "5"], "softcap"),
                                         (["--alibi"], "alibi_slopes"), (["--sinks"], "sinks")])
def test_check_compares_with_the_reference_of_the_variant(monkeypatch, flag, kwarg):
    """cupyflash called without the variant disagrees with the reference, which has it."""
    for name in ("flash_attention", "flash_attention_backward"):
        def without(*args, _real=getattr(api, name), **kwargs):
            assert kwarg in kwargs
            return _real(*args, **{k: v for k, v in kwargs.items() if k != kwarg})
        monkeypatch.setattr(api, name, without)
    r = invoke(*QUICK_CHECK, *flag)
    assert r.exit_code == 1, r.output
    assert "0 passed, 6 failed" in r.output and "FAIL" in r.output


def test_check_heads_follow_kv_heads(api_calls):
    r = invoke(*QUICK_CHECK, "--kv-heads", "3", "--heads", "6")
    assert r.exit_code == 0 and "(B=2 H=6 kv_heads=3)" in r.output, r.output
    assert {(k[2], kw.get("window_size")) for _, k, kw in api_calls} == {(3, None)}
    r = invoke(*QUICK_CHECK, "--kv-heads", "1", "--heads", "1")  # as many kv heads as heads: plain attention
    assert r.exit_code == 0 and "(B=2 H=1)" in r.output, r.output


BENCH_VARIANT = ["--seqlen", "32,48", "--batch", "1", "--heads", "4", "--head-dim", "32", "--warmup", "1",
                 "--repeats", "3", "--no-progress", "--mode", "fwd,bwd"]


def test_bench_passes_the_variants_and_reports_them(cpu_bench, api_calls, tmp_path):
    j, c = tmp_path / "r.json", tmp_path / "r.csv"
    r = invoke("bench", *BENCH_VARIANT, *VARIANT_FLAGS, "--compare", "naive,torch-flash,fa4", "--json", j, "--csv", c)
    assert r.exit_code == 0, r.output
    assert f"variant: {ALL_VARIANTS}" in r.output and "variant" in r.output.splitlines()[4]  # the table's column
    _assert_all_variants_passed(api_calls)
    doc = json.loads(j.read_text())
    bench.validate_document(doc)
    assert doc["schema"] == "cupyflash-bench/2"
    rows = doc["results"]
    assert len(rows) == 2 * 2 * 4 and {row["variant"] for row in rows} == {ALL_VARIANTS}
    for row in rows:
        if row["impl"] == "cupyflash":  # passed the gate (out, lse, dq, dk, dv, dsinks) and was timed
            assert row["status"] == "ok", row
            i, jj = np.arange(row["seqlen_q"])[:, None], np.arange(row["seqlen_k"])[None, :]
            pairs = int(((jj >= i - 8) & (jj <= i)).sum())  # window 8,0 on the diagonal
            flops = 4 * 1 * 4 * 32 * pairs * bench.MODE_FLOP_FACTOR[row["mode"]]
            assert row["tflops"] == pytest.approx(flops / 2e-3 / 1e12)
        elif row["impl"] == "naive":
            assert row["status"] == "skipped" and row["note"] == "naive cannot do softcap, alibi, sinks", row
        else:
            assert row["status"] == "skipped" and row["note"] == "needs a CUDA device", row
    with c.open() as f:
        assert {line["variant"] for line in csv.DictReader(f)} == {ALL_VARIANTS}


def test_bench_naive_peer_does_gqa_and_windows(cpu_bench):
    r = invoke("bench", *BENCH_VARIANT, "--kv-heads", "1", "--window", "4,2", "--causal", "both", "--compare", "naive")
    assert r.exit_code == 0, r.output
    assert "skipped" not in r.output and r.output.count("1.00x") == 2 * 2 * 2  # seqlens x modes x causal


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (5, 0), (3, 7)])
def test_naive_peer_matches_the_reference_with_gqa_and_windows(rng, causal, window):
    q, do = (rng.standard_normal((2, 37, 4, 16)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((2, 53, 2, 16)).astype(np.float32) for _ in range(2))
    out, P = bench.naive_forward(np, q, k, v, causal, 0.25, window_size=window)
    grads = bench.naive_backward(np, do, q, k, v, out, P, 0.25)
    kw = dict(causal=causal, softmax_scale=0.25, window_size=window)
    want_out, _ = reference.attention(q, k, v, **kw)
    np.testing.assert_allclose(out, want_out, atol=2e-5)
    for name, g, w in zip(("dq", "dk", "dv"), grads, reference.attention_backward(do, q, k, v, **kw)):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, atol=1e-4, err_msg=name)


def test_flops_count_the_pairs_a_window_lets_through():
    dense = bench.attention_flops(1, 1, 64, 64, 32)
    assert bench.attention_flops(1, 1, 64, 64, 32, window_size=(-1, -1), causal=True) == dense / 2
    assert bench.attention_flops(1, 1, 64, 64, 32, window_size=(63, 63)) == dense  # covers every key
    assert bench.visible_pairs(4, 4, False, (1, 0)) == 1 + 2 + 2 + 2
    assert bench.visible_pairs(4, 4, True, (-1, 5)) == 10  # causal: right = 0
    assert bench.visible_pairs(2, 6, False, (0, -1)) == 2 + 1  # bottom-right: rows see keys 4.. and 5..
    assert bench.visible_pairs(6, 2, True, (-1, -1)) == 1 + 2  # only the last two rows see keys
    case = bench.Case(1, 2, 64, 64, 32, "float16", False, "bwd", bench.Variant(window=(8, 0)))
    assert case.flops == bench.attention_flops(1, 2, 64, 64, 32, mode="bwd", window_size=(8, 0))


def test_variant_description_and_inputs():
    assert bench.Variant().describe(8) == "" and bench.Variant(kv_heads=8).describe(8) == ""
    v = bench.Variant(kv_heads=2, window=(8, 0), softcap=5.0, alibi=True, sinks=True)
    assert v.describe(8) == ALL_VARIANTS and v.features(8) == bench.VARIANTS
    case = bench.Case(1, 8, 16, 24, 8, "float32", False, "fwd", v)
    assert case.label().endswith(ALL_VARIANTS)
    a, b = (bench.cpu_device().random_inputs(case, seed) for seed in (3, 3))
    assert a.q.shape == (1, 16, 8, 8) and a.k.shape == a.v.shape == (1, 24, 2, 8)
    assert a.variants["window_size"] == (8, 0) and a.variants["softcap"] == 5.0
    np.testing.assert_array_equal(a.variants["alibi_slopes"], 2.0 ** -np.arange(1, 9))
    np.testing.assert_array_equal(a.variants["sinks"], b.variants["sinks"])  # fixed by the seed
    assert bench.cpu_device().random_inputs(bench.Case(1, 8, 16, 24, 8, "float32", False, "fwd"), 3).variants == {}


@pytest.mark.parametrize("peer, can", [
    ("cupyflash", bench.VARIANTS), ("naive", ("gqa", "window")), ("torch-flash", ("gqa",)),
    ("torch-cudnn", ("gqa",)), ("jax-cudnn", ("gqa", "window")), ("fa4", ("gqa", "window", "softcap", "sinks"))])
def test_peers_refuse_the_variants_they_cannot_do(peer, can):
    impl = bench.implementations()[peer]
    for feature, kwargs in ONE_VARIANT.items():
        case = bench.Case(1, 4, 64, 64, 64, "bfloat16", False, "fwd", bench.Variant(**kwargs))
        assert case.features == (feature,)
        if feature in can:
            impl.refuse_variants(case)
        else:
            with pytest.raises(bench.Unsupported, match=f"^{peer} cannot do {feature}$"):
                impl.refuse_variants(case)


def test_runner_skips_a_variant_the_peer_cannot_do():
    cases = bench.make_cases([32], [32], ["float32"], [False], ["fwd"], batch=1, heads=2,
                             variant=bench.Variant(softcap=3.0))
    flash, naive = bench.run_benchmark(cases, [bench.CupyflashImpl(), bench.NaiveImpl()],
                                       bench.cpu_device(clock=FakeClock()), warmup=0, repeats=1)
    assert flash.status == "ok" and flash.variant == "softcap=3"
    assert naive.status == "skipped" and naive.note == "naive cannot do softcap"


def test_jax_peer_takes_only_causal_windows_aligned_like_cupyflash():
    jax_peer = bench.JaxCudnnImpl()
    wide = bench.Case(1, 2, 64, 64, 64, "bfloat16", False, "fwd", bench.Variant(window=(8, 4)))
    with pytest.raises(bench.Unsupported, match="right = 0"):
        jax_peer.prepare(wide, None, _fake_gpu_device())
    shifted = bench.Case(1, 2, 64, 128, 64, "bfloat16", False, "fwd", bench.Variant(window=(8, 0)))
    with pytest.raises(bench.Unsupported, match="sliding window is top-left aligned"):
        jax_peer.prepare(shifted, None, _fake_gpu_device())


class FakeTensor:
    """What the torch peers touch of a tensor, around a numpy array."""

    def __init__(self, array, requires_grad=False):
        self.array, self.requires_grad = array, requires_grad

    def requires_grad_(self, flag=True):
        self.requires_grad = flag
        return self

    def transpose(self, a, b):
        return FakeTensor(self.array.swapaxes(a, b), self.requires_grad)


def _fake_torch(monkeypatch, **functional):
    """torch (from_dlpack, cuda.is_available) and torch.nn.functional as fake modules."""
    torch, nn, F = (types.ModuleType(n) for n in ("torch", "torch.nn", "torch.nn.functional"))
    torch.from_dlpack, torch.cuda, torch.nn, nn.functional = FakeTensor, types.SimpleNamespace(is_available=lambda: True), nn, F
    F.__dict__.update(functional)
    for module in (torch, nn, F):
        monkeypatch.setitem(sys.modules, module.__name__, module)


def test_fa4_peer_is_unavailable_without_flash_attn_cute(monkeypatch):
    _fake_torch(monkeypatch)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # import flash_attn.cute -> ImportError
    reason = bench.FA4Impl().unavailable(_fake_gpu_device())
    assert reason.startswith("FlashAttention-4 is not importable (") and "install flash-attn-4" in reason
    assert bench.FA4Impl().unavailable(bench.cpu_device()) == "needs a CUDA device"


def test_fa4_peer_calls_flash_attn_func_with_the_variants(monkeypatch):
    calls = []

    def flash_attn_func(q, k, v, **kwargs):
        calls.append(((q, k, v), kwargs))
        return "out", "lse"

    _fake_torch(monkeypatch)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    case = bench.Case(1, 4, 64, 64, 64, "bfloat16", True, "bwd",
                      bench.Variant(kv_heads=2, window=(8, -1), softcap=5.0, sinks=True))
    inputs = bench.cpu_device().random_inputs(case, 0)
    qkv = [FakeTensor(x, True) for x in (inputs.q, inputs.k, inputs.v)]
    attn, leaves, dout, note = bench.FA4Impl().bind(case, inputs, qkv, "dout")
    assert len(calls) == 1  # compiled once in bind, outside the timing
    assert attn() == "out" and dout == "dout" and "zero-copy" in note
    (args, kwargs), _ = calls
    assert args == tuple(qkv)  # cupyflash's (B, S, H, D) layout, k and v with 2 heads
    sink = kwargs.pop("learnable_sink")
    assert kwargs == dict(softmax_scale=inputs.scale, causal=True, softcap=5.0, window_size=(8, None))
    assert sink.array is inputs.variants["sinks"] and sink.requires_grad  # dsinks is timed too
    assert leaves == [*qkv, sink]
    fp32 = bench.Case(1, 4, 64, 64, 64, "float32", False, "fwd")
    with pytest.raises(bench.Unsupported, match="float16 and bfloat16 only"):
        bench.FA4Impl().bind(fp32, inputs, qkv, "dout")


def test_fa4_peer_hides_the_command_line_from_cute_dsl(monkeypatch):
    """CuTe DSL parses sys.argv on every compile: `bench -d 128` must not reach it."""
    monkeypatch.setattr(sys, "argv", ["cupyflash", "bench", "-d", "128"])
    (context,) = bench.FA4Impl().contexts(bench.Case(1, 4, 64, 64, 128, "bfloat16", False, "fwd"))
    with context:
        assert sys.argv == ["cupyflash"]
    assert sys.argv == ["cupyflash", "bench", "-d", "128"]


@pytest.mark.parametrize("kv_heads, gqa", [(None, False), (2, True)])
def test_sdpa_peers_ask_for_gqa(monkeypatch, kv_heads, gqa):
    calls = []

    def scaled_dot_product_attention(q, k, v, **kwargs):
        calls.append(((q.array.shape, k.array.shape), kwargs))
        return "out"

    _fake_torch(monkeypatch, scaled_dot_product_attention=scaled_dot_product_attention)
    case = bench.Case(1, 4, 64, 64, 64, "bfloat16", False, "fwd", bench.Variant(kv_heads=kv_heads))
    inputs = bench.cpu_device().random_inputs(case, 0)
    qkv = [FakeTensor(x) for x in (inputs.q, inputs.k, inputs.v)]
    attn, leaves, dout, note = bench.implementations()["torch-flash"].bind(case, inputs, qkv, FakeTensor(inputs.dout))
    assert attn() == "out" and leaves == qkv and dout.array.shape == (1, 4, 64, 64)  # (B, H, S, D)
    (shapes, kwargs), _ = calls
    assert shapes == ((1, 4, 64, 64), (1, 2 if gqa else 4, 64, 64))
    assert kwargs == dict(is_causal=False, scale=inputs.scale, **({"enable_gqa": True} if gqa else {}))


def test_results_of_the_first_schema_still_load(tmp_path):
    case = bench.Case(1, 2, 64, 64, 32, "float16", True, "fwd")
    doc = bench.results_document([bench.Result.timed(case, "cupyflash", [1.0], "cuda-events", 0)],
                                 command=["x"], gpu=None, versions={})
    row = doc["results"][0]
    del row["variant"]
    (tmp_path / "old.json").write_text(json.dumps({**doc, "schema": "cupyflash-bench/1"}))
    doc2, (r,) = bench.load_results(tmp_path / "old.json")
    assert doc2["schema"] == bench.SCHEMA and r.variant == "" and r.ms_median == 1.0


# ---------------------------------------------------------------------------------------
# info

@pytest.mark.skipif(GPU_SKIP_REASON is None, reason="a CUDA device is present")
def test_info_without_gpu_says_so_and_prints_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "k.cubin").write_bytes(b"x" * 2048)
    r = invoke("info", "--json", tmp_path / "info.json")
    assert r.exit_code == 0, r.output
    assert "No CUDA device:" in r.output
    for text in ("CuPy", "CUDA runtime", "NVRTC", "NumPy", "Kernel cache:", str(tmp_path / "cache"),
                 "1 files, 2.0 KB", "Kernel paths: need a CUDA device"):
        assert text in r.output, text
    doc = json.loads((tmp_path / "info.json").read_text())
    assert doc["gpu"] is None and doc["no_gpu_reason"]
    assert doc["kernel_cache"]["files"] == 1 and doc["versions"]["cupyflash"]


def test_info_groups_head_dims_by_kernel_path(monkeypatch):
    from cupyflash import _cuda_backend

    monkeypatch.setattr(_cuda_backend, "kernel_path",
                        lambda dtype, d, device=None: f"tile {64 if d <= 64 else 128}", raising=False)
    rows = cli._kernel_paths(0)
    assert ("bfloat16", "8-64", "tile 64") in rows and ("float32", "72-256", "tile 128") in rows


# ---------------------------------------------------------------------------------------
# check

def test_check_quick_passes_on_the_numpy_backend():
    r = invoke("check", "--backend", "numpy", "--quick", "--dtype", "fp16,bf16,float32,float64")
    assert r.exit_code == 0, r.output
    assert "NumPy backend" in r.output and "FAIL" not in r.output
    assert "48 passed, 0 failed" in r.output
    assert "max err" in r.output and "bound" in r.output


def test_check_fails_with_exit_1_on_a_wrong_result(monkeypatch):
    real = api.flash_attention_backward

    def wrong(*args, **kwargs):
        dq, dk, dv = real(*args, **kwargs)
        return dq, dk * 2, dv

    monkeypatch.setattr(api, "flash_attention_backward", wrong)
    r = invoke("check", "--backend", "numpy", "--quick", "--dtype", "float32", "-d", "64")
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output and "dk max err" in r.output and "0 passed" in r.output


def test_check_reports_an_exception_as_a_failed_case(monkeypatch):
    monkeypatch.setattr(api, "flash_attention", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    r = invoke("check", "--backend", "numpy", "--quick", "--dtype", "float16", "-d", "64")
    assert r.exit_code == 1 and "ERROR RuntimeError: boom" in r.output, r.output


@pytest.mark.skipif(GPU_SKIP_REASON is None, reason="a CUDA device is present")
def test_check_cuda_backend_without_gpu_is_a_clear_error():
    r = invoke("check", "--backend", "cuda")
    assert r.exit_code == 1 and "needs a CUDA device" in r.output, r.output


# ---------------------------------------------------------------------------------------
# kernels

REPORT = [
    {"kernel": "flash_fwd<__half, 64>", "kind": "fwd", "dtype": "float16", "head_dim": 64, "causal": False,
     "arch": "sm_90", "registers": 168, "spill_stores": 0, "spill_loads": 0, "stack_bytes": 0,
     "shared_bytes": 0, "dynamic_shared_bytes": 36864},
    {"kernel": "flash_bwd<__half, 64>", "kind": "bwd", "dtype": "float16", "head_dim": 64, "causal": True,
     "arch": "sm_90", "registers": 255, "spill_stores": 8, "spill_loads": 12, "stack_bytes": 16,
     "shared_bytes": 1024, "dynamic_shared_bytes": 111616},
]


@pytest.fixture
def fake_report(monkeypatch):
    calls = []

    def report(**kwargs):
        calls.append(kwargs)
        return [dict(r, arch=kwargs["arch"]) for r in REPORT]

    monkeypatch.setattr(cli, "_compile_report", report)
    return calls


def test_kernels_prints_the_report(fake_report, tmp_path):
    r = invoke("kernels", "--arch", "sm_80", "--dtype", "fp16", "-d", "64", "--json", tmp_path / "k.json")
    assert r.exit_code == 0, r.output
    assert fake_report == [{"arch": "sm_80", "dtypes": [np.dtype(np.float16)], "head_dims": [64]}]
    assert "flash_bwd<__half, 64>" in r.output and "255" in r.output and "109.0" in r.output
    assert "1 of 2 spill registers" in r.output
    doc = json.loads((tmp_path / "k.json").read_text())
    assert doc["arch"] == "sm_80" and len(doc["kernels"]) == 2


def test_kernels_fail_on_spill(fake_report):
    assert invoke("kernels", "--arch", "sm_90a").exit_code == 0
    r = invoke("kernels", "--arch", "sm_90a", "--fail-on-spill")
    assert r.exit_code == 1, r.output
    assert fake_report[-1] == {"arch": "sm_90a", "dtypes": None, "head_dims": None}


@pytest.mark.slow
def test_kernels_compiles_for_real_with_nvrtc():
    pytest.importorskip("cupyflash._compile", reason="cupyflash._compile is not in this tree yet")
    r = invoke("kernels", "--arch", "sm_80", "--dtype", "float16", "--head-dim", "64")
    assert r.exit_code == 0, r.output
    assert "compile report for sm_80" in r.output and "flash_fwd" in r.output
    rows = [line.split() for line in r.output.splitlines() if "float16" in line]
    assert rows and all(int(row[-6]) > 0 for row in rows), r.output  # registers column


# ---------------------------------------------------------------------------------------
# run_peers (the published sweep)

@pytest.fixture
def run_peers():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import run_peers
    finally:
        sys.path.pop(0)
    return run_peers


def test_run_peers_sweep_is_the_published_one(run_peers):
    full = run_peers.published_cases(False, ["bfloat16", "float16"])
    assert len(full) == 6 * 2 * 2 * 2 * 2  # seqlens x head_dims x causal x modes x dtypes
    assert {c.seqlen_q for c in full} == {512, 1024, 2048, 4096, 8192, 16384}
    assert {c.head_dim for c in full} == {64, 128} and {c.mode for c in full} == {"fwd", "bwd"}
    assert all(c.batch * c.seqlen_q == 16384 and c.heads * c.head_dim == 2048 for c in full)
    assert len(run_peers.published_cases(True, ["bfloat16"])) == 2 * 2 * 2 * 2
    assert run_peers.slug("NVIDIA H200 NVL") == "nvidia-h200-nvl"


def test_run_peers_writes_results_plots_and_summary(run_peers, monkeypatch, tmp_path):
    """The whole script on the NumPy backend with a fake clock and a tiny sweep."""
    monkeypatch.setattr(bench, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(bench, "cuda_device", lambda device_id: bench.cpu_device(clock=FakeClock()))
    monkeypatch.setattr(bench, "gpu_info", lambda device_id: {"name": "Fake GPU 9000", "cc": "9.0"})
    monkeypatch.setattr(run_peers, "published_cases", lambda quick, dtypes: bench.make_cases(
        [32, 64], [32], dtypes, [False, True], ["fwd", "bwd"], batch=1, heads=2))
    r = CliRunner().invoke(run_peers.run, ["--quick", "--dtype", "bfloat16", "--compare", "naive,jax-cudnn",
                                           "--out-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    (path,) = tmp_path.glob("fake-gpu-9000-20*-bfloat16-quick.json")
    doc, results = bench.load_results(path)
    assert doc["gpu"]["name"] == "Fake GPU 9000" and doc["settings"]["sweep"] == "quick"
    assert len(results) == 2 * 2 * 2 * 3
    assert "naive TF/s (x)" in r.output and "(1.00x)" in r.output
    if _has_matplotlib():
        png = path.with_name(path.stem + "-bfloat16.png")
        assert png.exists(), r.output
        png.unlink()
        again = CliRunner().invoke(run_peers.run, ["--plot-only", str(path)])
        assert again.exit_code == 0 and png.exists(), again.output
    else:
        assert "no plot" in r.output and "matplotlib" in r.output


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------
# GPU

@pytest.mark.gpu
def test_gpu_bench_with_naive_peer_writes_json(tmp_path):
    j = tmp_path / "b.json"
    r = invoke("bench", "--seqlen", "256,512", "--batch", "2", "--heads", "4", "--head-dim", "64",
               "--mode", "fwd,bwd,fwd+bwd", "--causal", "both", "--compare", "naive",
               "--warmup", "1", "--repeats", "3", "--json", j, "--no-progress")
    assert r.exit_code == 0, r.output
    doc = json.loads(j.read_text())
    bench.validate_document(doc)
    assert doc["gpu"]["name"] and doc["gpu"]["sm_count"] > 0 and "." in doc["gpu"]["cc"]
    assert doc["versions"]["nvrtc"] and doc["versions"]["driver"] != "none"
    for row in doc["results"]:
        assert row["status"] == "ok", json.dumps(row)
        assert row["timer"] == "cuda-events" and row["tflops"] > 0
        assert row["ms_min"] <= row["ms_median"] <= row["ms_max"]
        assert row["peak_extra_mb"] > 0
    assert "cupyflash speed-up" in r.output


@pytest.mark.gpu
@pytest.mark.parametrize("peer, module", [("torch-flash", "torch"), ("torch-cudnn", "torch"),
                                          ("jax-cudnn", "jax"), ("fa4", "flash_attn.cute")])
def test_gpu_peers_run_beside_cupyflash(peer, module):
    pytest.importorskip(module)
    dev = bench.cuda_device(0)
    impls = [bench.implementations()[n] for n in ("cupyflash", peer)]
    cases = bench.make_cases([512], [64, 128], ["bfloat16", "float16"], [False, True],
                             ["fwd", "bwd", "fwd+bwd"], batch=2, heads=4)
    results = bench.run_benchmark(cases, impls, dev, warmup=1, repeats=3)
    problems = [f"{r.impl} {r.mode} {r.dtype} D={r.head_dim} causal={r.causal}: {r.status} {r.note}"
                for r in results if r.status != "ok"]
    assert not problems, "\n".join(problems)
    for r in results:
        assert r.tflops > 0 and r.ms_min <= r.ms_median <= r.ms_max
        assert (r.peak_extra_mb is None) == (peer == "jax-cudnn" and r.impl == peer)


@pytest.mark.gpu
def test_gpu_peers_that_cannot_run_say_why():
    dev = bench.cuda_device(0)
    cases = bench.make_cases([256], [64], ["float32"], [True], ["fwd"], batch=1, heads=2, seqlen_k=512)
    impls = list(bench.implementations().values())
    for r in bench.run_benchmark(cases, impls, dev, warmup=1, repeats=2):
        assert r.status in ("ok", "skipped"), r
        assert r.status == "ok" or r.note, r
        if r.impl in ("cupyflash", "cupyflash-deterministic", "naive"):
            assert r.status == "ok", r
        else:  # causal with seqlen_q != seqlen_k: the peers align the mask differently
            assert r.status == "skipped", r


@pytest.mark.gpu
@pytest.mark.parametrize("feature", list(ONE_VARIANT))
def test_gpu_variants_run_beside_the_peers_that_can_do_them(feature):
    """cupyflash passes its gate with the variant; a peer runs it if it can, else says why."""
    dev = bench.cuda_device(0)
    impls = list(bench.implementations().values())
    variant = bench.Variant(**{**ONE_VARIANT[feature], **({"window": (64, 0)} if feature == "window" else {})})
    cases = bench.make_cases([512], [128], ["bfloat16"], [True], ["fwd", "bwd"], batch=2, heads=4, variant=variant)
    reasons = {impl.name: impl.unavailable(dev) for impl in impls}
    for r in bench.run_benchmark(cases, impls, dev, warmup=1, repeats=2):
        impl = bench.implementations()[r.impl]
        if r.impl.startswith("cupyflash"):
            assert r.status == "ok", r
        elif reasons[r.impl] or feature not in impl.variants:
            assert r.status == "skipped" and r.note == (reasons[r.impl] or f"{r.impl} cannot do {feature}"), r
        else:
            assert r.status == "ok" or (r.status == "skipped" and r.note), r


@pytest.mark.gpu
def test_gpu_bench_out_of_memory_is_a_clear_message():
    # naive attention would materialise 32 x 65536^2 scores (275 GB in fp16) and fails at its
    # first allocation; cupyflash needs 268 MB per tensor and is checked on its last 4096 rows
    r = invoke("bench", "--seqlen", "65536", "--batch", "1", "--heads", "32", "--head-dim", "64",
               "--compare", "naive", "--warmup", "0", "--repeats", "1", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "Out of memory: naive" in r.output and "Traceback" not in r.output
    assert "Out of memory: cupyflash" not in r.output


@pytest.mark.gpu
def test_gpu_check_quick_passes():
    r = invoke("check", "--quick")
    assert r.exit_code == 0, r.output
    assert "on GPU 0" in r.output and "0 failed" in r.output


@pytest.mark.gpu
def test_gpu_info_describes_the_device():
    r = invoke("info")
    assert r.exit_code == 0, r.output
    for text in ("compute capability", "multiprocessors", "shared memory per block", "NVRTC",
                 "Kernel paths on GPU 0"):
        assert text in r.output, text


def test_readme_table_is_generated_from_a_published_run():
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("readme_table", root / "bench" / "readme_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    published = sorted((root / "bench" / "results").glob("nvidia-h200-*-bfloat16.json"))[-1]
    result = CliRunner().invoke(mod.main, [str(published), "--seqlens", "4096"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| fwd") or line.startswith("| bwd")]
    assert len(rows) == 8, result.output  # fwd/bwd x D 64/128 x causal
    assert all(line.count("x)") == 3 for line in rows), "each peer with cupyflash's ratio to it"
