"""The persistent XLA compilation cache, shared by every launcher.

Each command takes `--compilation_cache` ('auto', a folder, or 'none'): a
repeated or resumed training, a repeated evaluation and every `segment` call
after the first load their compiled programs instead of compiling again (a
training step at full width takes tens of seconds to compile on a CPU).
'auto' is <workdir>/jax_cache for train, main and segment (segment shares it
across calls on the same models) and <out>/jax_cache for evaluate, which
leaves the training workdir untouched. A path that is not a writable folder
is a warning, not an error: the command then compiles as usual.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from absl import flags

_CACHE = flags.DEFINE_string(
    "compilation_cache", "auto", "Persistent XLA compilation cache folder, so that a repeated "
    "or resumed command does not compile again: 'auto' = jax_cache in the command's workdir "
    "(evaluate: in its --out folder), 'none' = off.")


def enable(base: str | Path) -> Path | None:
    """Points JAX's persistent cache at the folder `--compilation_cache` names
    ('auto': <base>/jax_cache); returns the folder, or None when off or unusable."""
    import jax

    value = _CACHE.value
    if value == "none":
        return None
    cache = Path(base) / "jax_cache" if value == "auto" else Path(value)
    if cache.exists() and not (cache.is_dir() and os.access(cache, os.W_OK)):
        logging.getLogger("stnjax").warning(
            "--compilation_cache: %s is not a writable folder; compiling without a cache", cache)
        return None
    # JAX creates the folder when it first writes (not here: a command's
    # other processes, or one that fails its checks, then leave no trace).
    jax.config.update("jax_compilation_cache_dir", str(cache))
    # Every program, the quick ones too: a repeated segment call then
    # compiles nothing at all (the Segmenter's log says so).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return cache
