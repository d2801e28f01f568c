"""The LSTM cell: one time step of one layer in one direction.

All the gate math of the library lives here; the time loop (``_recurrence``) and the
Flax modules call these functions rather than writing the equations again.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lstm_jax._params import LSTMCellParams, LSTMState

Array = jax.Array

# Added to the variance in layer normalisation (as torch.nn.LayerNorm and Flax's LayerNorm).
LN_EPS = 1e-5


def accumulation_dtype(dtype) -> jnp.dtype:
    """Dtype of matmul accumulation, gate pre-activations and the cell state.

    float32 for bfloat16/float16/float32 inputs (the cell state is never kept in half
    precision: it integrates over time), float64 for float64.
    """
    return jnp.promote_types(dtype, jnp.float32)


def matmul(a: Array, w: Array, acc_dtype, precision=None) -> Array:
    """``a @ w`` with the operands in their own dtype and the sum in ``acc_dtype``."""
    return jnp.matmul(a, w, precision=precision, preferred_element_type=acc_dtype)


def summed_outer(a: Array, g: Array, acc_dtype, precision=None) -> Array:
    """``sum over the leading axes of a^T g``: ``(..., K), (..., N) -> (K, N)`` (a weight gradient).

    Written as ``transpose(a) @ g`` over the flattened leading axes, with ``a`` (the narrow
    operand: an input or a hidden state) transposed. Given the contraction over ``(t, b)``
    itself, XLA:CPU transposed the wide ``(T, B, 4H)`` gradient instead, a copy that costs
    up to 20 ms at 32,100,128,256 when an elementwise producer is fused into it
    (``benchmarks/results/cpu-2core-amd-epyc.md``).
    """
    a2 = a.reshape(-1, a.shape[-1])
    g2 = g.reshape(-1, g.shape[-1]).astype(a.dtype)
    return jnp.matmul(jnp.transpose(a2), g2, precision=precision, preferred_element_type=acc_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def input_product(x: Array, w: Array, acc_dtype, precision=None) -> Array:
    """``x @ w`` for the hoisted input product, with ``dW = summed_outer(x, dy)`` in its gradient."""
    return matmul(x, w, acc_dtype, precision)


def _input_product_fwd(x, w, acc_dtype, precision):
    return matmul(x, w, acc_dtype, precision), (x, w)


def input_product_grads(x: Array, w: Array, dy: Array, acc_dtype, precision=None):
    """``(dx, dW)`` of ``y = x @ w`` for the cotangent ``dy``, both in ``acc_dtype``."""
    dx = matmul(dy.astype(w.dtype), jnp.transpose(w), acc_dtype, precision)
    return dx, summed_outer(x, dy, acc_dtype, precision)


def _input_product_bwd(acc_dtype, precision, residuals, dy):
    x, w = residuals
    dx, dw = input_product_grads(x, w, dy, acc_dtype, precision)
    return dx.astype(x.dtype), dw.astype(w.dtype)


input_product.defvjp(_input_product_fwd, _input_product_bwd)


def sigmoid(z: Array) -> Array:
    """The logistic function, written as ``0.5 * tanh(z / 2) + 0.5``.

    The same function as ``jax.nn.sigmoid`` (within a few float32 ulps); XLA:CPU compiles
    ``tanh`` to a vectorised polynomial but ``logistic`` to an exp and a division, and the
    tanh form lets all four gates share one elementwise pass (:func:`activate_gates`).
    """
    return 0.5 * jnp.tanh(0.5 * z) + 0.5


def _gate_scale(hidden: int, dtype) -> Array:
    """``k`` per column of the ``(4H,)`` gate row: 0.5 for i, f, o (sigmoid), 1 for g (tanh)."""
    half = jnp.full((hidden,), 0.5, dtype)
    return jnp.concatenate([half, half, jnp.ones((hidden,), dtype), half])


def activate_gates(z: Array) -> Array:
    """All four gate activations of ``z: (..., 4H)`` (order i, f, g, o) as one ``(..., 4H)`` array.

    One tanh over the whole row with a per-column scale ``k`` (0.5 for the sigmoid gates,
    1 for the tanh gate): ``act = k * tanh(k * z) + (1 - k)``, since
    ``sigmoid(z) = 0.5 * tanh(z / 2) + 0.5``. On CPU this is one contiguous vectorised pass
    instead of three logistic and one tanh over column slices (measured in
    ``benchmarks/results/cpu-2core-amd-epyc.md``: the forward step 10-35% faster).
    """
    k = _gate_scale(z.shape[-1] // 4, z.dtype)
    return k * jnp.tanh(k * z) + (1.0 - k)


def activated_gates_grad(gates: tuple[Array, Array, Array, Array]) -> tuple[Array, ...]:
    """``d act / d z`` of each gate of :func:`activate_gates`, from the activations themselves.

    ``gates = (i, f, g, o)``: ``a (1 - a)`` for the sigmoid gates, ``1 - a^2 = (1 - a)(a + 1)``
    for tanh; the factored forms keep full relative precision where ``a`` is near 0 or 1.
    """
    i, f, g, o = gates
    return (1.0 - i) * i, (1.0 - f) * f, (1.0 - g) * (g + 1.0), (1.0 - o) * o


def cell_update(z: Array, c: Array) -> tuple[Array, Array, Array]:
    """From pre-activations and the previous cell state to ``(c_t, o_t * tanh(c_t), acts)``.

    ``acts: (..., 4H)`` are the activated gates (what the backward pass needs).
    """
    acts = activate_gates(z)
    i, f, g, o = jnp.split(acts, 4, axis=-1)
    c_new = f * c + i * g
    return c_new, o * jnp.tanh(c_new), acts


def cell_update_grad(gates, c_prev: Array, dr: Array, dc: Array) -> tuple[Array, Array]:
    """The backward of :func:`cell_update`: from ``dr = dL/d(o tanh c_t)`` and ``dc = dL/dc_t``.

    ``gates``: the activated gates ``(i, f, g, o)``, each ``(..., H)`` (the backward scan
    reads them from the saved ``(T, B, 4H)`` activations one slice per gate).

    Recomputes ``tanh(c_t)`` from the saved activations and ``c_{t-1}`` (cheaper to store
    than c_t as well)::

        dc~  = dc + dr * o * (1 - tanh(c_t)^2)
        dz   = [dc~ * g, dc~ * c_{t-1}, dc~ * i, dr * tanh(c_t)] * d act / d z
        dc_{t-1} = dc~ * f

    Returns ``(dz: (..., 4H), dc_{t-1})``.
    """
    i, f, g, o = gates
    tanh_c = jnp.tanh(f * c_prev + i * g)
    dc_total = dc + dr * o * (1.0 - tanh_c * tanh_c)
    di, df, dg, do = activated_gates_grad(gates)
    dz = [(dc_total * g) * di, (dc_total * c_prev) * df, (dc_total * i) * dg, (dr * tanh_c) * do]
    return jnp.concatenate(dz, axis=-1), dc_total * f


def project(r: Array, w_hr: Array | None, dtype, acc_dtype, precision=None) -> Array:
    """The emitted hidden state: ``r`` itself, or ``r @ w_hr`` with a projection (Sak et al. 2014)."""
    r = r.astype(dtype)
    if w_hr is None:
        return r
    return matmul(r, w_hr, acc_dtype, precision).astype(dtype)


def _check_cell_inputs(cell_params, state, x) -> tuple[LSTMState, Array]:
    """lstm_cell's arguments, checked against the parameters' sizes: (LSTMState, x)."""
    if not isinstance(cell_params, LSTMCellParams):
        hint = (" (pass one layer and direction: params.layers[layer][direction])"
                if type(cell_params).__name__ == "LSTMParams" else "")
        raise ValueError(
            f"cell_params must be an LSTMCellParams, got {type(cell_params).__name__}{hint}"
        )
    if not (isinstance(state, tuple) and len(state) == 2):
        raise ValueError(f"state must be an LSTMState(h, c) or a pair (h, c), got "
                         f"{type(state).__name__}")
    h, c = (jnp.asarray(a) for a in state)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}")
    input_size, h_out = cell_params.input_size, cell_params.output_size
    hidden = cell_params.hidden_size
    for name, a, size, what in (("x", x, input_size, "input_size"),
                                ("state.h", h, h_out, "the output size (proj_size or H)"),
                                ("state.c", c, hidden, "hidden_size")):
        if a.ndim not in (1, 2) or a.shape[-1] != size:
            raise ValueError(f"{name} must have shape (B, {size}) or ({size},) ({what}), "
                             f"got {a.shape}")
    if not x.shape[:-1] == h.shape[:-1] == c.shape[:-1]:
        raise ValueError(f"x, state.h and state.c must share their batch shape, got "
                         f"{x.shape}, {h.shape}, {c.shape}")
    return LSTMState(h, c), x


def lstm_cell(
    cell_params: LSTMCellParams,
    state: LSTMState,
    x: Array,
    *,
    precision=None,
    cell_clip: float | None = None,
    zoneout_h: float = 0.0,
    zoneout_c: float = 0.0,
    recurrent_dropout: float = 0.0,
    candidate_dropout: float = 0.0,
    key: Array | None = None,
    recurrent_key: Array | None = None,
) -> tuple[LSTMState, Array]:
    """One LSTM step, with the ``lax.scan`` signature ``(carry, x) -> (carry, y)``.

    Gate order i, f, g, o (as torch.nn.LSTM); state order (h, c)::

        z = x @ w_ih + h @ w_hh + b                    # (B, 4H)
        i, f, g, o = sigmoid(z_i), sigmoid(z_f), tanh(z_g), sigmoid(z_o)
        c' = f * c + i * g
        h' = o * tanh(c')                              # then h' @ w_hr if projected

    Args:
      cell_params: :class:`LSTMCellParams` of one layer and direction.
      state: ``LSTMState(h: (B, H_out), c: (B, H))`` or a pair ``(h, c)``; unbatched
        ``(H_out,)``, ``(H,)`` works too.
      x: ``(B, input_size)`` or ``(input_size,)``.
      precision: optional ``jax.lax.Precision`` for the matrix products.
      cell_clip, zoneout_h, zoneout_c, recurrent_dropout, candidate_dropout: the call-time
        research variants, as in :func:`lstm_jax.lstm` (equations in :func:`variant_step`).
        Parameter-bearing variants (peephole, layer norm, CIFG) are read from ``cell_params``.
      key: PRNG key of this step's zoneout and candidate-dropout masks (pass a fresh one at
        every step); without it those variants run in evaluation mode (zoneout: its
        expectation; dropout: off).
      recurrent_key: PRNG key of the recurrent-dropout mask on ``h``. Gal & Ghahramani
        draw one mask per sequence: pass the *same* ``recurrent_key`` at every step of it.
        Without it recurrent dropout is off (evaluation).

    Returns:
      ``(LSTMState(h', c'), h')``. ``h'`` has the dtype of ``x``; ``c'`` is kept in
      :func:`accumulation_dtype` (float32 for bfloat16 inputs).

    Example:
      >>> p = init_lstm(jax.random.key(0), 3, 5).layers[0][0]
      >>> state = LSTMState(jnp.zeros((2, 5)), jnp.zeros((2, 5)))
      >>> state, h = lstm_cell(p, state, jnp.ones((2, 3)))
    """
    state, x = _check_cell_inputs(cell_params, state, x)
    opts = VariantOptions.create(
        cell_clip, zoneout_h, zoneout_c, recurrent_dropout, candidate_dropout
    )
    if opts.active or not cell_params.is_plain:
        if recurrent_dropout > 0.0 and key is not None and recurrent_key is None:
            raise ValueError(
                "recurrent_dropout in training needs recurrent_key: the same key at every step "
                "of a sequence (Gal & Ghahramani's one mask per sequence)"
            )
        return _variant_cell(cell_params, state, x, opts, key, recurrent_key, precision)
    dtype = x.dtype
    acc = accumulation_dtype(dtype)
    z = matmul(x, cell_params.w_ih.astype(dtype), acc, precision)
    z = z + matmul(state.h.astype(dtype), cell_params.w_hh.astype(dtype), acc, precision)
    if cell_params.b is not None:
        z = z + cell_params.b.astype(acc)
    c_new, r, _ = cell_update(z, state.c.astype(acc))
    w_hr = None if cell_params.w_hr is None else cell_params.w_hr.astype(dtype)
    h_new = project(r, w_hr, dtype, acc, precision)
    return LSTMState(h_new, c_new), h_new



# ----------------------------------------------------------------------------------------------
# Research variants
# ----------------------------------------------------------------------------------------------


def _check_rate(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


class VariantOptions(NamedTuple):
    """The call-time variants, static (hashable) so that they can select code under ``jit``.

    ``cell_clip`` None or > 0; rates in [0, 1). Whether masks are drawn (training) is told by
    the masks themselves: None means evaluation.
    """

    cell_clip: float | None = None
    zoneout_h: float = 0.0
    zoneout_c: float = 0.0
    recurrent_dropout: float = 0.0
    candidate_dropout: float = 0.0

    @classmethod
    def create(cls, cell_clip=None, zoneout_h=0.0, zoneout_c=0.0, recurrent_dropout=0.0,
               candidate_dropout=0.0) -> VariantOptions:
        """Validates the options (a ``ValueError`` naming the argument) and builds them."""
        if cell_clip is not None:
            if isinstance(cell_clip, bool) or not isinstance(cell_clip, (int, float)) or not (
                cell_clip > 0
            ):
                raise ValueError(f"cell_clip must be a positive number or None, got {cell_clip!r}")
            cell_clip = float(cell_clip)
        return cls(
            cell_clip,
            _check_rate("zoneout_h", zoneout_h),
            _check_rate("zoneout_c", zoneout_c),
            _check_rate("recurrent_dropout", recurrent_dropout),
            _check_rate("candidate_dropout", candidate_dropout),
        )

    @property
    def active(self) -> bool:
        return self.cell_clip is not None or any(self[1:])


class StepMasks(NamedTuple):
    """Per-step Bernoulli masks (bool, True = keep the new value), or None in evaluation.

    ``g``: keep mask of the candidate (Semeniuta dropout), ``(B, H)``;
    ``c``, ``h``: zoneout's update masks (True: take the new value), ``(B, H)``, ``(B, H_out)``.
    """

    g: Array | None = None
    c: Array | None = None
    h: Array | None = None


class CellExtras(NamedTuple):
    """The per-unit parameters the elementwise step reads (cast to the accumulation dtype)."""

    w_peep: Array | None = None
    ln_h_scale: Array | None = None
    ln_c_scale: Array | None = None
    ln_c_bias: Array | None = None

    @classmethod
    def of(cls, p: LSTMCellParams, acc) -> CellExtras:
        def cast(a):
            return None if a is None else a.astype(acc)

        return cls(cast(p.w_peep), cast(p.ln_h_scale), cast(p.ln_c_scale), cast(p.ln_c_bias))


def layer_norm(v: Array, scale: Array, bias: Array | None = None, eps: float = LN_EPS) -> Array:
    """Normalises the last axis to zero mean and unit variance, then ``* scale (+ bias)``."""
    mean = jnp.mean(v, axis=-1, keepdims=True)
    centred = v - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    out = centred * jax.lax.rsqrt(var + eps) * scale
    return out if bias is None else out + bias


def input_preactivations(xw: Array, p: LSTMCellParams, acc) -> Array:
    """``LN(x @ w_ih) + b`` (or ``x @ w_ih + b``): the part of ``z`` known before the loop."""
    return input_affine(xw, p.ln_x_scale, p.b, acc)


def input_affine(xw: Array, ln_x_scale: Array | None, b: Array | None, acc) -> Array:
    """:func:`input_preactivations` from the arrays: ``LN(xw; ln_x_scale) + b``, each optional."""
    a = xw if ln_x_scale is None else layer_norm(xw, ln_x_scale.astype(acc))
    return a if b is None else a + b.astype(acc)


def variant_step(
    a: Array,
    hw: Array | None,
    c: Array,
    extras: CellExtras,
    opts: VariantOptions,
    g_mask: Array | None = None,
    c_mask: Array | None = None,
) -> tuple[Array, Array]:
    """The elementwise part of one step of the LSTM variants: from pre-activations to ``(r, c_t)``.

    ``a`` holds the input pre-activations (after their layer norm, bias added), ``hw`` the
    recurrent ones ``(h_{t-1} * m) @ w_hh`` (None when ``a`` already holds the whole sum).
    With ``G`` gate blocks (4: i, f, g, o; 3 with CIFG: f, g, o)::

        z = a + LN(hw; ln_h_scale)            # Ba et al. 2016; a + hw without layer norm
        i = sigmoid(z_i + p_i * c_{t-1})      # peepholes p (Gers & Schmidhuber 2000)
        f = sigmoid(z_f + p_f * c_{t-1})
        i = 1 - f                             # CIFG instead (Greff et al. 2017)
        g = tanh(z_g) * d_g / (1 - p_g)       # candidate dropout (Semeniuta et al. 2016)
        c~ = clip(f * c_{t-1} + i * g, -cell_clip, cell_clip)
        o = sigmoid(z_o + p_o * c~)
        r = o * tanh(LN(c~; ln_c_scale, ln_c_bias))
        c_t = d_c * c~ + (1 - d_c) * c_{t-1}  # zoneout (Krueger et al. 2017), d_c ~ B(1 - z_c)

    In evaluation (masks None) dropout is off and zoneout takes its expectation,
    ``c_t = (1 - z_c) * c~ + z_c * c_{t-1}``. The caller projects ``r`` and applies zoneout to
    ``h`` (it needs ``h_{t-1}``, after the projection). Matrix products are not in here, so
    the backward pass differentiates this function step by step and still computes the
    weight gradients as single products over all steps.

    Returns:
      ``(r, c_t)``: ``r: (B, H)`` the unprojected output, ``c_t: (B, H)`` the new cell state.
    """
    hidden = c.shape[-1]
    if hw is None:
        z = a
    else:
        z = a + (hw if extras.ln_h_scale is None else layer_norm(hw, extras.ln_h_scale))
    gates = z.shape[-1] // hidden
    if gates == 4:
        zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
    else:
        zf, zg, zo = jnp.split(z, 3, axis=-1)
    p = extras.w_peep
    if p is not None:
        if gates == 4:
            zi = zi + p[0] * c
        zf = zf + p[-2] * c
    f = sigmoid(zf)
    i = sigmoid(zi) if gates == 4 else 1.0 - f
    g = jnp.tanh(zg)
    if g_mask is not None:
        g = jnp.where(g_mask, g / (1.0 - opts.candidate_dropout), jnp.zeros_like(g))
    c_new = f * c + i * g
    if opts.cell_clip is not None:
        c_new = jnp.clip(c_new, -opts.cell_clip, opts.cell_clip)
    if p is not None:
        zo = zo + p[-1] * c_new
    o = sigmoid(zo)
    c_out = c_new
    if extras.ln_c_scale is not None:
        c_out = layer_norm(c_new, extras.ln_c_scale, extras.ln_c_bias)
    r = o * jnp.tanh(c_out)
    return r, zoneout(c, c_new, c_mask, opts.zoneout_c)


def zoneout(prev: Array, new: Array, update_mask: Array | None, rate: float) -> Array:
    """Zoneout (Krueger et al. 2017): keep each unit's previous value with probability ``rate``.

    Training (``update_mask`` drawn ~ Bernoulli(1 - rate)): ``where(mask, new, prev)``.
    Evaluation (mask None): the expectation ``prev + (1 - rate) * (new - prev)``.
    """
    if update_mask is not None:
        return jnp.where(update_mask, new, prev)
    if rate == 0.0:
        return new
    return prev + (1.0 - rate) * (new - prev)


def zoneout_grad(
    d_out: Array, update_mask: Array | None, rate: float
) -> tuple[Array, Array | None]:
    """Splits the gradient of :func:`zoneout`'s output into ``(d_new, d_prev)`` (None: zero)."""
    if update_mask is not None:
        zero = jnp.zeros_like(d_out)
        return jnp.where(update_mask, d_out, zero), jnp.where(update_mask, zero, d_out)
    if rate == 0.0:
        return d_out, None
    return (1.0 - rate) * d_out, rate * d_out


def _uniform(key: Array, shape) -> Array:
    """U[0, 1) of ``shape``, drawn flat: XLA on CPU compiles a multi-dimensional threefry draw
    several times slower than a flat one, and one draw serves all the masks of a layer."""
    return jax.random.uniform(key, (math.prod(shape),)).reshape(shape)


def recurrent_mask(key: Array, rate: float, shape, dtype) -> Array:
    """Gal & Ghahramani's dropout mask on ``h_{t-1}``, scaled by ``1 / (1 - rate)``."""
    keep = _uniform(key, tuple(shape)) < 1.0 - rate
    return jnp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(dtype)


def draw_step_masks(key: Array | None, opts: VariantOptions, lead, hidden, out) -> StepMasks:
    """Draws the per-step masks of shape ``lead + (hidden,)`` (``out`` for h); None without key."""
    if key is None:
        return StepMasks()
    lead = tuple(lead)
    sizes = {"g": (opts.candidate_dropout, hidden), "c": (opts.zoneout_c, hidden),
             "h": (opts.zoneout_h, out)}
    sizes = {name: rs for name, rs in sizes.items() if rs[0] > 0.0}
    if not sizes:
        return StepMasks()
    u = _uniform(key, lead + (sum(size for _, size in sizes.values()),))
    masks, start = {}, 0
    for name, (rate, size) in sizes.items():
        masks[name] = u[..., start : start + size] < 1.0 - rate
        start += size
    return StepMasks(**masks)


def _variant_cell(p, state, x, opts, key, recurrent_key, precision):
    """:func:`lstm_cell` for parameters or options of the research variants."""
    dtype = x.dtype
    acc = accumulation_dtype(dtype)
    h = state.h.astype(dtype)
    c = state.c.astype(acc)
    a = input_preactivations(matmul(x, p.w_ih.astype(dtype), acc, precision), p, acc)
    h_in = h
    if opts.recurrent_dropout > 0.0 and recurrent_key is not None:
        h_in = h * recurrent_mask(recurrent_key, opts.recurrent_dropout, h.shape, dtype)
    hw = matmul(h_in, p.w_hh.astype(dtype), acc, precision)
    masks = draw_step_masks(key, opts, c.shape[:-1], c.shape[-1], h.shape[-1])
    r, c_new = variant_step(a, hw, c, CellExtras.of(p, acc), opts, masks.g, masks.c)
    w_hr = None if p.w_hr is None else p.w_hr.astype(dtype)
    h_new = project(r, w_hr, dtype, acc, precision)
    h_new = zoneout(h.astype(acc), h_new.astype(acc), masks.h, opts.zoneout_h).astype(dtype)
    return LSTMState(h_new, c_new), h_new
