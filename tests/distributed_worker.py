"""A training process for tests/test_distributed.py, started with its own XLA_FLAGS.

The device count of a JAX process is fixed when JAX starts (``XLA_FLAGS=
--xla_force_host_platform_device_count=N`` must be set before the import), so each mesh size runs
in a process of its own. ``python tests/distributed_worker.py PLAN`` runs a JSON list of ops:

- ``{"op": "train", "workdir": ..., "overrides": [...], "stop_at": n | null}``:
  ``train_and_evaluate(load_config(None, overrides), workdir, stop_at=...)``.
- ``{"op": "copy", "src": ..., "dst": ...}``: copy a run dir (appears at ``dst`` complete).
- ``{"op": "wait", "path": ...}``: wait for a path to appear (another process's copy).

It prints one JSON line, ``RESULTS [...]``, with each train op's status, step and metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path


def main(plan: list[dict]) -> None:
    from lstm_jax.train.config import load_config
    from lstm_jax.train.loop import train_and_evaluate

    results = []
    for op in plan:
        if op["op"] == "train":
            cfg = load_config(None, op["overrides"])
            r = train_and_evaluate(cfg, op["workdir"], stop_at=op.get("stop_at"),
                                   quiet=op.get("quiet", True))
            results.append({"status": r.status, "step": r.step, "metrics": r.metrics})
        elif op["op"] == "copy":
            tmp = op["dst"] + ".partial"
            shutil.copytree(op["src"], tmp)
            os.replace(tmp, op["dst"])
        elif op["op"] == "wait":
            deadline = time.monotonic() + op.get("timeout", 300)
            while not Path(op["path"]).exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{op['path']} never appeared")
                time.sleep(0.05)
        else:
            raise ValueError(f"unknown op {op['op']!r}")
    print("RESULTS " + json.dumps(results), flush=True)


if __name__ == "__main__":
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # a hung worker's stacks, for a test's error message
    main(json.loads(sys.argv[1]))
