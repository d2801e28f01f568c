"""A slow, obvious NumPy float64 LSTM with torch.nn.LSTM semantics: the tests' reference;
and the tests' random inputs, drawn with NumPy."""

from __future__ import annotations

import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def cell_step(p, h, c, x):
    """One step of one direction, written from the equations (gate order i, f, g, o)."""
    w_ih, w_hh = np.asarray(p.w_ih, np.float64), np.asarray(p.w_hh, np.float64)
    z = x @ w_ih + h @ w_hh
    if p.b is not None:
        z = z + np.asarray(p.b, np.float64)
    H = w_ih.shape[1] // 4
    i, f, g, o = sigmoid(z[:, :H]), sigmoid(z[:, H : 2 * H]), np.tanh(z[:, 2 * H : 3 * H]), sigmoid(z[:, 3 * H :])
    c = f * c + i * g
    h = o * np.tanh(c)
    if p.w_hr is not None:
        h = h @ np.asarray(p.w_hr, np.float64)
    return h, c


def lstm_reference(params, x, h0=None, c0=None, lengths=None):
    """x: (B, T, F) float64 -> y (B, T, D*H_out), h_n (L*D, B, H_out), c_n (L*D, B, H).

    Each sequence is run alone over its own first ``lengths[b]`` steps; outputs past the
    length are zero, as torch's packed sequences.
    """
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    L, D = params.num_layers, params.num_directions
    H, H_out = params.hidden_size, params.output_size
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    h0 = np.zeros((L * D, B, H_out)) if h0 is None else np.asarray(h0, np.float64)
    c0 = np.zeros((L * D, B, H)) if c0 is None else np.asarray(c0, np.float64)
    h_n, c_n = np.zeros_like(h0), np.zeros_like(c0)
    inp = x
    for layer in range(L):
        out = np.zeros((B, T, D * H_out))
        for d in range(D):
            p = params.layers[layer][d]
            k = layer * D + d
            for b in range(B):
                h, c = h0[k, b : b + 1], c0[k, b : b + 1]
                steps = range(lengths[b]) if d == 0 else reversed(range(lengths[b]))
                for t in steps:
                    h, c = cell_step(p, h, c, inp[b : b + 1, t])
                    out[b, t, d * H_out : (d + 1) * H_out] = h[0]
                h_n[k, b], c_n[k, b] = h[0], c[0]
        inp = out
    return inp, h_n, c_n


def normal(seed, shape, scale=1.0, dtype=np.float32):
    """Standard normal test input from NumPy, times ``scale``, as a JAX array.

    ``jax.random.normal`` compiles a program for every new shape (0.2-0.7 s each on the
    2-core Xeon): a test that draws six arrays spent half its time there.
    """
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    return jnp.asarray((scale * rng.standard_normal(shape)).astype(dtype))


def lengths_mask(seed, steps, batch):
    """A (T, B) mask of sequence lengths: 0 and ``steps`` first (a sequence that never starts,
    one that runs through), the rest drawn from [1, steps)."""
    import jax.numpy as jnp

    lens = np.concatenate([[0, steps], np.random.default_rng(seed).integers(1, steps, batch)])
    return jnp.asarray(np.arange(steps)[:, None] < lens[None, :batch])
