"""Scratch: alternative formulations of one LSTM layer's loop on XLA:CPU (issue 4 profiling).

    PYTHONPATH=. python benchmarks/cpu_formulations.py [B,T,D,H ...] [--unroll 1,4]

Each variant is one layer, no lengths, no projection, with its own custom VJP, checked against
lstm_jax.lstm and timed (fwd+bwd, jit(grad) of sum(y) wrt weights and x) next to lstm_jax and
torch.nn.LSTM, interleaved. Winners go into lstm_jax/_recurrence.py by hand.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import lstm_jax
from lstm_jax.bench import _cpu_counters, _others_cpu, _wait_until_quiet

QUIET = float(os.environ.get("QUIET", "0.15"))

# ----------------------------------------------------------------------------- variants


def _gates(z):
    zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
    return jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)


def _k(H, dtype=jnp.float32):
    """Per-column scale: sigmoid(z) = 0.5 tanh(0.5 z) + 0.5, tanh(z) = 1 tanh(1 z) + 0."""
    return jnp.concatenate([jnp.full((2 * H,), 0.5), jnp.ones((H,)), jnp.full((H,), 0.5)]).astype(dtype)


def _mm(a, w, reduce):
    """a @ w, or (for tiny batches) a broadcast multiply and sum: no library call, no packing."""
    if not reduce:
        return a @ w
    return jnp.sum(a[:, :, None] * w[None], axis=1)


def make_layer(kind: str, unroll: int, transpose_whh: bool = False, reduce: bool = False):
    """Returns layer(xw: (T,B,4H), w_hh: (H,4H)) -> ys (T,B,H) with a custom VJP.

    kind:
      "acts"  as lstm_jax: save gate activations (4 sigmoid/tanh), c_prev
      "tanh1" one tanh over the whole (B,4H) with per-column scale; save acts, c_prev
      "z"     save pre-activations z and c_prev; recompute activations in the backward
      "c"     save acts and the whole c sequence (c_prev = shifted c)
    """

    def fwd_step(w_hh, k, carry, xw_t):
        h, c = carry
        z = xw_t + _mm(h, w_hh, reduce)
        if kind == "tanh1":
            acts = k * jnp.tanh(k * z) + (1.0 - k)
            i, f, g, o = jnp.split(acts, 4, axis=-1)
        else:
            i, f, g, o = _gates(z)
            acts = jnp.concatenate([i, f, g, o], axis=-1)
        c_new = f * c + i * g
        h_new = o * jnp.tanh(c_new)
        saved = z if kind == "z" else acts
        return (h_new, c_new), (h_new, saved, c)

    def run_fwd(xw, w_hh, h0, c0):
        k = _k(w_hh.shape[0])
        return jax.lax.scan(functools.partial(fwd_step, w_hh, k), (h0, c0), xw, unroll=unroll)

    @jax.custom_vjp
    def layer(xw, w_hh):
        B, H = xw.shape[1], w_hh.shape[0]
        z0 = jnp.zeros((B, H), xw.dtype)
        return run_fwd(xw, w_hh, z0, z0)[1][0]

    def layer_fwd(xw, w_hh):
        B, H = xw.shape[1], w_hh.shape[0]
        z0 = jnp.zeros((B, H), xw.dtype)
        _, (ys, saved, c_prev) = run_fwd(xw, w_hh, z0, z0)
        return ys, (w_hh, ys, saved, c_prev)

    def bwd_step(w_t, k, carry, inputs):
        dh, dc = carry
        dy, saved, c_prev = inputs
        if kind == "z":
            i, f, g, o = _gates(saved)
        else:
            i, f, g, o = jnp.split(saved, 4, axis=-1)
        dh = dh + dy
        tanh_c = jnp.tanh(f * c_prev + i * g)
        dc = dc + dh * o * (1.0 - tanh_c * tanh_c)
        if kind == "tanh1":
            dact = jnp.concatenate([dc * g, dc * c_prev, dc * i, dh * tanh_c], axis=-1)
            dz = dact * (k * k - (saved - 1.0 + k) ** 2)
        else:
            dz = jnp.concatenate(
                [dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g),
                 dh * tanh_c * o * (1 - o)], axis=-1)
        dh_prev = _mm(dz, w_t, reduce) if transpose_whh else dz @ w_t.T
        return (dh_prev, dc * f), dz

    def layer_bwd(res, dys):
        w_hh, ys, saved, c_prev = res
        B, H = ys.shape[1], ys.shape[2]
        k = _k(H)
        w_t = w_hh.T if transpose_whh else w_hh
        zero = jnp.zeros((B, H), ys.dtype)
        _, dz = jax.lax.scan(functools.partial(bwd_step, w_t, k), (zero, zero),
                             (dys, saved, c_prev), reverse=True, unroll=unroll)
        h_prev = jnp.concatenate([zero[None], ys[:-1]])
        dw_hh = jnp.einsum("tbk,tbg->kg", h_prev, dz)
        return dz, dw_hh

    layer.defvjp(layer_fwd, layer_bwd)
    return layer


def make_layer_fm(unroll: int, tanh1: bool = False):
    """Feature-major: state (H, B), z^T = W_hh^T @ h^T, so the weight is the dot's LHS (a GEMM
    library packs its RHS operand per call: here that is the small (H, B) state, not the weight).
    Gate slices are contiguous row blocks. layer(xwT: (T, 4H, B), w_hh) -> ys (T, H, B)."""

    def acts_of(z):
        H4 = z.shape[0]
        if tanh1:
            k = _k(H4 // 4)[:, None]
            return k * jnp.tanh(k * z) + (1.0 - k)
        H = H4 // 4
        return jnp.concatenate([jax.nn.sigmoid(z[:2 * H]), jnp.tanh(z[2 * H:3 * H]),
                                jax.nn.sigmoid(z[3 * H:])])

    def fwd_step(w_t, carry, xw_t):
        h, c = carry
        acts = acts_of(xw_t + w_t @ h)
        i, f, g, o = jnp.split(acts, 4, axis=0)
        c_new = f * c + i * g
        h_new = o * jnp.tanh(c_new)
        return (h_new, c_new), (h_new, acts, c)

    def run_fwd(xw, w_hh):
        H, B = w_hh.shape[0], xw.shape[2]
        z0 = jnp.zeros((H, B), xw.dtype)
        return jax.lax.scan(functools.partial(fwd_step, w_hh.T), (z0, z0), xw, unroll=unroll)

    @jax.custom_vjp
    def layer(xw, w_hh):
        return run_fwd(xw, w_hh)[1][0]

    def layer_fwd(xw, w_hh):
        _, (ys, acts, c_prev) = run_fwd(xw, w_hh)
        return ys, (w_hh, ys, acts, c_prev)

    def bwd_step(w_hh, carry, inputs):
        dh, dc = carry
        dy, acts, c_prev = inputs
        i, f, g, o = jnp.split(acts, 4, axis=0)
        dh = dh + dy
        tanh_c = jnp.tanh(f * c_prev + i * g)
        dc = dc + dh * o * (1.0 - tanh_c * tanh_c)
        dz = jnp.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f),
                              dc * i * (1 - g * g), dh * tanh_c * o * (1 - o)], axis=0)
        return (w_hh @ dz, dc * f), dz

    def layer_bwd(res, dys):
        w_hh, ys, acts, c_prev = res
        zero = jnp.zeros(ys.shape[1:], ys.dtype)
        _, dz = jax.lax.scan(functools.partial(bwd_step, w_hh), (zero, zero), (dys, acts, c_prev),
                             reverse=True, unroll=unroll)
        h_prev = jnp.concatenate([zero[None], ys[:-1]])
        return dz, jnp.einsum("thb,tgb->hg", h_prev, dz)

    layer.defvjp(layer_fwd, layer_bwd)
    return layer


def make_model_fm(unroll, tanh1=False):
    layer = make_layer_fm(unroll, tanh1)

    def model(p, x):  # x: (B, T, D)
        xw = jnp.einsum("btd,dg->tgb", x, p.w_ih) + p.b[:, None]
        return jnp.transpose(layer(xw, p.w_hh), (2, 0, 1))

    return model


def make_model(kind, unroll, transpose_whh=False, reduce=False):
    layer = make_layer(kind, unroll, transpose_whh, reduce)

    def model(p, x):  # x: (B, T, D)
        xw = jnp.einsum("btd,dg->tbg", x, p.w_ih) + p.b
        return jnp.swapaxes(layer(xw, p.w_hh), 0, 1)

    return model


# ----------------------------------------------------------------------------- timing

KINDS = [k for k in os.environ.get("KINDS", "acts,tanh1,z").split(",") if k]


def main(argv):
    unrolls = [1, 4]
    shapes = []
    it = iter(argv)
    for a in it:
        if a == "--unroll":
            unrolls = [int(v) for v in next(it).split(",")]
        else:
            shapes.append(tuple(int(v) for v in a.split(",")))
    shapes = shapes or [(1, 1000, 32, 128), (32, 100, 128, 256), (128, 50, 512, 512)]
    import torch

    for B, T, D, H in shapes:
        params = lstm_jax.init_lstm(jax.random.key(0), D, H)
        p = params.layers[0][0]
        x = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, D), np.float32))
        cands = {}
        for u in unrolls:
            cands[f"lstm_jax u={u}"] = lambda p_, x_, u=u: lstm_jax.lstm(
                lstm_jax.LSTMParams(((p_,),)), x_, unroll=u)[0]
            for kind in KINDS:
                cands[f"{kind} u={u}"] = make_model(kind, u)
            cands[f"acts+wT u={u}"] = make_model("acts", u, transpose_whh=True)
            cands[f"tanh1+wT u={u}"] = make_model("tanh1", u, transpose_whh=True)
            cands[f"fm u={u}"] = make_model_fm(u)
            cands[f"fm+tanh1 u={u}"] = make_model_fm(u, tanh1=True)
            if B <= 8:
                cands[f"acts+wT+reduce u={u}"] = make_model("acts", u, True, reduce=True)
        want = None
        runs = {}
        for name, f in cands.items():
            g = jax.jit(jax.grad(lambda pp, xx, f=f: jnp.sum(f(pp, xx)), argnums=(0, 1)))
            t0 = time.perf_counter()
            c = g.lower(p, x).compile()
            comp = time.perf_counter() - t0
            out = c(p, x)
            if want is None:
                want = out
            err = max(float(jnp.max(jnp.abs(a - b))) / (1e-6 + float(jnp.max(jnp.abs(b))))
                      for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)))
            runs[name] = (lambda c=c: jax.block_until_ready(c(p, x)), comp, err)
        m = torch.nn.LSTM(D, H, batch_first=True)
        xt = torch.randn(B, T, D, requires_grad=True)
        inp = list(m.parameters()) + [xt]

        def torch_run():
            y, _ = m(xt)
            torch.autograd.grad(y.sum(), inp)

        runs["torch"] = (torch_run, None, 0.0)
        for f, _, _ in runs.values():
            f()
            f()
        times = {n: [] for n in runs}
        once = min(_t(runs["torch"][0]) for _ in range(2))
        inner = max(1, int(0.05 / once))
        deadline = time.perf_counter() + float(os.environ.get("MAX_WAIT", "600"))
        rounds = 0
        while rounds < 7:
            # Shared machine: time a round only while others are idle, redo it if disturbed.
            _wait_until_quiet(QUIET, deadline, window=0.5)
            start = _cpu_counters()
            new = {n: [_t(f) for _ in range(inner)] for n, (f, _, _) in runs.items()}
            busy = _others_cpu(start, _cpu_counters())
            if busy is not None and busy > QUIET and time.perf_counter() < deadline:
                continue
            rounds += 1
            for n in new:
                times[n] += new[n]
        ref = statistics.median(times["torch"])
        print(f"\n{B},{T},{D},{H} fwd+bwd: torch {1e3 * ref:.2f} ms")
        for n, (f, comp, err) in runs.items():
            med = statistics.median(times[n])
            print(f"  {n:16s} {1e3 * med:8.2f} ms {med / ref:5.2f}x  {1e6 * med / T:7.1f} us/step"
                  + (f"  compile {comp:.2f} s  rel.err {err:.1e}" if comp is not None else ""))
        sys.stdout.flush()


def _t(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main(sys.argv[1:])
