"""Build hook only (metadata: pyproject.toml): the wheel records the git
commit it was built from in stnjax/_commit.txt, which `--version` prints."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

_SPEC = importlib.util.spec_from_file_location(
    "stnjax_buildinfo", Path(__file__).resolve().parent / "stnjax" / "buildinfo.py")
buildinfo = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(buildinfo)


class BuildPyWithCommit(build_py):
    """build_py that also writes the checkout's commit into the built package."""

    def run(self):
        super().run()
        commit = buildinfo.git_commit(Path(__file__).resolve().parent)
        if commit and not self.editable_mode:
            target = Path(self.build_lib) / "stnjax" / buildinfo.COMMIT_FILE
            target.write_text(commit + "\n")


setup(cmdclass={"build_py": BuildPyWithCommit})
