"""A persistent LSTM recurrence in Pallas (Triton lowering on GPU).

The time loop of one layer runs *inside* one kernel (Diamos et al. 2016, "Persistent RNNs"):
each program owns a tile of ``block_b`` batch rows and the whole recurrent weight, keeps
``h`` and ``c`` in registers, fuses the gate math, and walks all T steps without returning
to the host. A ``lax.scan`` pays a kernel launch and loop bookkeeping per step (~20 us on an
H100); here a step costs one small matrix product plus the elementwise work.

Same contract as :func:`lstm_jax._recurrence.recurrence` (gate order i, f, g, o; masked
steps carry the state unchanged and output zero) and the same backward design: the
backward kernel walks time in reverse carrying only ``(dh, dc)`` and emits ``dz_t``; the
weight gradient is then one large product over all steps outside the kernel, and the
gradient of ``xw`` is ``dz`` itself.

Layout inside the kernels. Every array a Triton kernel touches must have a power-of-two
number of elements and ``tl.dot`` needs every dimension >= 16, so the wrapper pads the
batch to a multiple of ``block_b`` (>= 16 for the tensor-core products; any power of two for
``product="fma"``, which uses no ``tl.dot``) and each gate block of the hidden size to
``hp = next_power_of_2(max(H, 16))``. Padded hidden units stay exactly zero (their
pre-activations are 0, so c stays 0 and h = sigmoid(0) * tanh(0) = 0) and padded batch
rows are masked, so padding never changes the numbers. The four gates use four separate
products (``h @ W_gate``) so the kernel never slices a register tensor.

On-chip budget: ``W_hh`` is loaded once before the loop; for tensor-core products Triton
keeps it in shared memory and feeds each step's products from there (``product="fma"``
keeps it in registers instead, up to H = 64: :func:`fma_fits`). It takes ``hp * 4hp * itemsize`` bytes: 64 KiB
at H = 64 in float32, 128 KiB at H = 128 in bfloat16, 256 KiB at H = 128 in float32. An
H100 SM has at most 227 KiB of shared memory per block, so the kernel accepts W_hh up to
:data:`MAX_WEIGHT_BYTES` (float32 H <= 64, bfloat16 H <= 128); :func:`fits_on_chip` says so.
(Compiled for sm_90 with Triton 3.9: H=64 float32 uses 68 KiB of shared memory and 120
registers per thread forward, 100 backward, no spills; H=128 bfloat16 132 KiB forward.)

References: Diamos et al. 2016 (persistent RNNs); Appleyard et al. 2016 (cuDNN's RNN
optimisations); Hochreiter & Schmidhuber 1997.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Array = jax.Array

# Largest (padded) W_hh one program keeps in shared memory for the whole loop: under the
# H100's 227 KiB per block with room for the layout conversions of the step's tiles.
MAX_WEIGHT_BYTES = 160 * 1024
MIN_TILE = 16  # tl.dot needs M, N, K >= 16


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def padded_hidden(hidden: int) -> int:
    """Hidden size as the kernel sees it: a power of two, at least 16."""
    return _next_pow2(max(hidden, MIN_TILE))


def recurrent_weight_bytes(hidden: int, dtype=jnp.float32) -> int:
    """Bytes of the (padded) recurrent weight one program keeps on chip."""
    hp = padded_hidden(hidden)
    return hp * 4 * hp * jnp.dtype(dtype).itemsize


def fits_on_chip(hidden: int, dtype=jnp.float32) -> bool:
    """Whether W_hh stays in one program's shared memory for the whole time loop."""
    return recurrent_weight_bytes(hidden, dtype) <= MAX_WEIGHT_BYTES


# fma products keep the whole (padded) W_hh in registers: at most this many elements, i.e.
# 64 per thread at 8 warps (H <= 64). Larger weights would spill.
FMA_MAX_WEIGHT_ELEMENTS = 64 * 4 * 64
PRODUCTS = ("mma", "fma")


def fma_fits(hidden: int) -> bool:
    """Whether the fma products (W_hh in registers) apply at this hidden size."""
    hp = padded_hidden(hidden)
    return hp * 4 * hp <= FMA_MAX_WEIGHT_ELEMENTS


def default_num_warps(hidden: int) -> int:
    return 4 if padded_hidden(hidden) <= 32 else 8


