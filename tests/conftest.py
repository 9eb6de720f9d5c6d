import sys
from pathlib import Path

import pytest

# tests import their helpers (tests/distributed.py) as plain modules
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _distributed_pools():
    """The gloo worker pools of tests/distributed.py end with the session."""
    yield
    pools = sys.modules.get("distributed")  # imported only by tests that use it
    if pools is not None:
        pools.shutdown_pools()


# The tiny corpus and its uninterrupted run, once per session: many modules train on
# them (tests/tiny_runs.py). Each test names its own run folder under ``tiny`` and
# copies ``run_a`` before it damages or resumes it.
@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny prepared corpus and a config that trains on it in seconds."""
    from tiny_runs import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def run_a(tiny: Path) -> Path:
    """An uninterrupted 2-worker, 12-step run that other tests compare against."""
    from tiny_runs import train_tiny

    out = tiny / "run_a"
    r = train_tiny(tiny, out, "--quiet")
    assert r.returncode == 0, r.stderr
    return out
