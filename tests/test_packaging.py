"""The wheel carries the CUDA sources, so an installed cupyflash compiles its kernels with no
checkout around it."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_every_kernel_source(tmp_path):
    pytest.importorskip("build", reason="building a wheel needs the 'build' package (pip install cupyflash[test])")
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheel = next(tmp_path.glob("cupyflash-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in (ROOT / "kernels_cu").iterdir() if p.suffix in (".cu", ".cuh"))
    assert sources, "no kernel sources found in the checkout"
    missing = [s for s in sources if f"cupyflash/kernels_cu/{s}" not in names]
    assert not missing, f"kernel sources missing from {wheel.name}: {missing}"
    modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "cupyflash").rglob("*.py"))
    missing = [m for m in modules if m not in names]
    assert not missing, f"modules missing from {wheel.name} (a subpackage not listed in pyproject.toml?): {missing}"
    assert "cupyflash/cli.py" in names and "cupyflash/__main__.py" in names
    assert "cli.py" not in names, "the wheel must not install a top-level module named cli"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "cupyflash = cupyflash.cli:main" in text, text


def test_sources_are_found_from_the_package():
    from cupyflash._sources import KERNEL_FILES, kernel_dir
    d = kernel_dir()
    assert all((d / f).is_file() for f in KERNEL_FILES)


@pytest.mark.slow
def test_the_minimal_cuda_extra_compiles_the_kernels_and_passes_check(tmp_path):
    """A fresh venv with cupyflash[cuda13-min] alone (no cuBLAS, cuFFT, ...): NVRTC compiles a
    forward and a backward offline with the headers it brings, and `cupyflash check --quick`
    passes (on the GPU where there is one, else on the NumPy backend)."""
    import venv
    if os.environ.get("CUPYFLASH_SKIP_VENV_TESTS"):
        pytest.skip("CUPYFLASH_SKIP_VENV_TESTS is set")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "--quiet", f"{ROOT}[cuda13-min]"],
                             capture_output=True, text=True)
    if install.returncode != 0 and "No matching distribution" in install.stderr:
        pytest.skip(f"the package index has no CUDA wheels here: {install.stderr[-300:]}")
    assert install.returncode == 0, install.stderr[-3000:]
    cli = env_dir / "bin" / "cupyflash"
    kernels = subprocess.run([str(cli), "kernels", "--arch", "sm_90", "--dtype", "bfloat16", "-d", "128",
                              "--fail-on-spill"], capture_output=True, text=True, cwd=tmp_path,
                             env={**os.environ, "CUPY_CACHE_DIR": str(tmp_path / "cache")})
    assert kernels.returncode == 0, kernels.stdout[-2000:] + kernels.stderr[-2000:]
    assert "flash_fwd_sm90_kernel" in kernels.stdout and "flash_bwd_sm90_kernel" in kernels.stdout
    check = subprocess.run([str(cli), "check", "--quick"], capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    libs = sorted(p.name for p in (env_dir / "lib").glob("python3*/site-packages/nvidia/cu13/lib/*"))
    assert not [n for n in libs if n.startswith(("libcublas", "libcufft", "libcusolver", "libcusparse", "libcurand"))], libs
