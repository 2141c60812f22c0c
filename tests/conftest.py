"""Shared test fixtures: GPU detection, fresh random inputs, error reports."""
import zlib

import numpy as np
import pytest


from cupyflash.bench import cuda_unavailable_reason

GPU_SKIP_REASON = cuda_unavailable_reason()


def _multigpu_reason():
    if GPU_SKIP_REASON:
        return GPU_SKIP_REASON
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
    return None if n >= 2 else f"needs 2 CUDA devices, found {n}"


def pytest_collection_modifyitems(config, items):
    multi = _multigpu_reason()
    for item in items:
        if "gpu" in item.keywords and GPU_SKIP_REASON:
            item.add_marker(pytest.mark.skip(reason=GPU_SKIP_REASON))
        elif "multigpu" in item.keywords and multi:
            item.add_marker(pytest.mark.skip(reason=multi))


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


def error_report(actual, expected):
    """'max err X at index I (got A, want B), mean err M' for assertion messages."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    diff = np.abs(a - e)
    diff = np.where(np.isnan(diff), np.inf, diff)
    if diff.size == 0:
        return "empty"
    idx = np.unravel_index(int(np.argmax(diff)), diff.shape)
    return (f"max err {diff[idx]:.3e} at index {tuple(int(i) for i in idx)} "
            f"(got {a[idx]!r}, want {e[idx]!r}), mean err {float(np.mean(diff)):.3e}")
