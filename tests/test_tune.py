"""Tile tuning (issue 21) without a GPU, on fake device descriptions. As specifications:

- the candidates of an entry fit the device's shared memory, satisfy the kernels' compile-time
  rules, start with the built-in choice and include the wgmma tiles only on compute capability 9.0;
- the spill check drops every candidate whose offline report shows spills or serialised wgmma;
- a table written for a device reads back the same tiles; a table from another device or format,
  or with another driver, NVRTC or cupyflash, is ignored with one warning naming why;
- kernel selection takes the tuned tile first, then the built-in table, then the shrink rule for
  entries too large for the device; CUPYFLASH_TUNE=0 ignores tuned tables;
- `cupyflash tune --dry-run` lists the candidates without a GPU.
"""
import json
import warnings

import pytest
from click.testing import CliRunner

from cupyflash import _config, cli
from cupyflash._dtypes import BFLOAT16, FLOAT16
import importlib

tuning = importlib.import_module("cupyflash.tune")

H200 = tuning.DeviceInfo("NVIDIA H200", 90, 132, 227 * 1024, 12090, "13.0", "0.1.0")
RTX = tuning.DeviceInfo("NVIDIA GeForce RTX 3090", 86, 82, 99 * 1024, 12090, "13.0", "0.1.0")


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.DIR_ENV, str(tmp_path))
    tuning.clear_cache()
    yield tmp_path
    tuning.clear_cache()


@pytest.mark.parametrize("device", [H200, RTX], ids=["sm90", "sm86"])
@pytest.mark.parametrize("pass_", tuning.PASSES)
@pytest.mark.parametrize("cls", [64, 128, 256])
def test_candidates_fit_the_device_and_the_kernels_rules(device, pass_, cls):
    for causal in (False, True):
        for length in (("short", "long") if pass_ == "fwd" else ("long",)):
            cands = tuning.candidates(pass_, BFLOAT16, cls, causal, device, length)
            builtin = _config.kernel_set(BFLOAT16, cls, causal, device.cc, seqlen_k=128 if length == "short" else None)
            assert cands[0] == (builtin.fwd if pass_ == "fwd" else builtin.bwd)
            assert len(cands) == len(set(cands)) > 1
            for c in cands:
                assert c.smem_bytes(cls, 2) <= device.smem_optin, (c, cls)
                hopper = isinstance(c, (_config.Sm90FwdConfig, _config.Sm90BwdConfig))
                assert not hopper or (device.cc == 90 and not (pass_ == "fwd" and length == "short")), c
                assert hopper or _config.valid_tile(c, cls), c


def test_the_spill_check_drops_what_the_offline_report_flags():
    cands = tuning.candidates("fwd", BFLOAT16, 128, False, H200)
    names = [_config.kernel_set(BFLOAT16, 128, False, 90, fwd=c).fwd_name() for c in cands]
    flagged = {names[1]: {"spill_stores": 8}, names[2]: {"wgmma_serialized": True}, names[3]: {"stack_bytes": 16}}

    def report(asked, arch):
        assert arch == "sm_90a" and set(asked) == set(names)
        return {n: flagged.get(n, {"registers": 128}) for n in asked}
    kept = tuning.spill_free(cands, "fwd", BFLOAT16, 128, False, 90, report)
    assert kept == [c for c, n in zip(cands, names) if n not in flagged]


def _entries():
    return {tuning.entry_key(BFLOAT16, 128, True, "bwd", "long"): {"config": _config.BwdConfig(64, 64, 8, 1), "ms": 1.0},
            tuning.entry_key(FLOAT16, 64, False, "fwd", "long"): {"config": _config.Sm90FwdConfig(96, 2), "ms": 2.0}}


def test_a_table_reads_back_the_tiles_it_was_written_with(table_dir):
    path = tuning.save_table(H200, _entries())
    assert path == table_dir / f"{H200.slug()}.json"
    assert tuning.load_table(H200) == {k: v["config"] for k, v in _entries().items()}


@pytest.mark.parametrize("change,why", [
    (dict(driver=13000), "stale: driver 12090"), (dict(nvrtc="13.5"), "stale: nvrtc '13.0'"),
    (dict(cupyflash="0.2.0"), "stale: cupyflash '0.1.0'"), (dict(sm_count=114), "measured on 'NVIDIA H200' sm_90"),
])
def test_a_stale_or_foreign_table_is_ignored_with_one_warning(table_dir, change, why):
    tuning.save_table(H200, _entries())
    now = tuning.DeviceInfo(**{**H200.__dict__, **change})
    if "sm_count" in change:  # another device: another file name, so point it at this one
        (table_dir / f"{now.slug()}.json").write_text((table_dir / f"{H200.slug()}.json").read_text())
    with pytest.warns(RuntimeWarning, match=why):
        assert tuning.load_table(now) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuning.load_table(now) is None  # once per table


def test_another_format_is_ignored(table_dir):
    path = tuning.save_table(H200, _entries())
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "format": 99}))
    with pytest.warns(RuntimeWarning, match="format 99"):
        assert tuning.load_table(H200) is None