def _compiler_params(num_warps: int, num_stages: int):
    """Triton compiler parameters under their name in this JAX version.

    Without them JAX >= 0.10 lowers Pallas GPU kernels with Mosaic GPU, not Triton.
    """
    with warnings.catch_warnings():
        # JAX 0.11 deprecates the Triton backend; importing it must not fail a test run.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from jax.experimental.pallas import triton as pltriton
        except ImportError:  # pragma: no cover - very old or very new JAX
            pltriton = None
    for owner, name in ((pltriton, "CompilerParams"), (pltriton, "TritonCompilerParams"),
                        (pl, "TritonCompilerParams")):
        cls = getattr(owner, name, None) if owner is not None else None
        if cls is not None:
            return cls(num_warps=num_warps, num_stages=num_stages)
    raise RuntimeError(
        "this JAX has no Pallas Triton backend (jax.experimental.pallas.triton.CompilerParams);"
        ' use backend="scan" or "cudnn"'
    )


# ----------------------------------------------------------------------------- kernels


def _gate(ref, t, g, hp):
    """Gate block g of time step t of a (T, Bt, 4*hp) ref: a (Bt, hp) tile."""
    return ref[t, :, pl.ds(g * hp, hp)]


def _rows_times(a, w, fma, precision):
    """``a @ w`` for a ``(rows, K)`` tile and a ``(K, N)`` block, summed in float32.

    ``fma``: a broadcast multiply and a sum over K, for tiles of very few rows. No tensor-core
    product (which needs 16 rows, so one sequence pays for 16), and ``w`` is used only by
    elementwise code, which lets Triton keep it in registers across the time loop instead of
    re-reading it from shared memory at each step.
    """
    f32 = jnp.float32
    if fma:
        return jnp.sum(a.astype(f32)[:, :, None] * w.astype(f32)[None, :, :], axis=1)
    return jnp.dot(a.astype(w.dtype), w, precision=precision, preferred_element_type=f32)


def _forward_kernel(xw_ref, m_ref, w_ref, h0_ref, c0_ref, *out_refs,
                    steps, hp, precision, save, fma):
    if save:
        ys_ref, h_ref, c_ref, acts_ref, cprev_ref = out_refs
    else:
        ys_ref, h_ref, c_ref = out_refs
    f32 = jnp.float32

    def load_step(t):
        return tuple(_gate(xw_ref, t, g, hp).astype(f32) for g in range(4)), m_ref[t, :]

    # Loaded once: W_hh stays on chip for all T steps (Triton keeps it in shared memory for
    # tensor-core products, in registers for fma).
    w = [w_ref[:, pl.ds(g * hp, hp)] for g in range(4)]

    def body(t, carry):
        h, c, (xs, m) = carry
        # Prefetch the next step's inputs: their latency hides behind this step's work.
        nxt = load_step(jnp.minimum(t + 1, steps - 1))
        hw = h.astype(w[0].dtype)
        z = [xs[g] + _rows_times(hw, w[g], fma, precision) for g in range(4)]
        i, f, o = jax.nn.sigmoid(z[0]), jax.nn.sigmoid(z[1]), jax.nn.sigmoid(z[3])
        g = jnp.tanh(z[2])
        c_new = f * c + i * g
        h_new = (o * jnp.tanh(c_new)).astype(h.dtype)
        valid = (m > 0.5)[:, None]
        if save:
            for k, a in enumerate((i, f, g, o)):
                acts_ref[t, :, pl.ds(k * hp, hp)] = a
            cprev_ref[t] = c
        ys_ref[t] = jnp.where(valid, h_new, jnp.zeros_like(h_new)).astype(ys_ref.dtype)
        # Past a sequence's end the state is carried unchanged.
        return jnp.where(valid, h_new, h), jnp.where(valid, c_new, c), nxt

    init = (h0_ref[...], c0_ref[...].astype(f32), load_step(0))
    h, c, _ = jax.lax.fori_loop(0, steps, body, init)
    h_ref[...] = h.astype(h_ref.dtype)
    c_ref[...] = c.astype(c_ref.dtype)


