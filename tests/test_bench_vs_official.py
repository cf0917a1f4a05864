"""bench/vs_official.py refuses bad set-ups before timing anything, naming what is missing."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "bench.vs_official", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_missing_official_code_is_named(tmp_path):
    proc = _run(f"--official={tmp_path}")
    assert proc.returncode != 0
    assert "no official code there" in proc.stderr and "OrganSegRSTN/model.py" in proc.stderr


def test_python_without_torch_is_named(tmp_path):
    (tmp_path / "OrganSegRSTN").mkdir()
    (tmp_path / "OrganSegRSTN" / "model.py").write_text("# stand-in\n")
    fake = tmp_path / "python-without-torch"
    fake.write_text("#!/bin/sh\nexec python3 -I -c 'import no_such_module_torch_stand_in' \"$@\"\n")
    fake.chmod(0o755)
    proc = _run(f"--official={tmp_path}", f"--torch_python={fake}")
    assert proc.returncode != 0
    assert "cannot import torch there" in proc.stderr and str(fake) in proc.stderr
