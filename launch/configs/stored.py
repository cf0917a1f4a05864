"""The config a training workdir was made with, for `evaluate` and `segment`.

  python -m launch.evaluate --workdir=runs/phantom            # this config, implied
  python -m launch.evaluate --config=launch/configs/stored.py:runs/phantom

Reads `<workdir>/config.json` (the resolved config `launch.train` and
`launch.main` write there) back into a config, so `--config.infer.*`
overrides apply to it as to any config file. `evaluate` and `segment` use it
when no --config is given.
"""

from pathlib import Path

import ml_collections

from stnjax import fileio


def get_config(workdir: str) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    try:
        record = fileio.read_json(path, "stored config")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no stored config (not a training workdir?); "
                                "give --config=FILE") from None
    except ValueError as e:
        raise ValueError(f"{e}; give --config=FILE") from None
    return ml_collections.ConfigDict(_as_config_values(record))


def _as_config_values(value):
    """JSON lists back to tuples (as the config files write them), so that
    `--config.FIELD='(a, b)'` overrides a sequence field of a stored config
    as it does one of a config file."""
    if isinstance(value, dict):
        return {k: _as_config_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_as_config_values(v) for v in value)
    return value