def test_kernel_selection_takes_tuned_then_built_in_then_the_shrink_rule():
    key = tuning.entry_key(BFLOAT16, 128, True, "bwd", "long")
    tuned = {key: _config.BwdConfig(64, 32, 4, 1)}
    assert _config.kernel_set(BFLOAT16, 128, True, 90, tuned=tuned).bwd == _config.BwdConfig(64, 32, 4, 1)
    assert _config.kernel_set(BFLOAT16, 128, True, 90).bwd == _config.TILES_SM90[(128, True)][1]
    # the tuned table keys by dtype: fp16 keeps the built-in tile
    assert _config.kernel_set(FLOAT16, 128, True, 90, tuned=tuned).bwd == _config.TILES_SM90[(128, True)][1]
    # a short-key entry applies to short calls only
    short = {tuning.entry_key(BFLOAT16, 128, False, "fwd", "short"): _config.FwdConfig(64, 32, 4)}
    assert _config.kernel_set(BFLOAT16, 128, False, 90, seqlen_k=100, tuned=short).fwd == _config.FwdConfig(64, 32, 4)
    assert _config.kernel_set(BFLOAT16, 128, False, 90, seqlen_k=4096, tuned=short).fwd == _config.HOPPER_FWD[(128, False)]
    # sm_86 allows 99 KB: the table's 121 KB backward tile keeps its warps and halves BLOCK_N
    assert _config.TILES_DEFAULT[(128, False)][1].smem_bytes(128, 2) > 99 * 1024
    assert _config.kernel_set(BFLOAT16, 128, False, 86).bwd == _config.BwdConfig(64, 32, 8, 2)


def test_the_shrink_rule_halves_block_n_then_block_m_then_drops_a_stage_and_ends_at_the_smallest_tile():
    big = _config.BwdConfig(128, 128, 8, 2)
    assert _config.shrink_to_fit(big, 64, 2, 163 * 1024, "smallest") == _config.BwdConfig(128, 64, 8, 2)
    assert _config.shrink_to_fit(big, 64, 2, 99 * 1024, "smallest") == _config.BwdConfig(64, 32, 8, 2)
    assert _config.shrink_to_fit(_config.BwdConfig(32, 64, 8, 2), 192, 2, 99 * 1024, "s") == _config.BwdConfig(32, 64, 8, 1)
    assert _config.shrink_to_fit(big, 64, 2, 10, "smallest") == "smallest"
    assert _config.shrink_to_fit(_config.FwdConfig(128, 128, 4), 256, 2, 99 * 1024, "s") == _config.FwdConfig(128, 32, 4)


def test_tune_zero_ignores_tuned_tables(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.DIR_ENV, str(tmp_path))
    monkeypatch.setattr(tuning, "_device_table", lambda device_id: {"x": 1})
    assert tuning.active_table(0) == {"x": 1}
    monkeypatch.setenv(tuning.DISABLE_ENV, "0")
    assert tuning.active_table(0) is None
    assert "CUPYFLASH_TUNE=0" in tuning.table_status(H200)


def test_the_status_says_which_table_is_in_use(table_dir):
    assert tuning.table_status(H200).startswith("built-in (no tuned table at")
    tuning.save_table(H200, _entries())
    assert tuning.table_status(H200).startswith(f"tuned: {table_dir}")


def test_dry_run_lists_the_candidates_without_a_gpu(monkeypatch):
    monkeypatch.setattr(cli, "_tune_device", lambda device_id: RTX)
    monkeypatch.setattr(cli.bench, "cuda_unavailable_reason", lambda: None)
    result = CliRunner().invoke(cli.main, ["tune", "--dry-run", "-d", "128", "--dtype", "bf16", "--causal", "no"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("NVIDIA GeForce RTX 3090 (sm_86, 99 KB shared memory per block): 3 entries")
    assert lines[1].startswith("bfloat16/d128/full/fwd/short: ") and "wgmma" not in result.output


def test_the_budget_starts_no_candidate_that_would_end_past_it():
    """A candidate (compile, check, timing) starts only when the slowest so far would still end within
    the budget: `cupyflash tune --budget 120` ends within its 120 s (the first run on a lent H200 took
    126 s when the budget was only checked between candidates)."""
    now = [0.0]
    budget = tuning._Budget(120.0, clock=lambda: now[0])
    steps = 0
    while budget.allows():
        with budget.step():
            now[0] += 25.0  # each candidate takes 25 s
        steps += 1
    assert steps == 4 and now[0] == 100.0  # a fifth would have ended at 125 s
    assert tuning._Budget(None).allows()


def test_the_command_line_budget_counts_the_process_start_up():
    """`cupyflash tune --budget 120` took 122 s of wall time on an H100 (session 12): the budget
    counted from the tune() call, after the interpreter, the imports and the CUDA context. The
    command now counts from its process's start (process_started), checked here in a child process
    that sleeps before asking."""
    import subprocess
    import sys
    code = ("import time; time.sleep(0.5); import importlib; t = importlib.import_module(\"cupyflash.tune\"); "
            "print(time.monotonic() - t.process_started())")
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.5 <= age < 60.0, f"the child's age at its question: {age:.2f} s"
    started = 100.0
    budget = tuning._Budget(120.0, clock=lambda: 221.0, started=started)
    assert not budget.allows(), "121 s after the process started, a 120 s budget allows nothing"
