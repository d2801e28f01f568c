"""Scratch: proposed CPU changes to lstm_jax/_recurrence.py, monkeypatched in and timed (issue 4).

    PYTHONPATH=. python benchmarks/cpu_patch.py [B,T,D,H[,L2][,bi] ...] [--unroll 1,2]

Compiles lstm_jax as committed, then with the patch below applied, and times both next to
torch.nn.LSTM in one process (interleaved, quiet-gated like scripts/bench.py). The patch:

1. Gate activations as ONE tanh over the whole (B, 4H) pre-activation with a per-column
   scale k (0.5 for i, f, o; 1 for g): sigmoid(z) = 0.5 tanh(z/2) + 0.5. XLA:CPU's logistic
   (exp + divide) in per-gate slices of the dynamic-sliced input is slow; one contiguous tanh
   vectorises. Backward: d act/dz = k^2 - (act - 1 + k)^2 over the whole row.
2. The backward scan's dh = dz @ W_hh^T uses W_hh^T materialised once before the loop: a dot
   with a transposed right operand repacks the weight every step (YNNPACK), which dominates
   at small batch.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import lstm_jax
from lstm_jax import _recurrence as R
from lstm_jax._cell import matmul, project
from lstm_jax.bench import _cpu_counters, _others_cpu, _wait_until_quiet, parse_shape


def gate_scale(hidden: int, dtype) -> jax.Array:
    """k per column of (4H,): 0.5 for the sigmoid gates i, f, o and 1 for the tanh gate g."""
    half = jnp.full((hidden,), 0.5, dtype)
    return jnp.concatenate([half, half, jnp.ones((hidden,), dtype), half])


def forward_step(w_hh, w_hr, precision, save, carry, inputs):
    h, c = carry
    xw_t, m_t = inputs
    acc = c.dtype
    z = xw_t + matmul(h, w_hh, acc, precision)
    k = gate_scale(c.shape[-1], acc)
    acts = k * jnp.tanh(k * z) + (1.0 - k)  # sigmoid(z) = 0.5 tanh(z / 2) + 0.5
    i, f, g, o = jnp.split(acts, 4, axis=-1)
    c_new = f * c + i * g
    h_new = project(o * jnp.tanh(c_new), w_hr, h.dtype, acc, precision)
    acts, c_saved = (acts, c) if save else (None, None)
    if m_t is None:
        return (h_new, c_new), (h_new, acts, c_saved)
    valid = m_t[:, None]
    carry = (jnp.where(valid, h_new, h), jnp.where(valid, c_new, c))
    return carry, (jnp.where(valid, h_new, jnp.zeros_like(h_new)), acts, c_saved)


def backward_step(w_hh_t, w_hr, precision, carry, inputs):
    """As R._backward_step, but w_hh_t is W_hh^T (materialised outside the loop)."""
    dh, dc = carry
    dy_t, acts, c_prev, m_t = inputs
    acc = dc.dtype
    i, f, g, o = jnp.split(acts, 4, axis=-1)
    dh_total = dh + dy_t.astype(acc)
    dr = dh_total if w_hr is None else matmul(dh_total.astype(w_hr.dtype), w_hr.T, acc, precision)
    tanh_c = jnp.tanh(f * c_prev + i * g)
    dc_total = dc + dr * o * (1.0 - tanh_c * tanh_c)
    k = gate_scale(dc.shape[-1], acc)
    dact = jnp.concatenate([dc_total * g, dc_total * c_prev, dc_total * i, dr * tanh_c], axis=-1)
    dz = dact * (k * k - (acts - 1.0 + k) ** 2)
    dh_prev = matmul(dz.astype(w_hh_t.dtype), w_hh_t, acc, precision)
    dc_prev = dc_total * f
    if m_t is not None:
        valid = m_t[:, None]
        dz = jnp.where(valid, dz, jnp.zeros_like(dz))
        dh_total = jnp.where(valid, dh_total, jnp.zeros_like(dh_total))
        dh_prev = jnp.where(valid, dh_prev, dh)
        dc_prev = jnp.where(valid, dc_prev, dc)
    return (dh_prev, dc_prev), (dz, dh_total if w_hr is not None else None)


def run_backward(w_hh, w_hr, carry, dys, acts, c_prev, mask, unroll, precision):
    step = functools.partial(backward_step, jnp.transpose(w_hh), w_hr, precision)
    return jax.lax.scan(step, carry, (dys, acts, c_prev, mask), reverse=True, unroll=unroll)


ORIGINAL = (R._forward_step, R._run_backward)


def apply(on: bool = True) -> None:
    R._forward_step, R._run_backward = (forward_step, run_backward) if on else ORIGINAL


# ----------------------------------------------------------------------------- timing


def _t(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def main(argv):
    unrolls, shapes = [1], []
    it = iter(argv)
    for a in it:
        if a == "--unroll":
            unrolls = [int(v) for v in next(it).split(",")]
        else:
            shapes.append(parse_shape(a))
    shapes = shapes or [parse_shape(s) for s in
                        ("1,1000,32,128", "32,100,128,256", "128,50,512,512", "32,100,128,256,L2,bi")]
    import torch

    for s in shapes:
        params = lstm_jax.init_lstm(jax.random.key(0), s.D, s.H, num_layers=s.layers,
                                    bidirectional=s.bidirectional)
        x = jnp.asarray(np.random.default_rng(0).standard_normal((s.B, s.T, s.D), np.float32))
        for mode in ("fwdbwd", "fwd"):
            runs, outs = {}, {}
            for patched in (False, True):
                apply(patched)
                for u in unrolls:
                    def fwd(p, xx, u=u):
                        return lstm_jax.lstm(p, xx, unroll=u)[0]
                    f = jax.grad(lambda p, xx: jnp.sum(fwd(p, xx)), argnums=(0, 1)) \
                        if mode == "fwdbwd" else fwd
                    c = jax.jit(f).lower(params, x).compile()
                    name = f"{'patched' if patched else 'lstm_jax'} u={u}"
                    outs[name] = c(params, x)
                    runs[name] = lambda c=c: jax.block_until_ready(c(params, x))
            apply(False)
            ref = jax.tree.leaves(outs["lstm_jax u=1"])
            for name, out in outs.items():
                err = max(float(jnp.max(jnp.abs(a - b)) / (1e-6 + jnp.max(jnp.abs(b))))
                          for a, b in zip(jax.tree.leaves(out), ref))
                assert err < 1e-4, (name, err)
            m = torch.nn.LSTM(s.D, s.H, num_layers=s.layers, bidirectional=s.bidirectional,
                              batch_first=True)
            xt = torch.from_numpy(np.asarray(x)).clone().requires_grad_(mode == "fwdbwd")
            inp = list(m.parameters()) + [xt]
            if mode == "fwdbwd":
                def torch_run():
                    torch.autograd.grad(m(xt)[0].sum(), inp)
            else:
                def torch_run():
                    with torch.no_grad():
                        m(xt)
            runs["torch"] = torch_run
            for f in runs.values():
                f()
            inner = max(1, int(0.05 / min(_t(runs["torch"]) for _ in range(2))))
            times = {n: [] for n in runs}
            deadline, rounds = time.perf_counter() + 600, 0
            while rounds < 7:
                _wait_until_quiet(0.15, deadline, window=0.2)
                start = _cpu_counters()
                new = {n: [_t(f) for _ in range(inner)] for n, f in runs.items()}
                busy = _others_cpu(start, _cpu_counters())
                if busy is not None and busy > 0.15 and time.perf_counter() < deadline:
                    continue
                rounds += 1
                for n in new:
                    times[n] += new[n]
            ref_t = statistics.median(times["torch"])
            base = statistics.median(times["lstm_jax u=1"])
            print(f"{s.label} {mode}: torch {1e3 * ref_t:.2f} ms")
            for n in runs:
                med = statistics.median(times[n])
                print(f"  {n:14s} {1e3 * med:8.2f} ms  {med / ref_t:5.2f}x torch  "
                      f"{med / base:5.2f}x lstm_jax u=1")
            sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
