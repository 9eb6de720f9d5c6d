"""A worker for tests/test_forkserver.py: ``python -m forkserver_child FOLDER`` writes
what it finds about its own process to FOLDER/<RANK>.json, then does what its
``ACTION`` variable says (exit with a code, or wait to be stopped and killed)."""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    rank = os.environ["RANK"]
    facts = {
        "pid": os.getpid(),
        "sid": os.getsid(0),
        "argv": sys.argv[1:],
        "env": dict(os.environ),
        "draw": np.random.random(),
        "name": __name__,
    }
    tmp = Path(sys.argv[1]) / f"{rank}.tmp"
    tmp.write_text(json.dumps(facts))
    tmp.replace(tmp.with_suffix(".json"))
    action = os.environ.get("ACTION", "exit0")
    if action == "wait":
        time.sleep(120)
    return int(action.removeprefix("exit"))


if __name__ == "__main__":
    sys.exit(main())