def _backward_kernel(dys_ref, acts_ref, cprev_ref, m_ref, wt_ref, dh_ref, dc_ref,
                     dz_ref, dh0_ref, dc0_ref, *, steps, hp, precision, fma):
    f32 = jnp.float32

    def load_step(t):
        acts = tuple(_gate(acts_ref, t, k, hp).astype(f32) for k in range(4))
        return acts, cprev_ref[t].astype(f32), dys_ref[t].astype(f32), m_ref[t, :]

    # wt_ref is W_hh^T: (4*hp, hp_out); its gate block k is (hp, hp_out). Loaded once.
    wt = [wt_ref[pl.ds(k * hp, hp), :] for k in range(4)]

    def body(s, carry):
        t = steps - 1 - s
        dh, dc, ((i, f, g, o), c_prev, dy, m) = carry
        nxt = load_step(jnp.maximum(t - 1, 0))
        dh_total = dh + dy
        tanh_c = jnp.tanh(f * c_prev + i * g)
        dc_total = dc + dh_total * o * (1.0 - tanh_c * tanh_c)
        valid = (m > 0.5)[:, None]
        dz = [
            dc_total * g * i * (1.0 - i),
            dc_total * c_prev * f * (1.0 - f),
            dc_total * i * (1.0 - g * g),
            dh_total * tanh_c * o * (1.0 - o),
        ]
        dz = [jnp.where(valid, d, jnp.zeros_like(d)) for d in dz]
        for k in range(4):
            dz_ref[t, :, pl.ds(k * hp, hp)] = dz[k].astype(dz_ref.dtype)
        dh_prev = _rows_times(dz[0].astype(wt[0].dtype), wt[0], fma, precision)
        for k in range(1, 4):
            dh_prev = dh_prev + _rows_times(dz[k].astype(wt[k].dtype), wt[k], fma, precision)
        dc_prev = dc_total * f
        return jnp.where(valid, dh_prev, dh), jnp.where(valid, dc_prev, dc), nxt

    init = (dh_ref[...].astype(f32), dc_ref[...].astype(f32), load_step(steps - 1))
    dh, dc, _ = jax.lax.fori_loop(0, steps, body, init)
    dh0_ref[...] = dh.astype(dh0_ref.dtype)
    dc0_ref[...] = dc.astype(dc0_ref.dtype)


# ----------------------------------------------------------------------------- padding


def _pad_gates(a: Array, hidden: int, hp: int) -> Array:
    """Pads each of the four gate blocks of the last axis from ``hidden`` to ``hp``."""
    if hp == hidden:
        return a
    a = a.reshape(a.shape[:-1] + (4, hidden))
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, hp - hidden)])
    return a.reshape(a.shape[:-2] + (4 * hp,))


def _unpad_gates(a: Array, hidden: int, hp: int) -> Array:
    if hp == hidden:
        return a
    a = a.reshape(a.shape[:-1] + (4, hp))[..., :hidden]
    return a.reshape(a.shape[:-2] + (4 * hidden,))


def _pad(a: Array, widths) -> Array:
    if all(w == 0 for w in widths):
        return a
    return jnp.pad(a, [(0, w) for w in widths])


