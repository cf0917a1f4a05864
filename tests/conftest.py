"""Test set-up: 8 fake CPU devices for the data-parallel tests, and XLA
flags that compile cheaply (tests/xla_flags.py: the suite is dominated by
compilation of small programs).

XLA reads the flags once, when the backend starts, so they must be set
before anything imports jax.
"""
import os

from xla_flags import with_devices  # noqa: E402 (tests/ is on sys.path)

os.environ.setdefault("XLA_FLAGS", with_devices(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# The suite runs on two workers (pytest-xdist, `--dist loadfile`: a file at a
# time). Files are handed out in collection order, so the longest files go
# first and the short ones fill in at the end; in alphabetical order the
# longest (test_train_run.py, about 3 minutes) came last and set the
# suite's end alone. Within a file the order is kept (the sort is stable).
_LONGEST_FIRST = ("test_experiment.py", "test_train_run.py", "test_train_compile.py",
                  "test_realct.py", "test_install.py", "test_infer.py", "test_rstn.py", "test_multihost.py",
                  "test_train_steps.py", "test_layers.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
