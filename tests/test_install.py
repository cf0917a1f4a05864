"""The console commands from a non-editable install, run from another directory.

The wheel is built once from a copy of the working tree made into a git
checkout of its own (so the commit `--version` prints is known), installed
with --no-deps into a fresh venv that reads the test venv's packages through
a .pth line (nothing is downloaded), and its commands run from a folder
outside the repository: `--version`, `--help`, and a short smoke training
that also draws its progress.png, with the libraries' INFO lines off.
"""

import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from xla_flags import COMPILE_CHEAPLY

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("main", "train", "evaluate", "segment", "sweep", "make-dataset", "make-phantoms",
            "convert-weights")


def _git(cwd: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def _build_wheel(tmp: Path) -> tuple[Path, str]:
    """(the wheel, the commit it was built from)."""
    src = tmp / "src"
    files = _git(ROOT, "ls-files", "-co", "--exclude-standard", "-z").split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    _git(src, "init", "-q")
    _git(src, "add", "-A")
    _git(src, "commit", "-q", "-m", "test")
    commit = _git(src, "describe", "--always", "--abbrev=12")
    # The venv's setuptools (requirements.txt), nothing downloaded.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation",
                    "--no-deps", "--no-index", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, text=True, timeout=120)
    return next((tmp / "dist").glob("stnjax-*.whl")), commit


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the venv's bin folder, the wheel, its commit, a folder outside the repository)."""
    tmp = tmp_path_factory.mktemp("install")
    wheel, commit = _build_wheel(tmp)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "-q", "--no-deps", "--no-index", "--no-compile", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=120)
    # Only now the test venv's packages (its own stnjax, editable, is not
    # seen: a path line does not run that folder's .pth files).
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return venv / "bin", wheel, commit, elsewhere


def _run(bin_: Path, cwd: Path, cmd: str, *args: str, timeout: int = 120):
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "STNJAX_HUGE_PAGES": "0", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": COMPILE_CHEAPLY}
    return subprocess.run([str(bin_ / f"stnjax-{cmd}"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_wheel_holds_no_top_level_launch_package(installed):
    _, wheel, _, _ = installed
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith((".dist-info", ".data"))} == {"stnjax"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "stnjax/launch/train.py" in names and "stnjax/launch/configs/smoke.py" in names


def test_every_command_runs_from_another_directory(installed):
    bin_, _, commit, elsewhere = installed
    for cmd in COMMANDS:
        assert (bin_ / f"stnjax-{cmd}").is_file(), cmd
    r = _run(bin_, elsewhere, "segment", "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"stnjax 0.1.0 (commit {commit}; python "), r.stdout
    r = _run(bin_, elsewhere, "train", "--help", "--config=smoke")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Trains RSTN models")
    assert "--workdir: Output folder of the runs." in r.stdout  # the command's own flags
    assert "--config.train.stages='S:4,I:4,J:4'" in r.stdout  # a built-in config, by name
    r = _run(bin_, elsewhere, "evaluate", "--help")
    assert r.returncode == 0 and "--label" in r.stdout, r.stderr
    r = _run(bin_, elsewhere, "main", "--help")  # its default config, from site-packages
    assert r.returncode == 0 and "--config.train.stages='S:600,I:600,J:600'" in r.stdout
    r = _run(bin_, elsewhere, "make-dataset", "--help")
    assert r.returncode == 0 and "--msd" in r.stdout, r.stderr
    r = subprocess.run([str(bin_ / "python"), "-c", "import launch"], cwd=elsewhere,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'launch'" in r.stderr
    assert not list(elsewhere.iterdir())  # --help and --version write nothing


def test_a_smoke_training_from_the_installed_commands(installed):
    bin_, _, _, elsewhere = installed
    # One short stage: one step program to compile.
    r = _run(bin_, elsewhere, "train", "--config=smoke", "--workdir=w",
             "--config.train.stages=S:2", "--config.train.checkpoint_every=2", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step S for bucket 64x64 compiled" in r.stderr
    # absl's format ("I1207 02:08:05.309 ... xla_bridge.py:849] ...") is the
    # libraries' INFO noise: off at the default verbosity.
    assert not re.search(r"^[IW]\d{4} ", r.stderr, re.M), r.stderr[:2000]
    run_dir = elsewhere / "w" / "fold0" / "Z"
    assert (run_dir / "metrics.jsonl").is_file()
    png = (run_dir / "progress.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 600 and height >= 400