def _geometry(xw, w_hh, block_b):
    steps, batch, four_h = xw.shape
    hidden = four_h // 4
    hp = padded_hidden(hidden)
    bp = -(-batch // block_b) * block_b
    return steps, batch, hidden, hp, bp


def _float_mask(mask, steps, batch, bp):
    m = jnp.ones((steps, batch), jnp.float32) if mask is None else mask.astype(jnp.float32)
    return _pad(m, (0, bp - batch))


def _run_forward(config, xw, w_hh, h0, c0, mask, save):
    interpret, precision, block_b, num_warps, fma = config
    steps, batch, hidden, hp, bp = _geometry(xw, w_hh, block_b)
    f32 = jnp.float32
    xw_p = _pad(_pad_gates(xw, hidden, hp), (0, bp - batch, 0))
    w_p = _pad(_pad_gates(w_hh, hidden, hp), (hp - hidden, 0))
    h0_p = _pad(h0, (bp - batch, hp - hidden))
    c0_p = _pad(c0, (bp - batch, hp - hidden))
    m_p = _float_mask(mask, steps, batch, bp)
    nw = num_warps or default_num_warps(hidden)

    seq = lambda last: pl.BlockSpec((steps, block_b, last), lambda b: (0, b, 0))
    state = pl.BlockSpec((block_b, hp), lambda b: (b, 0))
    out_shape = [
        jax.ShapeDtypeStruct((steps, bp, hp), h0.dtype),
        jax.ShapeDtypeStruct((bp, hp), h0.dtype),
        jax.ShapeDtypeStruct((bp, hp), c0.dtype),
    ]
    out_specs = [seq(hp), state, state]
    if save:
        out_shape += [jax.ShapeDtypeStruct((steps, bp, 4 * hp), f32),
                      jax.ShapeDtypeStruct((steps, bp, hp), f32)]
        out_specs += [seq(4 * hp), seq(hp)]
    kernel = functools.partial(_forward_kernel, steps=steps, hp=hp, precision=precision,
                               save=save, fma=fma)
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(bp // block_b,),
        in_specs=[
            seq(4 * hp),
            pl.BlockSpec((steps, block_b), lambda b: (0, b)),
            pl.BlockSpec((hp, 4 * hp), lambda b: (0, 0)),
            state,
            state,
        ],
        out_specs=out_specs,
        compiler_params=_compiler_params(nw, 1),
        interpret=interpret,
        name="lstm_forward",
    )(xw_p, m_p, w_p, h0_p, c0_p)
    ys_p, h_p, c_p = outs[:3]
    ys = ys_p[:, :batch, :hidden]
    result = (ys, (h_p[:batch, :hidden], c_p[:batch, :hidden]))
    if not save:
        return result, None
    return result, (outs[3], outs[4], m_p)


def _run_backward(config, w_hh, acts_p, cprev_p, m_p, dys, dh_T, dc_T):
    interpret, precision, block_b, num_warps, fma = config
    steps, bp, four_hp = acts_p.shape
    hp = four_hp // 4
    batch, hidden = dh_T.shape
    f32 = jnp.float32
    # W_hh^T with gate blocks as rows: (4*hp, hp), so dh_prev = sum_k dz_k @ wt_k.
    wt_p = _pad(_pad_gates(w_hh, hidden, hp), (hp - hidden, 0)).T
    dys_p = _pad(dys.astype(f32), (0, bp - batch, hp - hidden))
    dh_p = _pad(dh_T.astype(f32), (bp - batch, hp - hidden))
    dc_p = _pad(dc_T.astype(f32), (bp - batch, hp - hidden))
    nw = num_warps or default_num_warps(hidden)

    seq = lambda last: pl.BlockSpec((steps, block_b, last), lambda b: (0, b, 0))
    state = pl.BlockSpec((block_b, hp), lambda b: (b, 0))
    kernel = functools.partial(_backward_kernel, steps=steps, hp=hp, precision=precision,
                               fma=fma)
    dz_p, dh0_p, dc0_p = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((steps, bp, 4 * hp), f32),
            jax.ShapeDtypeStruct((bp, hp), f32),
            jax.ShapeDtypeStruct((bp, hp), f32),
        ],
        grid=(bp // block_b,),
        in_specs=[
            seq(hp),
            seq(4 * hp),
            seq(hp),
            pl.BlockSpec((steps, block_b), lambda b: (0, b)),
            pl.BlockSpec(wt_p.shape, lambda b: (0, 0)),
            state,
            state,
        ],
        out_specs=[seq(4 * hp), state, state],
        compiler_params=_compiler_params(nw, 1),
        interpret=interpret,
        name="lstm_backward",
    )(dys_p, acts_p, cprev_p, m_p, wt_p, dh_p, dc_p)
    dz = _unpad_gates(dz_p[:, :batch], hidden, hp)
    return dz, dh0_p[:batch, :hidden], dc0_p[:batch, :hidden]


# ----------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pallas_core(config, xw, w_hh, h0, c0, mask):
    result, _ = _run_forward(config, xw, w_hh, h0, c0, mask, save=False)
    return result


def _pallas_core_fwd(config, xw, w_hh, h0, c0, mask):
    (ys, (h, c)), (acts_p, cprev_p, m_p) = _run_forward(config, xw, w_hh, h0, c0, mask, save=True)
    return (ys, (h, c)), (w_hh, h0, c0, ys, acts_p, cprev_p, m_p)


def _pallas_core_bwd(config, residuals, cotangents):
    w_hh, h0, c0, ys, acts_p, cprev_p, m_p = residuals
    dys, (dh_T, dc_T) = cotangents
    dz, dh0, dc0 = _run_backward(config, w_hh, acts_p, cprev_p, m_p, dys, dh_T, dc_T)
    # One product over all (t, b): h_{t-1} is y_{t-1}, valid wherever dz is non-zero
    # (masked steps have dz = 0), exactly as the scan backend does it.
    h_prev = jnp.concatenate([h0[None], ys[:-1]], axis=0)
    dw_hh = jnp.einsum("tbk,tbg->kg", h_prev, dz.astype(h_prev.dtype), precision=config[1],
                       preferred_element_type=jnp.float32)
    return (
        dz.astype(c0.dtype),  # xw has the accumulation dtype, as c0
        dw_hh.astype(w_hh.dtype),
        dh0.astype(h0.dtype),
        dc0.astype(c0.dtype),
        None,
    )


_pallas_core.defvjp(_pallas_core_fwd, _pallas_core_bwd)


