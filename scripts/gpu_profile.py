"""Where a training step's time goes, kernel by kernel: a profile of ``jit(grad)`` of ``lstm``.

    python scripts/gpu_profile.py                          # default cases; $OUT/profile.md if set
    python scripts/gpu_profile.py --cases 32,100,128,256:float32 --calls 3

For each case (``B,T,D,H:dtype``, dtype the compute dtype) it compiles the gradient of
``sum(lstm(params, x))``, warms it up, records ``--calls`` calls with ``jax.profiler`` and
prints, per profiled process (the GPU's streams on a GPU; XLA:CPU's thunks with
``--xla_cpu_enable_xprof_traceme`` on CPU), the events that took the most time: total ms per
call, how many per call, microseconds each. On a GPU the kernel count per time step and the
gap between the sum of kernel times and the wall time show what the loop overhead costs.
A diagnosis tool, not a benchmark: profiling slows the host side.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_cpu_enable_xprof_traceme=true").strip()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lstm_jax  # noqa: E402

DEFAULT_CASES = "256,100,1024,1024:bfloat16 256,100,1024,1024:float32 1,500,64,64:float32"
# Host-side bookkeeping events, not work: left out of the tables.
SKIP = ("ThunkExecutor", "PjitFunction", "block_until_ready", "stop_trace", "start_trace",
        "SlinkyThreadPool", "$")
CONTAINERS = ("while", "conditional", "call")


def parse_case(text: str):
    try:
        shape, dtype = text.split(":") if ":" in text else (text, "float32")
        B, T, D, H = (int(v) for v in shape.split(","))
        return B, T, D, H, jnp.dtype(dtype)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(
            f"a case is B,T,D,H[:dtype], e.g. 32,100,128,256:bfloat16; got {text!r} ({e})")


def profile(case, calls: int, top: int) -> list[str]:
    B, T, D, H, dtype = case
    params = lstm_jax.init_lstm(jax.random.key(0), D, H)
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    compute = None if dtype == jnp.float32 else dtype

    def loss(p, xx):
        return jnp.sum(lstm_jax.lstm(p, xx, compute_dtype=compute)[0].astype(jnp.float32))

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    for _ in range(3):
        jax.block_until_ready(step(params, x))
    t0 = time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(step(params, x))
    wall_ms = 1e3 * (time.perf_counter() - t0) / calls
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        for _ in range(calls):
            jax.block_until_ready(step(params, x))
        jax.profiler.stop_trace()
        files = glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)
        if not files:
            return [f"### {B},{T},{D},{H} {dtype.name}: the profiler wrote no trace.json.gz"]
        with gzip.open(files[0]) as f:
            events = json.load(f)["traceEvents"]

    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    total = collections.defaultdict(float)
    count = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or str(e.get("name", "")).startswith(SKIP):
            continue
        key = (names.get(e.get("pid"), str(e.get("pid"))), e["name"])
        total[key] += e.get("dur", 0.0)
        count[key] += 1
    lines = [f"### {B},{T},{D},{H} {dtype.name} (fwd+bwd, unprofiled wall {wall_ms:.2f} ms per "
             f"call, {jax.devices()[0].device_kind})", ""]
    for process in sorted({k[0] for k in total}):
        keys = sorted((k for k in total if k[0] == process), key=total.get, reverse=True)
        # XLA:CPU's loop events contain the events of their bodies: not counted twice.
        work = [k for k in keys if not k[1].startswith(CONTAINERS)]
        busy = sum(total[k] for k in work) / calls / 1e3
        lines += [f"{process}: events (loops' contents only) sum to {busy:.2f} ms per call "
                  f"({sum(count[k] for k in work) / calls / T:.1f} events per time step)", "",
                  "| event | ms per call | per call | us each |", "|---|---|---|---|"]
        for k in keys[:top]:
            lines.append(f"| {k[1][:80]} | {total[k] / calls / 1e3:.3f} | {count[k] / calls:.0f} "
                         f"| {total[k] / count[k]:.2f} |")
        lines.append("")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=parse_case, nargs="+",
                    default=[parse_case(c) for c in DEFAULT_CASES.split()],
                    help=f"B,T,D,H[:dtype] ... (default: {DEFAULT_CASES})")
    ap.add_argument("--calls", type=int, default=3, help="profiled calls per case")
    ap.add_argument("--top", type=int, default=15, help="events listed per process")
    args = ap.parse_args(argv)
    lines = [f"# lstm_jax training-step profile (jax {jax.__version__}, "
             f"{jax.default_backend()})", ""]
    for case in args.cases:
        try:
            block = profile(case, args.calls, args.top)
        except Exception as e:  # one failing case must not lose the others
            block = [f"### {case}: failed: {type(e).__name__}: {e}", ""]
        print("\n".join(block), flush=True)
        lines += block
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "profile.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {Path(out, 'profile.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
