"""Style does not drift: ruff (its settings in pyproject.toml) over the package, tests, benchmarks and lab."""

import shutil
import subprocess
import sys
from pathlib import Path

from helpers import missing_piece

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        missing_piece("ruff is not installed (the test extra: pip install -e '.[test]')")
    out = subprocess.run([ruff, "check", "--no-cache", "sftkit", "tests", "benchmarks", "lab"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