def pallas_recurrence(
    xw: Array,
    w_hh: Array,
    w_hr: Array | None,
    h0: Array,
    c0: Array,
    mask: Array | None,
    b: Array | None = None,
    *,
    interpret: bool = False,
    precision=None,
    block_b: int | None = None,
    num_warps: int | None = None,
    product: str = "mma",
) -> tuple[Array, tuple[Array, Array]]:
    """One LSTM layer over time in one Pallas kernel: ``xw: (T, B, 4H)`` -> ``(ys, (h_T, c_T))``.

    A drop-in for :func:`lstm_jax._recurrence.recurrence` (same arguments after its static
    ones, same results and gradients within float tolerance)::

        h, c = h0, c0
        for t in range(T):                       # inside the kernel
            z = xw[t] + h @ w_hh                 # gate order i, f, g, o
            c, h = f * c + i * g, o * tanh(f * c + i * g)   # carried only where mask[t]
            ys[t] = h if mask[t] else 0

    Args:
      xw: ``(T, B, 4H)`` input pre-activations ``x @ w_ih + b`` (float32).
      w_hh: ``(H, 4H)`` recurrent weight (float32 or bfloat16; see :func:`fits_on_chip`).
      w_hr: must be None: the kernel has no projection (``proj_size``) support.
      h0: ``(B, H)`` initial hidden state (dtype of the products).
      c0: ``(B, H)`` initial cell state (float32).
      mask: ``(T, B)`` bool or None; False steps keep the state and output zero.
      b: ``(4H,)`` bias added to ``xw`` (float32), or None.
      interpret: run the kernel with Pallas' interpreter (any platform; slow, for tests).
      precision: ``jax.lax.Precision`` of the in-kernel tensor-core products (``"highest"``
        avoids TF32); fma products are always exact float32 sums.
      block_b: batch rows per program, a power of two (>= 16 for ``"mma"``); B is padded up
        to a multiple. None: 16 for ``"mma"``, 1 for ``"fma"`` (one sequence per program).
      num_warps: Triton warps per program; None picks by hidden size.
      product: how the per-step products run. ``"mma"``: tensor-core products on tiles of 16
        rows, W_hh in shared memory. ``"fma"``: a broadcast multiply and sum per row, with
        W_hh held in registers (padded hidden size <= 64, :func:`fma_fits`): no padding of
        a single sequence to 16 rows and no shared-memory read of W_hh at each step, for
        the latency-bound batch-1 case. Its per-step intermediates grow with ``block_b``:
        keep it small (1-4) or the kernel spills registers.

    Returns:
      ``(ys: (T, B, H), (h_T: (B, H), c_T: (B, H)))``.
    """
    if w_hr is not None:
        raise NotImplementedError(
            'the Pallas LSTM kernel has no projection (proj_size) support; use backend="scan"'
        )
    if xw.ndim != 3 or xw.shape[-1] % 4:
        raise ValueError(f"xw must have shape (T, B, 4H), got {xw.shape}")
    steps, _, four_h = xw.shape
    hidden = four_h // 4
    if w_hh.shape != (hidden, four_h):
        raise ValueError(f"w_hh has shape {w_hh.shape}, expected {(hidden, four_h)}")
    if steps < 1:
        raise ValueError("the Pallas LSTM kernel needs at least one time step")
    if not interpret and not fits_on_chip(hidden, w_hh.dtype):
        raise ValueError(
            f"W_hh of hidden size {hidden} in {jnp.dtype(w_hh.dtype)} takes "
            f"{recurrent_weight_bytes(hidden, w_hh.dtype) // 1024} KiB, above the Pallas kernel's "
            f"on-chip limit of {MAX_WEIGHT_BYTES // 1024} KiB (float32 H <= 64, bfloat16 "
            'H <= 128); use backend="scan" or "cudnn"'
        )
    if product not in PRODUCTS:
        raise ValueError(f"product must be one of {PRODUCTS}, got {product!r}")
    fma = product == "fma"
    if fma and not fma_fits(hidden):
        raise ValueError(
            f'product="fma" keeps W_hh in registers and applies up to hidden size 64, got '
            f'{hidden}; use product="mma"'
        )
    smallest = 1 if fma else MIN_TILE
    if block_b is None:
        block_b = smallest
    if block_b < smallest or block_b & (block_b - 1):
        raise ValueError(
            f'block_b must be a power of two >= {smallest} for product="{product}", got {block_b}'
        )
    # Static, hashable kernel settings.
    config = (bool(interpret), precision, int(block_b), num_warps, fma)
    if b is not None:
        xw = xw + b
    return _pallas_core(config, xw, w_hh, h0, c0, mask)
