"""The LSTM cell: one time step of one layer in one direction.

All the gate math of the library lives here; the time loop (``_recurrence``) and the
Flax modules call these functions rather than writing the equations again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lstm_jax._params import LSTMCellParams, LSTMState

Array = jax.Array


def accumulation_dtype(dtype) -> jnp.dtype:
    """Dtype of matmul accumulation, gate pre-activations and the cell state.

    float32 for bfloat16/float16/float32 inputs (the cell state is never kept in half
    precision: it integrates over time), float64 for float64.
    """
    return jnp.promote_types(dtype, jnp.float32)


def matmul(a: Array, w: Array, acc_dtype, precision=None) -> Array:
    """``a @ w`` with the operands in their own dtype and the sum in ``acc_dtype``."""
    return jnp.matmul(a, w, precision=precision, preferred_element_type=acc_dtype)


def gate_activations(z: Array) -> tuple[Array, Array, Array, Array]:
    """Splits pre-activations ``z: (..., 4H)`` in the order i, f, g, o and activates them."""
    zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
    return jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)


def cell_update(z: Array, c: Array) -> tuple[Array, Array]:
    """From pre-activations and the previous cell state to ``(c_t, o_t * tanh(c_t))``."""
    i, f, g, o = gate_activations(z)
    c_new = f * c + i * g
    return c_new, o * jnp.tanh(c_new)


def project(r: Array, w_hr: Array | None, dtype, acc_dtype, precision=None) -> Array:
    """The emitted hidden state: ``r`` itself, or ``r @ w_hr`` with a projection (Sak et al. 2014)."""
    r = r.astype(dtype)
    if w_hr is None:
        return r
    return matmul(r, w_hr, acc_dtype, precision).astype(dtype)


def lstm_cell(
    cell_params: LSTMCellParams, state: LSTMState, x: Array, *, precision=None
) -> tuple[LSTMState, Array]:
    """One LSTM step, with the ``lax.scan`` signature ``(carry, x) -> (carry, y)``.

    Gate order i, f, g, o (as torch.nn.LSTM); state order (h, c)::

        z = x @ w_ih + h @ w_hh + b                    # (B, 4H)
        i, f, g, o = sigmoid(z_i), sigmoid(z_f), tanh(z_g), sigmoid(z_o)
        c' = f * c + i * g
        h' = o * tanh(c')                              # then h' @ w_hr if projected

    Args:
      cell_params: :class:`LSTMCellParams` of one layer and direction.
      state: ``LSTMState(h: (B, H_out), c: (B, H))``; unbatched ``(H_out,)``, ``(H,)`` works too.
      x: ``(B, input_size)`` or ``(input_size,)``.
      precision: optional ``jax.lax.Precision`` for the matrix products.

    Returns:
      ``(LSTMState(h', c'), h')``. ``h'`` has the dtype of ``x``; ``c'`` is kept in
      :func:`accumulation_dtype` (float32 for bfloat16 inputs).

    Example:
      >>> p = init_lstm(jax.random.key(0), 3, 5).layers[0][0]
      >>> state = LSTMState(jnp.zeros((2, 5)), jnp.zeros((2, 5)))
      >>> state, h = lstm_cell(p, state, jnp.ones((2, 3)))
    """
    dtype = x.dtype
    acc = accumulation_dtype(dtype)
    z = matmul(x, cell_params.w_ih.astype(dtype), acc, precision)
    z = z + matmul(state.h.astype(dtype), cell_params.w_hh.astype(dtype), acc, precision)
    if cell_params.b is not None:
        z = z + cell_params.b.astype(acc)
    c_new, r = cell_update(z, state.c.astype(acc))
    w_hr = None if cell_params.w_hr is None else cell_params.w_hr.astype(dtype)
    h_new = project(r, w_hr, dtype, acc, precision)
    return LSTMState(h_new, c_new), h_new
