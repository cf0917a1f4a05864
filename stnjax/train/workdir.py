"""Workdir layout, the config identity check and the metrics file.

Layout of a training workdir:

    <workdir>/config.json       the resolved config (all fields)
    <workdir>/config.txt        the same, human readable
    <workdir>/train_config.json hash and fields of the config parts that
                                 define the trained models (see config_hash)
    <workdir>/versions.json     package versions, devices, hosts
    <workdir>/train.log         progress log (written by launch/train.py)
    <workdir>/cache/            decoded volumes (data.cache_dir = "")
    <workdir>/phantom-<hash>/   the built-in dataset when data.dir = ""
    <workdir>/fold<f>/<plane>/  one run: checkpoints/, metrics.jsonl, run.json

Every file here is written atomically (`stnjax.fileio`), except the
metrics file, which is appended line by line and rewritten atomically when a
run resumes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax

from stnjax.checks import InputError
from stnjax import fileio
from stnjax.fileio import atomic_write_text

# Fields that do not change what a run computes: where files go, how often
# it logs or saves, how it is launched, which runs are selected, inference.
_IGNORED = {
    "name", "data.planes", "data.folds", "data.cache_dir",
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.multihost", "train.devices",
    "model.remat_full_canvas",  # speed and memory only: the same values either way
}
_IGNORED_SECTIONS = ("infer",)
# Fields added after runs existed: at these values they mean what a config
# without them meant, so they stay out of the identity (old workdirs resume).
_ABSENT_AT = {"data.organ_ids": [], "data.spacing": [], "data.orientation": "canonical",
              "model.upsampling": "bilinear", "model.norm": "none", "train.unroll_rounds": 1,
              "data.negatives": 0.0,
              **{f"data.augment.{k}": 0.0 for k in ("scale", "rotate", "shift", "intensity", "gain",
                                                     "elastic")}}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if hasattr(v, "items"):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = list(v) if isinstance(v, tuple) else v
    return out


def identity_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened fields of a config record (the resolved config as a
    nested dict, `TrainSpec.record`) that define the trained models."""
    flat = _flatten(record)
    return {k: v for k, v in sorted(flat.items())
            if k not in _IGNORED and k.split(".")[0] not in _IGNORED_SECTIONS
            and not (k in _ABSENT_AT and v in (_ABSENT_AT[k], None))}


def config_hash(record: Mapping[str, Any]) -> str:
    """A short SHA-256 of `identity_fields(record)` (16 hex digits)."""
    text = json.dumps(identity_fields(record), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_dir(workdir: str | os.PathLike, fold: int, plane: str) -> Path:
    """The folder of one run: <workdir>/fold<f>/<plane>."""
    return Path(workdir) / f"fold{int(fold)}" / str(plane)


def _run_dirs(workdir: Path) -> list[Path]:
    return sorted(p for p in workdir.glob("fold*/*") if (p / "checkpoints").exists())


def check_workdir(workdir: str | os.PathLike, record: Mapping[str, Any], *,
                  overwrite: bool = False) -> None:
    """Refuses a workdir whose checkpoints belong to another config.

    The identity fields of the config record (see `identity_fields`) are compared
    with <workdir>/train_config.json. On a difference, with checkpoints
    present: InputError listing the differing fields, unless `overwrite`,
    which deletes every run folder (fold*/) and the old config files; the
    cache and built-in dataset are kept (they are keyed by their own inputs).
    """
    workdir = Path(workdir)
    rec = workdir / "train_config.json"
    if not rec.exists():
        runs = _run_dirs(workdir)
        if runs and not overwrite:
            raise InputError(
                f"workdir: {workdir} holds checkpoints ({runs[0]}) but no train_config.json; "
                "cannot tell which config made them. Use another workdir or --overwrite")
        if runs:
            _wipe_runs(workdir)
        return
    try:
        old = fileio.read_json(rec, "workdir state")
    except ValueError as e:
        raise InputError(f"{e}; it records which config made the checkpoints there: restore "
                         "it, or start over with --overwrite") from None
    new_fields = identity_fields(record)
    if old.get("hash") == config_hash(record):
        return
    old_fields = old.get("fields", {})
    diff = sorted(k for k in set(old_fields) | set(new_fields)
                  if old_fields.get(k, "<absent>") != new_fields.get(k, "<absent>"))
    if not _run_dirs(workdir):
        return
    if not overwrite:
        shown = "; ".join(f"{k}: {old_fields.get(k, '<absent>')!r} -> "
                          f"{new_fields.get(k, '<absent>')!r}" for k in diff[:8])
        more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
        raise InputError(
            f"workdir: {workdir} holds checkpoints of another config "
            f"(hash {old.get('hash')} vs {config_hash(record)}); differing fields: "
            f"{shown}{more}. Use another workdir, or --overwrite to delete them")
    _wipe_runs(workdir)


def _wipe_runs(workdir: Path) -> None:
    from stnjax.train.lock import check_unlocked
    check_unlocked(p for p in workdir.glob("fold*/*") if p.is_dir())
    for p in sorted(workdir.glob("fold*")):
        if p.is_dir():
            shutil.rmtree(p)
    for name in ("train_config.json", "config.json", "config.txt"):
        if (workdir / name).exists():
            (workdir / name).unlink()


def package_versions() -> dict[str, Any]:
    """Versions of Python, the key packages, and the devices in use."""
    out: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("stnjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                "scipy", "ml-collections", "nibabel", "absl-py"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    # The malloc settings the launchers add (launch/hugepages.py: glibc's huge
    # pages, tcmalloc preloaded where installed): they change the speed on a
    # CPU, not the results.
    out["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    out["ld_preload"] = os.environ.get("LD_PRELOAD", "")
    out["backend"] = jax.default_backend()
    out["devices"] = [str(d) for d in jax.devices()]
    out["local_devices"] = jax.local_device_count()
    out["process_count"] = jax.process_count()
    return out


def format_config(record: Mapping[str, Any]) -> str:
    """A config record as text, one `section.field = value` line per field."""
    return "".join(f"{k} = {v!r}\n" for k, v in sorted(_flatten(record).items()))


def write_config_files(out: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Writes the resolved config (config.json, config.txt) and the package
    versions (versions.json) into `out`: beside every result."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(record, indent=2, default=str) + "\n")
    atomic_write_text(out / "config.txt", format_config(record))
    atomic_write_text(out / "versions.json", json.dumps(package_versions(), indent=2) + "\n")


def write_workdir_files(workdir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Writes config.json, config.txt, train_config.json and versions.json."""
    write_config_files(workdir, record)
    atomic_write_text(Path(workdir) / "train_config.json", json.dumps(
        {"hash": config_hash(record), "fields": identity_fields(record)},
        indent=2, default=str) + "\n")


class MetricsWriter:
    """Appends one JSON record per line to a run's metrics.jsonl."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def records(self) -> list[dict]:
        """All records in the file (a torn last line from a kill is skipped)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def keep_only(self, keep: Callable[[dict], bool]) -> None:
        """Rewrites the file atomically with the records for which `keep` holds.

        Used on resume: records written after the restored checkpoint are
        dropped, so that the file reads as if the run had never stopped.
        """
        kept = [r for r in self.records() if keep(r)]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        """Appends one record and flushes it to disk."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()

    def write_many(self, records: Iterable[dict]) -> None:
        for r in records:
            self.write(r)
