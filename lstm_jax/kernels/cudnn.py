"""The whole LSTM stack through cuDNN, via ``jax.experimental.rnn``.

``jax.experimental.rnn.lstm`` runs every layer and both directions in one cuDNN call (GPU
only, float32, no projection, no CPU lowering). It takes one flat weight vector in cuDNN's
layout, documented in that module and checked against its pure-JAX ``lstm_ref`` by
``tests/test_kernels.py``:

* pseudo-layers ``p = layer * D + direction`` (forward 0, reverse 0, forward 1, ...);
* first all matrices ``W_ih^p: (4H, in_p)`` then ``W_hh^p: (4H, H)`` for each ``p`` in turn,
  row-major, gate blocks in the order i, f, g, o (ours, torch's and cuDNN's; only MIOpen on
  ROCm differs, which ``rnn.swap_lstm_gates`` handles there);
* then all biases ``b_ih^p: (4H,)``, ``b_hh^p: (4H,)``.

Our ``w_ih: (in, 4H)`` and ``w_hh: (H, 4H)`` are stored input-major, so they are transposed
here (and cast to float32, as the scan casts them to the float32 compute dtype); our single
bias goes into ``b_ih`` and ``b_hh`` is zero. The conversion is plain ``jnp`` code, so
gradients reach :class:`~lstm_jax.LSTMParams` through it.

Semantics match :func:`lstm_jax.lstm`: batch-first ``x``, states ``(L*D, B, H)`` indexed
``layer * D + direction``, and ``seq_lengths`` with torch's packed-sequence behaviour.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lstm_jax._params import LSTMParams, LSTMState

Array = jax.Array


def _rnn():
    from jax.experimental import rnn

    return rnn


def cudnn_available() -> bool:
    """Whether this jaxlib has the cuDNN RNN kernels (a CUDA build)."""
    try:
        from jax._src.lib import gpu_rnn
    except ImportError:
        return False
    return gpu_rnn is not None


def unsupported_reason(params: LSTMParams, dtype=jnp.float32, *, platform: str | None = None,
                       compute_dtype=None, dropout_active: bool = False) -> str | None:
    """Why the cuDNN path cannot run this call, or None when it can."""
    platform = platform or jax.default_backend()
    if platform not in ("gpu", "cuda"):
        return f"cuDNN runs only on NVIDIA GPUs (platform is {platform!r})"
    if params.proj_size:
        return "jax.experimental.rnn has no projection (proj_size) support"
    if jnp.dtype(dtype) != jnp.float32 or (
        compute_dtype is not None and jnp.dtype(compute_dtype) != jnp.float32
    ):
        return "jax.experimental.rnn supports float32 only"
    if dropout_active:
        return "inter-layer dropout is drawn from our key, which cuDNN cannot reproduce"
    return None


def to_cudnn_weights(params: LSTMParams) -> Array:
    """Our parameters as ``jax.experimental.rnn``'s flat cuDNN weight vector (float32)."""
    if params.proj_size:
        raise ValueError("cuDNN (jax.experimental.rnn) has no projection (proj_size) support")
    matrices, biases = [], []
    for layer in params.layers:
        for p in layer:
            four_h = p.w_ih.shape[1]
            matrices += [p.w_ih.T.reshape(-1), p.w_hh.T.reshape(-1)]
            b = jnp.zeros((four_h,), p.w_ih.dtype) if p.b is None else p.b
            biases += [b, jnp.zeros((four_h,), b.dtype)]
    return jnp.concatenate(matrices + biases).astype(jnp.float32)


def unpack_reference(params: LSTMParams):
    """``(W_ih, W_hh, b_ih, b_hh)`` dicts for ``jax.experimental.rnn.lstm_ref`` (tests)."""
    rnn = _rnn()
    return rnn.unpack_lstm_weights(
        to_cudnn_weights(params), params.input_size, params.hidden_size, params.num_layers,
        params.bidirectional,
    )


def _cudnn_precision(precision):
    """Our ``precision`` as ``rnn.lstm`` takes it (it rejects DEFAULT, meaning bfloat16 there)."""
    if precision is None:
        return None
    # jax.lax has no public canonicaliser in every version: accept what jnp.matmul accepts
    # (a Precision, its name, or a pair of them).
    first = precision[0] if isinstance(precision, (tuple, list)) else precision
    if isinstance(first, str):
        first = jax.lax.Precision(first)
    if first == jax.lax.Precision.DEFAULT:
        return None
    return jax.lax.Precision.HIGHEST if first == jax.lax.Precision.HIGHEST else (
        jax.lax.Precision.HIGH)


def cudnn_lstm(
    params: LSTMParams,
    x: Array,
    initial_state: LSTMState | None = None,
    *,
    seq_lengths: Array | None = None,
    batch_first: bool = True,
    precision=None,
) -> tuple[Array, LSTMState]:
    """Runs the whole stack with cuDNN: same arguments and results as :func:`lstm_jax.lstm`.

    Args:
      params: :class:`LSTMParams` without projection (used in float32).
      x: ``(B, T, input_size)`` (``(T, B, input_size)`` if not ``batch_first``; ``(T, F)``
        unbatched).
      initial_state: ``LSTMState(h, c)`` each ``(L*D, B, H)``; zeros when None.
      seq_lengths: ``(B,)`` valid lengths (torch packed-sequence semantics); all T if None.
      batch_first: layout of ``x`` and ``y``.
      precision: ``"highest"`` disables TF32 in cuDNN; anything else allows it.

    Returns:
      ``(y, LSTMState(h_n, c_n))`` as :func:`lstm_jax.lstm`.
    """
    reason = unsupported_reason(params, jnp.asarray(x).dtype)
    if reason is not None:
        raise ValueError(f'backend="cudnn" cannot run this call: {reason}')
    rnn = _rnn()
    x = jnp.asarray(x)
    unbatched = x.ndim == 2
    if unbatched:
        x = x[None]
    elif not batch_first:
        x = jnp.swapaxes(x, 0, 1)
    B, T, _ = x.shape
    L, D, H = params.num_layers, params.num_directions, params.hidden_size
    if initial_state is None:
        h0 = jnp.zeros((L * D, B, H), x.dtype)
        c0 = jnp.zeros((L * D, B, H), x.dtype)
    else:
        h0, c0 = (jnp.asarray(s, x.dtype) for s in initial_state)
        if unbatched:
            h0, c0 = h0[:, None], c0[:, None]
    if seq_lengths is None:
        lengths = jnp.full((B,), T, jnp.int32)
    else:
        lengths = jnp.asarray(seq_lengths).reshape((B,)).astype(jnp.int32)
    y, h_n, c_n = rnn.lstm(
        x,
        h0,
        c0,
        to_cudnn_weights(params),
        lengths,
        input_size=params.input_size,
        hidden_size=H,
        num_layers=L,
        dropout=0.0,
        bidirectional=params.bidirectional,
        precision=_cudnn_precision(precision),
    )
    if unbatched:
        return y[0], LSTMState(h_n[:, 0], c_n[:, 0])
    if not batch_first:
        y = jnp.swapaxes(y, 0, 1)
    return y, LSTMState(h_n, c_n)
