"""The time loop of one LSTM layer, with a backward pass written for the recurrence.

Only ``h @ w_hh`` and the gate math are sequential. The input product ``x @ w_ih`` is
hoisted out of the loop by the caller (one large product over all steps), so this module
takes the pre-computed input pre-activations ``xw: (T, B, 4H)``.

Reverse-mode autodiff of a ``lax.scan`` accumulates ``dW_hh += h_{t-1}^T dz_t`` inside the
loop: T small products. The ``custom_vjp`` below runs a backward scan that carries only
``(dh, dc)`` and emits ``dz_t``; the weight gradients are then single large products over
all time steps (what cuDNN does), and the gradient of ``xw`` is ``dz`` itself, so autodiff
of the hoisted input product makes ``dW_ih`` and ``dx`` large products too.

For long sequences, :func:`remat_recurrence` takes the layer input instead of ``xw``: its
forward pass keeps only the state at the start of each chunk of about sqrt(T) steps, and its
backward pass recomputes each chunk's input product and gate activations before
differentiating it, trading one extra forward pass for O(sqrt(T)) working memory.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lstm_jax._cell import (
    cell_update,
    cell_update_grad,
    input_affine,
    input_product_grads,
    matmul,
    summed_outer,
    project,
    variant_step,
    zoneout,
    zoneout_grad,
)

Array = jax.Array


def _forward_step(w_hh, w_hr, b, precision, save, carry, inputs):
    """One step; returns the new carry and (y_t, gate activations, c_{t-1}).

    Without ``save`` (no gradient will be taken) the residuals are not emitted: writing them
    costs about a tenth of the forward pass on CPU. The bias is added here, inside the step's
    elementwise pass, rather than over all of ``xw`` before the loop (one pass over a
    ``(T, B, 4H)`` array less).
    """
    h, c = carry
    xw_t, m_t = inputs
    acc = c.dtype
    # (xw_t + b) + h @ w_hh: the variants' order of the sums, so both paths agree bit for bit.
    a_t = xw_t if b is None else xw_t + b
    z = a_t + matmul(h, w_hh, acc, precision)
    c_new, r, acts = cell_update(z, c)
    h_new = project(r, w_hr, h.dtype, acc, precision)
    acts, c_saved = (acts, c) if save else (None, None)
    if m_t is None:
        return (h_new, c_new), (h_new, acts, c_saved)
    valid = m_t[:, None]
    # Past a sequence's end the state is carried unchanged and the output is zero
    # (torch's packed-sequence behaviour).
    carry = (jnp.where(valid, h_new, h), jnp.where(valid, c_new, c))
    return carry, (jnp.where(valid, h_new, jnp.zeros_like(h_new)), acts, c_saved)


def _backward_step(w_hh_t, w_hr_t, precision, carry, inputs):
    """Differentiates one step; carries (dh, dc) and emits (dz_t, dh_t) (dh_t for dW_hr).

    Takes the transposed weights ``w_hh_t = W_hh^T`` (and ``W_hr^T``), materialised once
    before the loop: a product with a transposed operand repacks the weight at every step on
    CPU, which dominates the step at small batch.
    """
    dh, dc = carry
    dy_t, acts, c_prev, m_t = inputs
    acc = dc.dtype
    dh_total = dh + dy_t.astype(acc)
    if w_hr_t is None:
        dr = dh_total
    else:
        dr = matmul(dh_total.astype(w_hr_t.dtype), w_hr_t, acc, precision)
    dz, dc_prev = cell_update_grad(acts, c_prev, dr, dc)
    # dz is emitted in the products' dtype (bfloat16 under mixed precision): every product
    # that reads it (dh here, dx, dW_ih, dW_hh after the loop) casts it to that dtype anyway,
    # so the loop writes the stacked (T, B, 4H) gradient at half the bytes; db sums these
    # rounded values in float32 (its error against float32 moved by about 1%). On CPU the
    # working memory is unchanged (XLA:CPU upcasts bfloat16 products and the sum to float32
    # copies); the GPU, where bfloat16 products are native, is where it is meant to help.
    dz = dz.astype(w_hh_t.dtype)
    dh_prev = matmul(dz, w_hh_t, acc, precision)
    if m_t is not None:
        valid = m_t[:, None]
        dz = jnp.where(valid, dz, jnp.zeros_like(dz))
        dh_total = jnp.where(valid, dh_total, jnp.zeros_like(dh_total))
        dh_prev = jnp.where(valid, dh_prev, dh)
        dc_prev = jnp.where(valid, dc_prev, dc)
    return (dh_prev, dc_prev), (dz, dh_total if w_hr_t is not None else None)


def in_place_residuals() -> bool:
    """Whether the training forward pass writes the gate activations over ``xw`` in place.

    Measured on CPU (``benchmarks/results/cpu-2core-amd-epyc.md``): 13% less temporary memory for
    ``jit(grad)`` and 3-4% faster. Other platforms keep the scan's stacked output until it is
    measured there (XLA must not copy the buffer at each step; on CPU it does not).
    """
    return jax.default_backend() == "cpu"


def _run_forward(xw, b, w_hh, w_hr, h0, c0, mask, unroll, precision, save=True):
    step = functools.partial(_forward_step, w_hh, w_hr, b, precision, save)
    if not (save and in_place_residuals()):
        return jax.lax.scan(step, (h0, c0), (xw, mask), unroll=unroll)

    # Step t's gate activations overwrite xw[t] (read only by step t): the (T, B, 4H) array of
    # activations needs no buffer of its own, nor its zero-fill and fresh pages.
    def in_place(carry, inputs):
        state, buf = carry
        t, m_t = inputs
        xw_t = jax.lax.dynamic_index_in_dim(buf, t, 0, keepdims=False)
        state, (y_t, acts_t, c_prev_t) = step(state, (xw_t, m_t))
        buf = jax.lax.dynamic_update_index_in_dim(buf, acts_t.astype(buf.dtype), t, 0)
        return (state, buf), (y_t, c_prev_t)

    steps = jnp.arange(xw.shape[0], dtype=jnp.int32)
    (state, acts), (ys, c_prev) = jax.lax.scan(in_place, ((h0, c0), xw), (steps, mask),
                                               unroll=unroll)
    return state, (ys, acts, c_prev)


def _transposed(w):
    return None if w is None else jnp.transpose(w)


def _gate_slices(acts, t):
    """Step t's four gate activations, each read straight from ``acts: (T, B, 4H)``.

    One dynamic slice per gate rather than one of the whole row split afterwards: XLA:CPU does
    not vectorise a fusion that takes static column slices of a dynamic slice (measured: the
    backward's elementwise step 4-8x slower that way, ``benchmarks/cpu-notes.md``).
    """
    batch, hidden = acts.shape[1], acts.shape[2] // 4
    zero = jnp.zeros((), t.dtype)  # start indices of one integer type (int64 under x64)
    return tuple(
        jax.lax.dynamic_slice(acts, (t, zero, zero + k * hidden), (1, batch, hidden))[0]
        for k in range(4)
    )


def _run_backward(w_hh, w_hr, carry, dys, acts, c_prev, mask, unroll, precision):
    step = functools.partial(_backward_step, _transposed(w_hh), _transposed(w_hr), precision)

    def gated(carry, inputs):
        t, dy_t, c_prev_t, m_t = inputs
        return step(carry, (dy_t, _gate_slices(acts, t), c_prev_t, m_t))

    steps = jnp.arange(acts.shape[0], dtype=jnp.int32)
    return jax.lax.scan(gated, carry, (steps, dys, c_prev, mask), reverse=True, unroll=unroll)


def _weight_grads(w_hh, w_hr, h0, ys, acts, c_prev, dz, dh_total, acc, precision):
    """dW_hh and dW_hr as single products over all (t, b) of a span of steps."""
    # h_{t-1} is y_{t-1}: valid wherever dz is non-zero (masked steps have dz = 0).
    h_prev = jnp.concatenate([h0[None], ys[:-1]], axis=0)
    dw_hh = summed_outer(h_prev, dz, acc, precision)
    dw_hr = None if w_hr is None else projection_grad(w_hr, acts, c_prev, dh_total, acc, precision)
    return dw_hh, dw_hr


def projection_grad(w_hr, acts, c_prev, dh_total, acc, precision):
    """dW_hr over all (t, b): r_t = o * tanh(c_t), recomputed from the saved activations."""
    i, f, g, o = jnp.split(acts, 4, axis=-1)
    r = (o * jnp.tanh(f * c_prev + i * g)).astype(w_hr.dtype)
    return summed_outer(r, dh_total, acc, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def recurrence(unroll, precision, xw, w_hh, w_hr, h0, c0, mask, b=None):
    """Runs one layer over time: ``xw: (T, B, 4H)`` -> ``(ys: (T, B, H_out), (h_T, c_T))``.

    ``mask: (T, B)`` bool or None marks valid steps. ``b: (4H,)`` or None is added to ``xw``
    at each step. ``h0`` has the compute dtype, ``c0``, ``xw`` and ``b`` the accumulation
    dtype. For long sequences see :func:`remat_recurrence`.
    """
    (h, c), (ys, _, _) = _run_forward(xw, b, w_hh, w_hr, h0, c0, mask, unroll, precision,
                                      save=False)
    return ys, (h, c)


def _recurrence_fwd(unroll, precision, xw, w_hh, w_hr, h0, c0, mask, b):
    (h, c), (ys, acts, c_prev) = _run_forward(xw, b, w_hh, w_hr, h0, c0, mask, unroll, precision)
    return (ys, (h, c)), (w_hh, w_hr, b, h0, c0, mask, ys, acts, c_prev)


def _recurrence_bwd(unroll, precision, residuals, cotangents):
    w_hh, w_hr, b, h0, c0, mask, ys, acts, c_prev = residuals
    dys, (dh_T, dc_T) = cotangents
    acc = c0.dtype
    carry = (dh_T.astype(acc), dc_T.astype(acc))
    (dh0, dc0), (dz, dh_total) = _run_backward(
        w_hh, w_hr, carry, dys, acts, c_prev, mask, unroll, precision
    )
    dw_hh, dw_hr = _weight_grads(w_hh, w_hr, h0, ys, acts, c_prev, dz, dh_total, acc, precision)
    # Masked steps have dz = 0, so they add nothing to the bias gradient.
    db = None if b is None else jnp.sum(dz, axis=(0, 1), dtype=acc).astype(b.dtype)
    return (
        dz.astype(acc),  # xw has the accumulation dtype
        dw_hh.astype(w_hh.dtype),
        None if w_hr is None else dw_hr.astype(w_hr.dtype),
        dh0.astype(h0.dtype),
        dc0.astype(c0.dtype),
        None,
        db,
    )


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def remat_chunk(steps: int, scale: int = 1) -> int:
    """Steps between saved states for rematerialisation: about ``scale * sqrt(T)`` (Chen et al.
    2016), preferring a divisor of T within a factor of two of it.

    A T that is not a whole number of chunks is padded with masked steps, and the padding
    copies every T-long array of the loop (x, the output gradient, dx): at B=8, T=9973,
    H=256 the working memory of ``jit(grad)`` was 165 MiB against 130 at T=10,000. A divisor
    avoids that wherever T has one near the target (e.g. T=1000: 25 rather than 31).
    """
    steps = max(steps, 1)
    target = min(steps, scale * math.isqrt(steps))
    divisors = [c for c in range(max(1, target // 2), min(steps, 2 * target) + 1)
                if steps % c == 0]
    if not divisors:
        return target
    return min(divisors, key=lambda c: (abs(c - target), -c))


def _chunked(a, mask, chunk):
    """Pads time to a multiple of ``chunk`` with masked steps and splits it into chunks."""
    steps, batch = a.shape[:2]
    n = -(-steps // chunk)
    if mask is None:
        mask = jnp.ones((steps, batch), bool)
    return _time_chunks(a, n, chunk, steps), _time_chunks(mask, n, chunk, steps), steps


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def remat_recurrence(unroll, precision, chunk, x, w_ih, w_hh, w_hr, h0, c0, mask, b=None):
    """:func:`recurrence` with the input product inside, rematerialised chunk by chunk.

    Takes the layer input ``x: (T, B, D)`` and ``w_ih: (D, 4H)`` rather than ``xw``. The
    forward pass keeps only the state entering each chunk of ``chunk`` steps (about sqrt(T),
    :func:`remat_chunk`); the backward pass walks the chunks in reverse, recomputes each
    chunk's ``x @ w_ih`` and forward loop, differentiates it and adds its share of
    ``dW_ih``, ``dW_hh``, ``dW_hr`` and ``db``. Nothing of length T is kept besides ``x``
    and ``ys`` (both of the caller) and ``dx``: working memory O(T/chunk + chunk) steps
    instead of O(T) gate activations, for one extra forward pass (Chen et al. 2016).
    """
    # The primal is the forward rule without its residuals: the same chunked program, so that
    # jax.checkpoint + vmap around it sees one output layout (JAX 0.10 mis-batches a slice
    # when the primal and the forward rule build ys differently).
    return _remat_fwd(unroll, precision, chunk, x, w_ih, w_hh, w_hr, h0, c0, mask, b)[0]


def _remat_fwd(unroll, precision, chunk, x, w_ih, w_hh, w_hr, h0, c0, mask, b):
    acc = c0.dtype
    x_c, mask_c, steps = _chunked(x, mask, chunk)

    def chunk_step(carry, inputs):
        x_k, m_k = inputs
        xw_k = matmul(x_k, w_ih, acc, precision)
        new_carry, (ys_k, _, _) = _run_forward(xw_k, b, w_hh, w_hr, *carry, m_k, unroll,
                                               precision, save=False)
        return new_carry, (ys_k, carry)

    (h, c), (ys_c, starts) = jax.lax.scan(chunk_step, (h0, c0), (x_c, mask_c))
    ys = ys_c.reshape((-1,) + ys_c.shape[2:])[:steps]
    return (ys, (h, c)), (x, w_ih, w_hh, w_hr, b, h0, c0, mask, starts)


def _remat_bwd(unroll, precision, chunk, residuals, cotangents):
    x, w_ih, w_hh, w_hr, b, h0, c0, mask, starts = residuals
    dys, (dh_T, dc_T) = cotangents
    acc = c0.dtype
    x_c, mask_c, steps = _chunked(x, mask, chunk)
    dys_c = _time_chunks(dys, x_c.shape[0], chunk, steps)

    def chunk_step(carry, inputs):
        state, sums = carry
        x_k, m_k, dys_k, (h_k, c_k) = inputs
        xw_k = matmul(x_k, w_ih, acc, precision)
        _, (ys_k, acts_k, c_prev_k) = _run_forward(xw_k, b, w_hh, w_hr, h_k, c_k, m_k, unroll,
                                                   precision)
        state, (dz_k, dh_total_k) = _run_backward(w_hh, w_hr, state, dys_k, acts_k, c_prev_k,
                                                  m_k, unroll, precision)
        dw_hh_k, dw_hr_k = _weight_grads(w_hh, w_hr, h_k, ys_k, acts_k, c_prev_k, dz_k,
                                         dh_total_k, acc, precision)
        dx_k, dw_ih_k = input_product_grads(x_k, w_ih, dz_k, acc, precision)
        grads_k = (dw_ih_k, dw_hh_k, dw_hr_k,
                   None if b is None else jnp.sum(dz_k, axis=(0, 1), dtype=acc))
        sums = jax.tree_util.tree_map(jnp.add, sums, grads_k)
        return (state, sums), dx_k.astype(x.dtype)

    def zeros(w):
        return None if w is None else jnp.zeros(w.shape, acc)

    init = ((dh_T.astype(acc), dc_T.astype(acc)), tuple(map(zeros, (w_ih, w_hh, w_hr, b))))
    ((dh0, dc0), (dw_ih, dw_hh, dw_hr, db)), dx_c = jax.lax.scan(
        chunk_step, init, (x_c, mask_c, dys_c, starts), reverse=True
    )

    def cast(g, like):
        return None if like is None else g.astype(like.dtype)

    return (
        dx_c.reshape((-1,) + dx_c.shape[2:])[:steps],
        cast(dw_ih, w_ih),
        cast(dw_hh, w_hh),
        cast(dw_hr, w_hr),
        dh0.astype(h0.dtype),
        dc0.astype(c0.dtype),
        None,
        cast(db, b),
    )


remat_recurrence.defvjp(_remat_fwd, _remat_bwd)


def recurrence_autodiff(unroll, precision, xw, w_hh, w_hr, h0, c0, mask, b=None):
    """The same loop differentiated by JAX's own autodiff (a reference for tests and benchmarks)."""
    (h, c), (ys, _, _) = _run_forward(xw, b, w_hh, w_hr, h0, c0, mask, unroll, precision,
                                      save=False)
    return ys, (h, c)


# ----------------------------------------------------------------------------------------------
# Research variants: the same loop, with the elementwise step differentiated by jax.vjp
# ----------------------------------------------------------------------------------------------
#
# Per step:  h_in = h_{t-1} * m_rec             (recurrent dropout, one mask per sequence)
#            hw   = h_in @ w_hh                  (the only sequential matrix product)
#            r, c_t = variant_step(a_t, hw, c_{t-1}, extras, masks_t)   (elementwise)
#            h_t  = zoneout(h_{t-1}, r @ w_hr, m_h)
# The backward scan runs jax.vjp on variant_step only; the matrix products stay placed by
# hand: dh_in = dhw @ w_hh^T inside the loop, dW_hh = sum_t h_in^T dhw and dW_hr after it.
# The small per-unit parameters (peepholes, layer-norm gains) accumulate in the carry.


def _variant_forward_step(w_hh, w_hr, extras, rmask, opts, precision, carry, inputs):
    h, c = carry
    a_t, m_t, masks_t = inputs
    acc = c.dtype
    h_in = h if rmask is None else h * rmask
    hw = matmul(h_in, w_hh, acc, precision)
    r, c_new = variant_step(a_t, hw, c, extras, opts, masks_t.g, masks_t.c)
    h_new = project(r, w_hr, h.dtype, acc, precision)
    if opts.zoneout_h:
        h_new = zoneout(h.astype(acc), h_new.astype(acc), masks_t.h, opts.zoneout_h)
        h_new = h_new.astype(h.dtype)
    # Without a layer norm of hw the step needs only z = a + hw: save that, not both.
    saved = hw if extras.ln_h_scale is not None else a_t + hw
    if m_t is None:
        return (h_new, c_new), (h_new, saved, c)
    valid = m_t[:, None]
    carry = (jnp.where(valid, h_new, h), jnp.where(valid, c_new, c))
    return carry, (jnp.where(valid, h_new, jnp.zeros_like(h_new)), saved, c)


def _variant_backward_step(w_hh_t, w_hr_t, rmask, opts, precision, carry, inputs):
    """Carries (dh, dc, d_extras); emits (da_t, dhw_t or None, r_t, dh~_t); r, dh~ for dW_hr.

    Takes the transposed weights, as :func:`_backward_step`.
    """
    dh, dc, d_extras = carry
    dy_t, a_t, saved_t, c_prev, extras, m_t, masks_t = inputs
    acc = dc.dtype
    dh_total = dh + dy_t.astype(acc)
    d_new, dh_keep = zoneout_grad(dh_total, masks_t.h, opts.zoneout_h)
    dc_in = dc
    if m_t is not None:
        # Zeroing the cotangents of invalid rows zeroes everything the vjp derives from them,
        # including their share of the batch-summed parameter gradients.
        valid = m_t[:, None]
        d_new = jnp.where(valid, d_new, jnp.zeros_like(d_new))
        dc_in = jnp.where(valid, dc, jnp.zeros_like(dc))
    if w_hr_t is None:
        dr = d_new
    else:
        dr = matmul(d_new.astype(w_hr_t.dtype), w_hr_t, acc, precision)
    layer_norm_h = extras.ln_h_scale is not None

    def step(a, hw, c, ex):
        return variant_step(a, hw, c, ex, opts, masks_t.g, masks_t.c)

    if layer_norm_h:
        (r, _), vjp = jax.vjp(step, a_t, saved_t, c_prev, extras)
        da, dhw, dc_prev, d_ex = vjp((dr, dc_in))
    else:
        (r, _), vjp = jax.vjp(lambda z, c, ex: step(z, None, c, ex), saved_t, c_prev, extras)
        da, dc_prev, d_ex = vjp((dr, dc_in))
        dhw = da
    dh_in = matmul(dhw.astype(w_hh_t.dtype), w_hh_t, acc, precision)
    dh_prev = dh_in if rmask is None else dh_in * rmask.astype(acc)
    if dh_keep is not None:
        dh_prev = dh_prev + dh_keep
    if m_t is not None:
        dh_prev = jnp.where(valid, dh_prev, dh)
        dc_prev = jnp.where(valid, dc_prev, dc)
    d_extras = jax.tree_util.tree_map(jnp.add, d_extras, d_ex)
    proj = w_hr_t is not None
    return (dh_prev, dc_prev, d_extras), (
        da, dhw if layer_norm_h else None, r if proj else None, d_new if proj else None
    )


def _run_variant_forward(a, w_hh, w_hr, extras, rmask, h0, c0, mask, masks, opts, unroll,
                         precision):
    step = functools.partial(_variant_forward_step, w_hh, w_hr, extras, rmask, opts, precision)
    return jax.lax.scan(step, (h0, c0), (a, mask, masks), unroll=unroll)


def _run_variant_backward(w_hh, w_hr, extras, rmask, carry, dys, a, saved, c_prev, mask, masks,
                          opts, unroll, precision):
    w_hh_t, w_hr_t = _transposed(w_hh), _transposed(w_hr)

    def step(carry, inputs):
        return _variant_backward_step(w_hh_t, w_hr_t, rmask, opts, precision, carry, inputs[:4] + (
            extras,) + inputs[4:])

    return jax.lax.scan(step, carry, (dys, a, saved, c_prev, mask, masks), reverse=True,
                        unroll=unroll)


def _variant_weight_grads(w_hh, w_hr, rmask, h0, ys, dhw, r, d_new, acc, precision):
    """dW_hh and dW_hr as single products over all (t, b) of a span of steps."""
    h_prev = jnp.concatenate([h0[None], ys[:-1]], axis=0)
    if rmask is not None:
        h_prev = h_prev * rmask
    dw_hh = summed_outer(h_prev, dhw, acc, precision)
    dw_hr = None
    if w_hr is not None:
        dw_hr = summed_outer(r.astype(w_hr.dtype), d_new, acc, precision)
    return dw_hh, dw_hr


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def variant_recurrence(unroll, precision, opts, a, w_hh, w_hr, extras, h0, c0, mask, rmask, masks):
    """One layer of an LSTM variant over time: ``a: (T, B, G*H)`` -> ``(ys, (h_T, c_T))``.

    ``a`` holds the input pre-activations (input layer norm and bias applied), ``extras`` the
    :class:`CellExtras` (accumulation dtype), ``rmask: (B, H_out)`` the recurrent-dropout
    mask or None, ``masks`` the :class:`StepMasks` with a leading time axis, ``opts`` the
    static :class:`VariantOptions`. For long sequences see :func:`variant_remat_recurrence`.
    """
    (h, c), (ys, _, _) = _run_variant_forward(
        a, w_hh, w_hr, extras, rmask, h0, c0, mask, masks, opts, unroll, precision
    )
    return ys, (h, c)


def _variant_recurrence_fwd(unroll, precision, opts, a, w_hh, w_hr, extras, h0, c0, mask, rmask,
                            masks):
    (h, c), (ys, saved, c_prev) = _run_variant_forward(
        a, w_hh, w_hr, extras, rmask, h0, c0, mask, masks, opts, unroll, precision
    )
    return (ys, (h, c)), (w_hh, w_hr, extras, rmask, h0, c0, mask, masks, a, ys, saved, c_prev)


def _variant_recurrence_bwd(unroll, precision, opts, residuals, cotangents):
    w_hh, w_hr, extras, rmask, h0, c0, mask, masks, a, ys, saved, c_prev = residuals
    dys, (dh_T, dc_T) = cotangents
    acc = c0.dtype
    carry = (dh_T.astype(acc), dc_T.astype(acc), jax.tree_util.tree_map(jnp.zeros_like, extras))
    (dh0, dc0, d_extras), (da, dhw, r, d_new) = _run_variant_backward(
        w_hh, w_hr, extras, rmask, carry, dys, a, saved, c_prev, mask, masks, opts, unroll,
        precision,
    )
    dhw = da if dhw is None else dhw
    dw_hh, dw_hr = _variant_weight_grads(w_hh, w_hr, rmask, h0, ys, dhw, r, d_new, acc, precision)
    return (da, *_variant_loop_cotangents(dw_hh, dw_hr, d_extras, dh0, dc0, w_hh, w_hr, h0, c0,
                                          masks))


def _variant_loop_cotangents(dw_hh, dw_hr, d_extras, dh0, dc0, w_hh, w_hr, h0, c0, masks):
    """The cotangents of ``(w_hh, w_hr, extras, h0, c0, mask, rmask, masks)``, in their dtypes."""
    return (
        dw_hh.astype(w_hh.dtype),
        None if w_hr is None else dw_hr.astype(w_hr.dtype),
        d_extras,
        dh0.astype(h0.dtype),
        dc0.astype(c0.dtype),
        None,
        None,
        jax.tree_util.tree_map(lambda _: None, masks),
    )


variant_recurrence.defvjp(_variant_recurrence_fwd, _variant_recurrence_bwd)


def _time_chunks(a, n, chunk, steps):
    pad = n * chunk - steps
    a = jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1))
    return a.reshape((n, chunk) + a.shape[1:])


