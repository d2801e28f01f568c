"""In-process A/B of two builds of the CPU kernel (issue 4): which source is faster?

    git show HEAD~1:lstm_jax/kernels/cpu_lstm.cc > /tmp/a.cc
    PYTHONPATH=. python benchmarks/cpu_ab.py /tmp/a.cc lstm_jax/kernels/cpu_lstm.cc \\
        128,50,512,512 32,100,128,256 1,1000,32,128

Both builds are compiled (and cached) like the library's own, registered under prefixed FFI
names ("A_...", "B_..."), and ``lstm(..., backend="cpu")`` is jitted once against each; the
calls are interleaved round by round, so that the machine's drift (this VM's speed moves by
tens of percent over minutes) hits both alike. Both builds must take the attributes and
buffers the current ``cpu_native.py`` passes. Prints medians (ms) and the ratios B/A for
fwd+bwd and forward alone. Not part of the library.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import statistics
import sys
import time

from lstm_jax.bench import steady_malloc

steady_malloc()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lstm_jax  # noqa: E402
import lstm_jax.kernels.cpu_native as cn  # noqa: E402


def register(tag: str, source: str) -> None:
    cxx = cn._compiler()
    own = cn.SOURCE
    cn.SOURCE = pathlib.Path(source)
    try:
        path = cn.library_path(cxx)
        if not path.exists():
            cn.build(cxx, path)
    finally:
        cn.SOURCE = own
    lib = ctypes.CDLL(str(path))
    for name, symbol in cn._TARGETS.items():
        jax.ffi.register_ffi_target(f"{tag}_{name}", jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")


def layer_case(text: str):
    """``(params, x, loss)`` for one layer at "B,T,D,H": ``loss`` sums the kernel path's output."""
    B, T, D, H = (int(v) for v in text.split(","))
    params = lstm_jax.init_lstm(jax.random.key(0), D, H)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, D), np.float32))

    def loss(p, xx):
        return jnp.sum(lstm_jax.lstm(p, xx, backend="cpu")[0])

    return params, x, loss


def main(a_source: str, b_source: str, *shapes: str) -> None:
    assert cn.unavailable_reason() is None, cn.unavailable_reason()
    register("A", a_source)
    register("B", b_source)
    variant = {"tag": "A"}
    ffi = cn._ffi
    cn._ffi = lambda name, *a, **k: ffi(f"{variant['tag']}_{name}", *a, **k)
    rounds = int(os.environ.get("R", 7))
    for text in shapes:
        B, T, D, H = (int(v) for v in text.split(","))
        params, x, loss = layer_case(text)
        fns = {}
        for tag in "AB":
            variant["tag"] = tag  # read while tracing: each compiled call names its build
            fns[f"{tag} fwd+bwd"] = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
            fns[f"{tag} fwd"] = jax.jit(loss).lower(params, x).compile()
        times = {k: [] for k in fns}
        # Calls per round: about 0.3 s of work each at ~150 GFLOP/s.
        calls = max(1, int(0.3 / (B * T * H * (H + D) * 24 / 150e9 + 1e-3)))
        for _ in range(rounds):
            for k, f in fns.items():
                jax.block_until_ready(f(params, x))  # untimed: the other build left the caches
                for _ in range(calls):
                    t0 = time.perf_counter()
                    jax.block_until_ready(f(params, x))
                    times[k].append(time.perf_counter() - t0)
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(f"{text}: " + " | ".join(f"{k} {v:.2f}" for k, v in med.items())
              + f" | B/A fwd+bwd {med['B fwd+bwd'] / med['A fwd+bwd']:.3f}"
              f" fwd {med['B fwd'] / med['A fwd']:.3f}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
