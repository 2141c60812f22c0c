"""The runner: every case on every implementation, a failure or an out-of-memory a row."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

from .problem import Case
from .errors import Unsupported, is_out_of_memory, short_error
from .results import Result
from .devices import Device, Inputs
from .gate import check_outputs
from .impls import Impl


def _run_one(impl: Impl, case: Case, inputs: Inputs, device: Device, *, warmup: int,
             repeats: int, max_seconds: float | None, gate: bool) -> Result:
    prepared = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                impl.refuse_variants(case)
                prepared = impl.prepare(case, inputs, device)
                with prepared.context():
                    if impl.gated and gate:
                        checks = check_outputs(prepared.outputs(), inputs, case.causal, device.xp)
                        bad = [c for c in checks if not c.ok]
                        if bad:
                            return Result.of(case, impl.name, "failed", "wrong result, not timed: "
                                             + "; ".join(c.text() for c in bad))
                    peak = prepared.peak_bytes()  # one untimed call: the first warm-up
                    times = prepared.timer(prepared.run, max(warmup - 1, 0), repeats, max_seconds)
            except Exception as e:
                if caught and not is_out_of_memory(e):  # e.g. PyTorch's reasons for "No available kernel"
                    reasons = "; ".join(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught))
                    e.args = (f"{e} [{reasons}]",)
                raise
        note = prepared.note
        if len(times) < repeats:
            note = "; ".join(filter(None, [note, f"{len(times)} of {repeats} repeats (time cap)"]))
        return Result.timed(case, impl.name, times, prepared.timer.name, peak, note)
    except Unsupported as e:
        return Result.of(case, impl.name, "skipped", str(e))
    except Exception as e:
        if is_out_of_memory(e):
            return Result.of(case, impl.name, "oom", f"out of memory: {short_error(e)}")
        if isinstance(e, (ValueError, TypeError)):  # cupyflash's input checks, a peer's refusal
            return Result.of(case, impl.name, "skipped", f"not supported: {short_error(e, 400)}")
        status = "failed" if impl.gated else "skipped"
        return Result.of(case, impl.name, status, f"error: {short_error(e, 400)}")
    finally:
        del prepared
        device.free_memory()


def run_benchmark(cases: Sequence[Case], impls: Sequence[Impl], device: Device, *,
                  warmup: int = 5, repeats: int = 20, max_seconds: float | None = None,
                  seed: int = 0, gate: bool = True,
                  on_result: Callable[[Result], Any] | None = None) -> list[Result]:
    """Run every implementation on every case, in the same process, inputs and stream.

    Each case draws fresh inputs (seed + its index). cupyflash is checked against the
    reference first and not timed if wrong (status 'failed'). Peers that cannot run are
    'skipped' with the reason; out-of-memory rows are 'oom'. ``on_result`` is called after
    each row (progress bars).
    """
    results: list[Result] = []

    def emit(r: Result):
        results.append(r)
        if on_result:
            on_result(r)

    with device.activate():
        reasons = {impl.name: impl.unavailable(device) for impl in impls}
        for n, case in enumerate(cases):
            try:
                inputs = device.random_inputs(case, seed + n)
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                inputs = None
                device.free_memory()
                for impl in impls:
                    emit(Result.of(case, impl.name, "oom", f"out of memory allocating the inputs: {short_error(e)}"))
                continue
            for impl in impls:
                if reasons[impl.name]:
                    emit(Result.of(case, impl.name, "skipped", reasons[impl.name]))
                else:
                    emit(_run_one(impl, case, inputs, device, warmup=warmup, repeats=repeats,
                                  max_seconds=max_seconds, gate=gate))
            del inputs
            device.free_memory()
    return results
