"""The wheel carries the CUDA sources, so an installed cupyflash compiles its kernels with no
checkout around it."""
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
    assert "cupyflash/cli.py" in names and "cupyflash/__main__.py" in names
    assert "cli.py" not in names, "the wheel must not install a top-level module named cli"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "cupyflash = cupyflash.cli:main" in text, text


def test_sources_are_found_from_the_package():
    from cupyflash._sources import KERNEL_FILES, kernel_dir
    d = kernel_dir()
    assert all((d / f).is_file() for f in KERNEL_FILES)
