import fcntl
import sys
from pathlib import Path

import pytest

# tests import their helpers (tests/distributed.py) as plain modules
sys.path.insert(0, str(Path(__file__).parent))


# `make test` runs the suite in two processes (pytest-xdist, `--dist loadfile`: a
# module goes whole to one of them, so its module-scoped runs and pools are made
# once). The modules that build network labs hold one lock while they run, so that no
# lab's namespaces, shaping or "nothing left behind" checks meet another's.
LAB_MODULES = {
    "test_elastic_netlab",
    "test_faults",
    "test_netlab",
    "test_netlab_bytes",
    "test_netlab_torchrun",
    "test_netlab_train",
    "test_placement",
}


# The order the two processes take modules in (`make test` passes
# --no-loadscope-reorder, so xdist follows it rather than putting the modules with the
# most tests first): the longest first, so that both processes end together, a lab
# module after each other one, so that the lab lock rarely holds a process idle.
# Seconds per module, measured in one `-n 2` run on 2 cores (2026-12-07); a module
# not listed goes after these, in name order.
LONGEST_FIRST = (
    "test_elastic",  # 115 s
    "test_elastic_netlab",  # 64 s, lab
    "test_pipeline",  # 57 s
    "test_faults",  # 60 s, lab
    "test_train_cli",  # 49 s
    "test_netlab_torchrun",  # 45 s, lab
    "test_finetune",  # 42 s
    "test_netlab_bytes",  # 40 s, lab
    "test_resume_algorithms",  # 39 s
    "test_netlab_train",  # 33 s, lab
    "test_launch",  # 36 s
    "test_netlab",  # 28 s, lab
    "test_nonfinite",  # 33 s
    "test_placement",  # 13 s, lab
    "test_user_api",  # 29 s
    "test_trust_elastic",  # 28 s
    "test_safe_files",  # 26 s
    "test_state_transfer",  # 24 s
    "test_plan_search",  # 20 s
    "test_emulation",  # 17 s
    "test_algorithms",  # 17 s
    "test_precision",  # 17 s
    "test_telemetry",  # 10 s
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (rank.get(item.module.__name__, len(rank)), item.module.__name__))


@pytest.fixture(scope="module", autouse=True)
def _one_lab_at_a_time(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    if request.module.__name__ not in LAB_MODULES:
        yield
        return
    # the parent of this process's temporary root is shared by the session's processes
    lock = tmp_path_factory.getbasetemp().parent / "farflung-network-lab.lock"
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