def _variant_chunked(x, mask, masks, chunk):
    """:func:`_chunked`, and the per-step masks split into the same chunks."""
    x_c, mask_c, steps = _chunked(x, mask, chunk)
    masks_c = jax.tree_util.tree_map(
        lambda v: _time_chunks(v, x_c.shape[0], chunk, steps), masks
    )
    return x_c, mask_c, masks_c, steps


def _variant_inputs(x, in_params, acc, precision):
    """The input pre-activations ``LN(x @ w_ih) + b`` of ``in_params = (w_ih, ln_x_scale, b)``."""
    w_ih, ln_x_scale, b = in_params
    return input_affine(matmul(x, w_ih, acc, precision), ln_x_scale, b, acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def variant_remat_recurrence(unroll, precision, chunk, opts, x, in_params, w_hh, w_hr, extras, h0,
                             c0, mask, rmask, masks):
    """:func:`variant_recurrence` with the input pre-activations inside, rematerialised by chunks.

    Takes the layer input ``x: (T, B, D)`` and ``in_params = (w_ih, ln_x_scale, b)`` (the
    last two may be None) rather than ``a``. As :func:`remat_recurrence`: the forward pass
    keeps the state entering each chunk of ``chunk`` steps; the backward pass recomputes each
    chunk's ``LN(x @ w_ih) + b`` and loop, differentiates the loop, then the input function
    (``jax.vjp``: ``dW_ih`` one product per chunk), summing the parameter gradients.
    """
    # As remat_recurrence: the forward rule's program, residuals dropped.
    return _variant_remat_fwd(unroll, precision, chunk, opts, x, in_params, w_hh, w_hr, extras,
                              h0, c0, mask, rmask, masks)[0]


def _variant_remat_fwd(unroll, precision, chunk, opts, x, in_params, w_hh, w_hr, extras, h0, c0,
                       mask, rmask, masks):
    acc = c0.dtype
    x_c, mask_c, masks_c, steps = _variant_chunked(x, mask, masks, chunk)

    def chunk_step(carry, inputs):
        x_k, m_k, masks_k = inputs
        a_k = _variant_inputs(x_k, in_params, acc, precision)
        new_carry, (ys_k, _, _) = _run_variant_forward(
            a_k, w_hh, w_hr, extras, rmask, *carry, m_k, masks_k, opts, unroll, precision
        )
        return new_carry, (ys_k, carry)

    (h, c), (ys_c, starts) = jax.lax.scan(chunk_step, (h0, c0), (x_c, mask_c, masks_c))
    ys = ys_c.reshape((-1,) + ys_c.shape[2:])[:steps]
    return (ys, (h, c)), (x, in_params, w_hh, w_hr, extras, rmask, h0, c0, mask, masks, starts)


def _variant_remat_bwd(unroll, precision, chunk, opts, residuals, cotangents):
    x, in_params, w_hh, w_hr, extras, rmask, h0, c0, mask, masks, starts = residuals
    dys, (dh_T, dc_T) = cotangents
    acc = c0.dtype
    x_c, mask_c, masks_c, steps = _variant_chunked(x, mask, masks, chunk)

    def inputs_of(x_k, params):
        return _variant_inputs(x_k, params, acc, precision)

    def chunk_step(carry, inputs):
        grads, sums = carry
        x_k, m_k, masks_k, dys_k, (h_k, c_k) = inputs
        a_k, inputs_vjp = jax.vjp(inputs_of, x_k, in_params)
        _, (ys_k, saved_k, c_prev_k) = _run_variant_forward(
            a_k, w_hh, w_hr, extras, rmask, h_k, c_k, m_k, masks_k, opts, unroll, precision
        )
        grads, (da_k, dhw_k, r_k, d_new_k) = _run_variant_backward(
            w_hh, w_hr, extras, rmask, grads, dys_k, a_k, saved_k, c_prev_k, m_k, masks_k,
            opts, unroll, precision,
        )
        dhw_k = da_k if dhw_k is None else dhw_k
        dw_hh_k, dw_hr_k = _variant_weight_grads(
            w_hh, w_hr, rmask, h_k, ys_k, dhw_k, r_k, d_new_k, acc, precision
        )
        dx_k, d_in_k = inputs_vjp(da_k.astype(a_k.dtype))
        sums = jax.tree_util.tree_map(lambda s, g: s + g.astype(acc), sums,
                                      (d_in_k, dw_hh_k, dw_hr_k))
        return (grads, sums), dx_k

    def zeros(v):
        return jnp.zeros(v.shape, acc)

    init = (
        (dh_T.astype(acc), dc_T.astype(acc), jax.tree_util.tree_map(jnp.zeros_like, extras)),
        jax.tree_util.tree_map(zeros, (in_params, w_hh, w_hr)),
    )
    ((dh0, dc0, d_extras), (d_in, dw_hh, dw_hr)), dx_c = jax.lax.scan(
        chunk_step, init,
        (x_c, mask_c, masks_c, _time_chunks(dys, x_c.shape[0], chunk, steps), starts),
        reverse=True,
    )

    return (
        dx_c.reshape((-1,) + dx_c.shape[2:])[:steps],
        jax.tree_util.tree_map(lambda g, like: g.astype(like.dtype), d_in, in_params),
        *_variant_loop_cotangents(dw_hh, dw_hr, d_extras, dh0, dc0, w_hh, w_hr, h0, c0, masks),
    )


variant_remat_recurrence.defvjp(_variant_remat_fwd, _variant_remat_bwd)


def variant_recurrence_autodiff(unroll, precision, opts, a, w_hh, w_hr, extras, h0, c0, mask, rmask,
                                masks):
    """The variant loop differentiated by JAX's own autodiff (a reference for tests)."""
    (h, c), (ys, _, _) = _run_variant_forward(
        a, w_hh, w_hr, extras, rmask, h0, c0, mask, masks, opts, unroll, precision
    )
    return ys, (h, c)
