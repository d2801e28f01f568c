"""In-process A/B of the CPU kernel path's weight gradients (issue 4): XLA or the kernel?

    PYTHONPATH=. python benchmarks/weight_grad_ab.py 32,100,128,256 128,50,512,512
    PYTHONPATH=. python benchmarks/weight_grad_ab.py --alone 32,100,128,256   # the call alone

``jit(grad)`` of ``lstm(..., backend="cpu")`` is compiled twice: once with
``cpu_native.weight_grads`` (dW_ih, dW_hh and db in the kernel's packed product) and once
with the XLA products it replaced (``summed_outer`` over ``x`` and ``h_{t-1}``, one product
over their concatenation from H = 512, and a sum for db). Calls alternate round by round
(``ROUNDS``, default 7), each round >= 0.1 s per variant; prints medians and the ratio
kernel / XLA. With ``--alone`` only the weight gradients are timed, from random x, h0, ys
and dz (checked against each other first), with their GFLOP/s. Not part of the library.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from lstm_jax.bench import steady_malloc

steady_malloc()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from cpu_ab import layer_case  # noqa: E402  (benchmarks/, the script's folder)

import lstm_jax.kernels.cpu_native as cn  # noqa: E402
from lstm_jax._cell import summed_outer  # noqa: E402


def xla_weight_grads(config, x, h0, ys, dz, bias):
    """The products the kernel's weight-gradient call replaced."""
    f32 = jnp.float32
    db = jnp.sum(dz, axis=(0, 1)) if bias else None
    h_prev = jnp.concatenate([h0[None], ys[:-1]], axis=0)
    if x is not None and dz.shape[-1] // 4 >= 512:
        dw = summed_outer(jnp.concatenate([x, h_prev], axis=-1), dz, f32)
        dw_ih, dw_hh = jnp.split(dw, [x.shape[-1]])
        return dw_ih, dw_hh, db
    dw_ih = None if x is None else summed_outer(x, dz, f32)
    return dw_ih, summed_outer(h_prev, dz, f32), db


def _alternate(fns: dict, args: tuple, rounds: int) -> dict:
    """Median ms of each function, called in alternating rounds of >= 0.1 s."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            jax.block_until_ready(f(*args))  # untimed: the other variant left the caches
            start = time.perf_counter()
            while time.perf_counter() - start < 0.1:
                t0 = time.perf_counter()
                jax.block_until_ready(f(*args))
                times[name].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def alone(shapes, rounds: int) -> None:
    config = cn._config(None, None)
    for text in shapes:
        B, T, D, H = (int(v) for v in text.split(","))
        rng = np.random.default_rng(0)
        args = tuple(jnp.asarray(rng.standard_normal(s, np.float32))
                     for s in ((T, B, D), (B, H), (T, B, H), (T, B, 4 * H)))
        fns = {name: jax.jit(lambda *a, f=f: f(config, *a, True))
               for name, f in (("xla", xla_weight_grads), ("kernel", cn.weight_grads))}
        for got, want in zip(fns["kernel"](*args), fns["xla"](*args), strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))
        med = _alternate(fns, args, rounds)
        flop = 2 * T * B * (D + H) * 4 * H
        print(f"{text} alone: " + ", ".join(
            f"{k} {v:.2f} ms ({flop / v / 1e6:.0f} GFLOP/s)" for k, v in med.items())
            + f", kernel/xla {med['kernel'] / med['xla']:.3f}", flush=True)


def main(*shapes: str) -> None:
    rounds = int(os.environ.get("ROUNDS", "7"))
    if shapes and shapes[0] == "--alone":
        alone(shapes[1:], rounds)
        return
    kernel_weight_grads = cn.weight_grads
    for text in shapes:
        params, x, loss = layer_case(text)
        fns = {}
        for name, weight_grads in (("xla", xla_weight_grads), ("kernel", kernel_weight_grads)):
            cn.weight_grads = weight_grads  # read while tracing the backward pass
            try:
                fns[name] = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
            finally:
                cn.weight_grads = kernel_weight_grads
        med = _alternate(fns, (params, x), rounds)
        print(f"{text}: xla {med['xla']:.2f} ms, kernel {med['kernel']:.2f} ms, "
              f"kernel/xla {med['kernel'] / med['xla']:.3f}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
