"""The full LSTM: layers stacked, both directions, variable lengths, inter-layer dropout."""

from __future__ import annotations

import functools

import jax
import numpy as np
import jax.numpy as jnp

from lstm_jax._cell import (
    CellExtras,
    VariantOptions,
    accumulation_dtype,
    draw_step_masks,
    input_preactivations,
    input_product,
    matmul,
    recurrent_mask,
)
from lstm_jax._params import LSTMParams, LSTMState
from lstm_jax.kernels import (
    choose_backend,
    cpu_layer,
    cpu_remat_layer,
    cudnn_lstm,
    kernel_remat_chunk,
    pallas_product,
    pallas_recurrence,
)
from lstm_jax._recurrence import (
    recurrence,
    recurrence_autodiff,
    remat_chunk,
    remat_recurrence,
    variant_recurrence,
    variant_recurrence_autodiff,
    variant_remat_recurrence,
)

Array = jax.Array

# Loop unrolling per backend. Each scan iteration costs a fixed dispatch overhead (about
# 20 us on an H100); unrolling amortises it at the price of compile time. Chosen from
# scripts/bench.py measurements (benchmarks/results/).
DEFAULT_UNROLL = {"cpu": 1, "gpu": 8, "cuda": 8, "rocm": 8, "tpu": 8}


def default_unroll() -> int:
    """The ``unroll`` used when :func:`lstm` is called with ``unroll=None``."""
    return DEFAULT_UNROLL.get(jax.default_backend(), 1)


def _shape_error(name: str, expected, given) -> ValueError:
    return ValueError(f"{name} has shape {tuple(given)}, expected {tuple(expected)}")


def _validate_state(initial_state, expected_h, expected_c):
    if not (isinstance(initial_state, tuple) and len(initial_state) == 2):
        raise ValueError(
            "initial_state must be an LSTMState(h, c) (or a pair (h, c)), "
            f"got {type(initial_state).__name__}"
        )
    h0, c0 = initial_state
    if tuple(jnp.shape(h0)) != expected_h:
        raise _shape_error("initial_state.h", expected_h, jnp.shape(h0))
    if tuple(jnp.shape(c0)) != expected_c:
        raise _shape_error("initial_state.c", expected_c, jnp.shape(c0))
    return jnp.asarray(h0), jnp.asarray(c0)


def _check_length_range(seq_lengths: Array, steps: int) -> None:
    """Raise if concrete ``seq_lengths`` leave ``[0, steps]`` (traced ones are clipped later)."""
    if isinstance(seq_lengths, jax.core.Tracer):
        return
    values = np.asarray(seq_lengths)
    bad = values[(values < 0) | (values > steps)]
    if bad.size:
        raise ValueError(
            f"seq_lengths must lie in [0, T={steps}] (T: the time axis of x), got {bad.tolist()}"
        )


def _reverse_index(steps: int, seq_lengths: Array | None) -> Array | None:
    """Per-sequence time reversal: step t reads step len-1-t while t < len, else itself."""
    if seq_lengths is None:
        return None
    t = jnp.arange(steps)[:, None]
    return jnp.where(t < seq_lengths[None, :], seq_lengths[None, :] - 1 - t, t)


def _time_reverse(a: Array, index: Array | None) -> Array:
    if index is None:
        return jnp.flip(a, axis=0)
    return jnp.take_along_axis(a, index.reshape(index.shape + (1,) * (a.ndim - 2)), axis=0)


def _between_layers(ys, layer, num_layers, dropout, key, dtype):
    """Inter-layer dropout (as torch: every layer's output but the last, only with a key)."""
    if dropout > 0.0 and key is not None and layer < num_layers - 1:
        keep = jax.random.bernoulli(jax.random.fold_in(key, layer), 1.0 - dropout, ys.shape)
        ys = jnp.where(keep, ys / (1.0 - dropout), jnp.zeros_like(ys)).astype(dtype)
    return ys


def _finish(y, h_n, c_n, out_dtype, unbatched, batch_first):
    """Time-major results to the caller's layout and dtype."""
    # c stays in the accumulation dtype (float32 for half-precision x), as lstm_cell returns
    # it: a state carried from one call to the next is then not rounded at every boundary.
    y, h_n = y.astype(out_dtype), h_n.astype(out_dtype)
    c_n = c_n.astype(accumulation_dtype(out_dtype))
    if unbatched:
        return y[:, 0], LSTMState(h_n[:, 0], c_n[:, 0])
    if batch_first:
        y = jnp.swapaxes(y, 0, 1)
    return y, LSTMState(h_n, c_n)


def lstm(
    params: LSTMParams,
    x: Array,
    initial_state: LSTMState | None = None,
    *,
    seq_lengths: Array | None = None,
    batch_first: bool = True,
    dropout: float = 0.0,
    key: Array | None = None,
    unroll: int | None = None,
    compute_dtype=None,
    precision=None,
    remat: bool = False,
    custom_grad: bool = True,
    cell_clip: float | None = None,
    zoneout_h: float = 0.0,
    zoneout_c: float = 0.0,
    recurrent_dropout: float = 0.0,
    candidate_dropout: float = 0.0,
    backend: str = "auto",
) -> tuple[Array, LSTMState]:
    """Runs a stacked, optionally bidirectional LSTM over a batch of sequences.

    The semantics are those of ``torch.nn.LSTM``: the same weights give the same numbers.
    Per layer and direction, with gate order i, f, g, o::

        state = initial_state or zeros
        for t in range(T):                   # the reverse direction walks t = len-1 .. 0
            state, y[t] = lstm_cell(params.layers[l][d], state, x[t])

    implemented as one large product ``x @ w_ih`` for all steps, then a ``jax.lax.scan`` of
    ``h @ w_hh`` plus the gate math, with a backward pass written for the recurrence.

    Args:
      params: from :func:`init_lstm` or :func:`from_torch`; its structure fixes the number
        of layers L, the directions D, the projection and the bias.
      x: ``(B, T, input_size)`` if ``batch_first`` else ``(T, B, input_size)``; unbatched
        ``(T, input_size)`` works too.
      initial_state: ``LSTMState(h: (L*D, B, H_out), c: (L*D, B, H))`` indexed
        ``layer * D + direction`` (unbatched: no B axis); zeros when None. ``batch_first``
        never applies to states.
      seq_lengths: ``(B,)`` integers in ``[0, T]``: padded sequences behave like torch's
        packed sequences. Outputs past each length are zero, the final state is the state
        at the last valid step and the reverse direction starts at each sequence's own end.
        Values outside ``[0, T]`` raise; under ``jit`` (values unknown) they are clipped.
      batch_first: layout of ``x`` and ``y``.
      dropout: probability of zeroing each output of every layer but the last (as torch).
        Applied only when ``key`` is given: pass no key for evaluation.
      key: PRNG key for dropout.
      unroll: time steps per loop iteration; None picks :func:`default_unroll` for the backend.
      compute_dtype: dtype of the matrix products (e.g. ``jnp.bfloat16`` for mixed precision);
        defaults to ``x.dtype``. Sums and the cell state stay in float32 (float64 for
        float64 input); ``y`` and ``h_n`` keep the dtype of ``x``, ``c_n`` is returned in
        that accumulation dtype.
      precision: ``jax.lax.Precision`` of the matrix products (e.g. ``"highest"`` to avoid
        TF32 on GPUs).
      remat: recompute the forward pass during the backward pass, keeping only about
        sqrt(T) saved states per layer: for very long sequences. The input product
        ``x @ w_ih`` (with the variants' input layer norm) is then computed chunk by chunk
        too, so no (T, B, 4H) array is kept: at T=10,000, B=8, H=256 ``jit(grad)`` needs
        130 MiB of working memory instead of 859 MiB (layer-norm LSTM: 145 instead of
        2735), for one more forward pass (29-47% more time for the scan on the 2-core CPU;
        the C++ kernel's remat, ``backend="cpu"``, 1.47 s against the scan's 2.12 s there).
      custom_grad: use the hand-written backward pass (True) or JAX autodiff of the scan
        (False). The hand-written one is reverse mode only (``jax.grad``, ``jax.vjp``,
        ``jax.hessian``); forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) needs
        ``custom_grad=False``.
      cell_clip: clip the cell state to ``[-cell_clip, cell_clip]`` after each update (as
        TensorFlow's ``LSTMCell(cell_clip=...)``); None: no clipping.
      zoneout_h, zoneout_c: zoneout rates of ``h`` and ``c`` (Krueger et al. 2017): with
        ``key`` each unit keeps its previous value with this probability at each step;
        without ``key`` the expectation ``z * prev + (1 - z) * new``.
      recurrent_dropout: variational dropout of ``h_{t-1}`` before ``w_hh`` (Gal &
        Ghahramani 2016): one mask per sequence, layer and direction, shared by the gates and
        by all steps; only with ``key``.
      candidate_dropout: dropout of the candidate ``g`` in ``c_t = f * c_{t-1} + i * g``
        (Semeniuta et al. 2016, "recurrent dropout without memory loss"): a fresh mask at
        each step; only with ``key``.

      backend: ``"auto"``, ``"scan"``, ``"pallas"``, ``"cudnn"`` or ``"cpu"``. ``"scan"``
        is the ``lax.scan`` loop (every platform, every option); ``"pallas"`` a persistent
        GPU kernel holding ``w_hh`` on chip (small hidden sizes, no projection or variants);
        ``"cudnn"`` ``jax.experimental.rnn`` (GPU, float32, no projection or variants);
        ``"cpu"`` a C++ kernel running each layer's whole time loop in one XLA FFI call
        (CPU, float32, projection and remat included, no variants; compiled with the host's C++
        compiler on first use, :mod:`lstm_jax.kernels.cpu_native`). ``"auto"`` picks per
        platform and shape from measurements recorded in :mod:`lstm_jax.kernels.select`
        (``"scan"`` on TPU, and wherever nothing else measured faster or applies). An
        explicit backend that cannot run the call raises a ValueError saying why.

      Peephole, layer-norm and CIFG LSTMs are told by ``params`` (see :func:`init_lstm`).
      Every variant keeps the fast path: the input product is hoisted and the backward pass
      computes the weight gradients as single products after the loop. Equations:
      :func:`lstm_jax.variant_step` and ``docs/variants.md``.

    Returns:
      ``(y, LSTMState(h_n, c_n))`` with ``y: (B, T, D*H_out)`` (``(T, B, D*H_out)`` if not
      ``batch_first``), ``h_n: (L*D, B, H_out)`` and ``c_n: (L*D, B, H)``.

    Example:
      >>> params = init_lstm(jax.random.key(0), input_size=3, hidden_size=8, num_layers=2)
      >>> y, state = lstm(params, jnp.ones((4, 10, 3)))
      >>> y.shape, state.h.shape
      ((4, 10, 8), (2, 4, 8))
    """
    if not isinstance(params, LSTMParams):
        raise ValueError(
            f"params must be the LSTMParams of init_lstm or from_torch, got {type(params).__name__}"
        )
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if unroll is not None and (isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1):
        raise ValueError(f"unroll must be a positive integer or None, got {unroll!r}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}")
    L, D = params.num_layers, params.num_directions
    H, H_out, F = params.hidden_size, params.output_size, params.input_size
    if x.ndim not in (2, 3):
        layout = "(B, T, input_size)" if batch_first else "(T, B, input_size)"
        raise ValueError(
            f"x must have rank 3 {layout} or rank 2 (T, input_size), got shape {x.shape}"
        )
    if x.shape[-1] != F:
        raise ValueError(f"x has {x.shape[-1]} features (last axis), expected input_size {F}")

    unbatched = x.ndim == 2
    out_dtype = x.dtype
    for name, flag in (("batch_first", batch_first), ("remat", remat)):
        if not isinstance(flag, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    dtype = jnp.dtype(compute_dtype) if compute_dtype is not None else x.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"compute_dtype must be a floating-point dtype, got {dtype}")
    acc = accumulation_dtype(dtype)
    x = x[:, None] if unbatched else (jnp.swapaxes(x, 0, 1) if batch_first else x)
    T, B = x.shape[:2]
    x = x.astype(dtype)

    if initial_state is None:
        h0 = jnp.zeros((L * D, B, H_out), dtype)
        c0 = jnp.zeros((L * D, B, H), acc)
    else:
        lead = (L * D,) if unbatched else (L * D, B)
        h0, c0 = _validate_state(initial_state, lead + (H_out,), lead + (H,))
        if unbatched:
            h0, c0 = h0[:, None], c0[:, None]
        h0, c0 = h0.astype(dtype), c0.astype(acc)

    mask = None
    if seq_lengths is not None:
        seq_lengths = jnp.asarray(seq_lengths)
        expected = (1,) if unbatched else (B,)
        if seq_lengths.shape not in (expected, () if unbatched else expected):
            raise _shape_error("seq_lengths", expected, seq_lengths.shape)
        if not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
            raise ValueError(f"seq_lengths must be integers, got dtype {seq_lengths.dtype}")
        _check_length_range(seq_lengths, T)
        # Under jit the values are unknown here: out-of-range lengths are clipped to [0, T]
        # (a length past T would make the reverse direction read outside the sequence).
        seq_lengths = jnp.clip(seq_lengths.reshape((B,)).astype(jnp.int32), 0, T)
        mask = jnp.arange(T)[:, None] < seq_lengths[None, :]
    if T == 0 or B == 0:
        # Nothing to run (the loops and their gradients index a step and a row): no outputs,
        # the final state is the initial one.
        y = jnp.zeros((T, B, D * H_out), dtype)
        return _finish(y, h0, c0, out_dtype, unbatched, batch_first)
    reverse_index = _reverse_index(T, seq_lengths) if D == 2 else None

    unroll = default_unroll() if unroll is None else unroll
    unroll = max(1, min(unroll, T))
    opts = VariantOptions.create(
        cell_clip, zoneout_h, zoneout_c, recurrent_dropout, candidate_dropout
    )
    has_variants = opts.active or not params.is_plain
    chosen = choose_backend(
        backend, platform=jax.default_backend(), batch=B, hidden=H, proj=params.proj_size,
        dtype=dtype, has_variants=has_variants, remat=remat,
        dropout_active=dropout > 0.0 and key is not None and L > 1, custom_grad=custom_grad,
    )
    if chosen == "cudnn":
        y, state = cudnn_lstm(params, x, LSTMState(h0, c0), seq_lengths=seq_lengths,
                              batch_first=False, precision=precision)
        return _finish(y, state.h, state.c, out_dtype, unbatched, batch_first)
    if has_variants:
        return _variant_lstm(
            params, x, h0, c0, mask, reverse_index, opts, dropout, key, unroll, precision, remat,
            custom_grad, dtype, acc, out_dtype, unbatched, batch_first,
        )
    # With remat (and the custom backward pass) the input product moves into the loop's
    # chunks, so that no (T, B, 4H) array is kept, and the CPU kernel forms it step by step:
    # those loops take the layer input and w_ih.
    project = not (remat and custom_grad and chosen == "scan") and chosen != "cpu"
    if chosen == "pallas":
        loop = functools.partial(pallas_recurrence, precision=precision,
                                 product=pallas_product(batch=B, hidden=H))
    elif chosen == "cpu" and remat:
        loop = functools.partial(cpu_remat_layer, kernel_remat_chunk(T), precision=precision)
    elif chosen == "cpu":
        loop = functools.partial(cpu_layer, precision=precision)
    elif not project:
        loop = functools.partial(remat_recurrence, unroll, precision, remat_chunk(T))
    elif custom_grad:
        loop = functools.partial(recurrence, unroll, precision)
    else:
        loop = functools.partial(recurrence_autodiff, unroll, precision)
        if remat:
            loop = jax.checkpoint(loop)

    def run(xs, args, mask):
        w_ih, w_hh, w_hr, h0, c0, b = args
        if project:
            return loop(xs, w_hh, w_hr, h0, c0, mask, b)
        return loop(xs, w_ih, w_hh, w_hr, h0, c0, mask, b)

    def direction_inputs(layer, directions, xs, h0, c0):
        # The bias is added inside the loop's elementwise pass (one pass over xw less).
        return [
            (xs_d, (None if project else p.w_ih.astype(dtype), p.w_hh.astype(dtype),
                    None if p.w_hr is None else p.w_hr.astype(dtype), h0_d, c0_d,
                    p.b.astype(acc) if params.has_bias else None))
            for p, xs_d, h0_d, c0_d in zip(directions, xs, h0, c0, strict=True)
        ]

    y, h_n, c_n = _layer_loop(params, x, h0, c0, mask, reverse_index, run, direction_inputs,
                              dropout, key, dtype, acc, precision, project, custom_grad)
    return _finish(y, h_n, c_n, out_dtype, unbatched, batch_first)


def _layer_loop(params, x, h0, c0, mask, reverse_index, run, direction_inputs, dropout, key,
                dtype, acc, precision, project=True, custom_grad=True):
    """Stacks the layers and runs both directions of each; shared by the plain and variant paths.

    ``run(xs, args, mask) -> (ys, (h_T, c_T))`` is one direction's time loop;
    ``direction_inputs(layer, directions, xs, h0, c0)`` turns the per-direction lists of loop
    inputs and initial states into ``[(loop input, args)]``, one pair per direction. The
    loop inputs are the input products ``x @ w_ih: (T, B, G*H)``, computed here in one
    product for all steps and both directions, or with ``project=False`` the layer input
    itself (the loop multiplies it). Returns time-major ``(y, h_n, c_n)``.
    """
    L, D = params.num_layers, params.num_directions
    if D == 2:
        # Both directions walk forward through time-reversed inputs, so one vmapped loop
        # does both: a batched (2, B, H_out) x (2, H_out, 4H) product per step.
        run = jax.vmap(run, in_axes=(0, 0, None))
    h_n, c_n = [], []
    layer_input = x
    for layer, directions in enumerate(params.layers):
        if project:
            # One large product for all steps and both directions.
            w_ih = jnp.concatenate([p.w_ih.astype(dtype) for p in directions], axis=1)
            # custom_grad=False: plain autodiff all the way (forward mode included).
            product = input_product if custom_grad else matmul
            xs = jnp.split(product(layer_input, w_ih, acc, precision), D, axis=-1)
        else:
            xs = [layer_input] * D
        states = slice(layer * D, (layer + 1) * D)
        inputs = direction_inputs(layer, directions, xs, list(h0[states]), list(c0[states]))
        if D == 1:
            ((xs, args),) = inputs
            ys, (h, c) = run(xs, args, mask)
            h, c = h[None], c[None]
        else:
            (xs_fwd, args_fwd), (xs_bwd, args_bwd) = inputs
            xs = jnp.stack([xs_fwd, _time_reverse(xs_bwd, reverse_index)])
            args = jax.tree_util.tree_map(lambda *v: jnp.stack(v), args_fwd, args_bwd)
            ys2, (h, c) = run(xs, args, mask)
            ys = jnp.concatenate([ys2[0], _time_reverse(ys2[1], reverse_index)], axis=-1)
        h_n.append(h)
        c_n.append(c)
        layer_input = _between_layers(ys, layer, L, dropout, key, dtype)
    return layer_input, jnp.concatenate(h_n), jnp.concatenate(c_n)


def variant_masks(key, layer, opts, D, T, B, H, H_out, dtype):
    """The random masks of one layer: ``(rmask: (D, B, H_out) | None, StepMasks (D, T, B, .))``.

    Step masks are indexed by loop step: for the reverse direction step s is time len-1-s.
    """
    if key is None:
        return None, draw_step_masks(None, opts, (), H, H_out)
    # Far from the keys of inter-layer dropout (fold_in(key, layer)).
    k_rec, k_step = jax.random.split(jax.random.fold_in(key, (1 << 20) + layer))
    rmask = None
    if opts.recurrent_dropout:
        rmask = recurrent_mask(k_rec, opts.recurrent_dropout, (D, B, H_out), dtype)
    return rmask, draw_step_masks(k_step, opts, (D, T, B), H, H_out)


def _variant_lstm(params, x, h0, c0, mask, reverse_index, opts, dropout, key, unroll, precision,
                  remat, custom_grad, dtype, acc, out_dtype, unbatched, batch_first):
    """:func:`lstm` for the research variants: the same layer loop with the variant recurrence."""
    D = params.num_directions
    T, B = x.shape[:2]
    H, H_out = params.hidden_size, params.output_size
    # As in lstm(): with remat the input pre-activations are computed inside the loop's chunks.
    project = not (remat and custom_grad)
    if not project:
        loop = functools.partial(variant_remat_recurrence, unroll, precision, remat_chunk(T), opts)
    elif custom_grad:
        loop = functools.partial(variant_recurrence, unroll, precision, opts)
    else:
        loop = functools.partial(variant_recurrence_autodiff, unroll, precision, opts)
        if remat:
            loop = jax.checkpoint(loop)

    def run(xs, args, mask):
        in_params, w_hh, w_hr, extras, h0, c0, rmask, masks = args
        if project:
            return loop(xs, w_hh, w_hr, extras, h0, c0, mask, rmask, masks)
        return loop(xs, in_params, w_hh, w_hr, extras, h0, c0, mask, rmask, masks)

    def direction_inputs(layer, directions, xs, h0, c0):
        rmask, masks = variant_masks(key, layer, opts, D, T, B, H, H_out, dtype)
        inputs = []
        for d, (p, xs_d, h0_d, c0_d) in enumerate(zip(directions, xs, h0, c0, strict=True)):
            in_params = None
            if project:
                # The input layer norm and the bias act on each direction's (T, B, G*H) block.
                xs_d = input_preactivations(xs_d, p, acc)
            else:
                in_params = (p.w_ih.astype(dtype), *(None if v is None else v.astype(acc)
                                                     for v in (p.ln_x_scale, p.b)))
            args = (in_params, p.w_hh.astype(dtype),
                    None if p.w_hr is None else p.w_hr.astype(dtype), CellExtras.of(p, acc),
                    h0_d, c0_d, None if rmask is None else rmask[d],
                    jax.tree_util.tree_map(lambda m: m[d], masks))
            inputs.append((xs_d, args))
        return inputs

    y, h_n, c_n = _layer_loop(params, x, h0, c0, mask, reverse_index, run, direction_inputs,
                              dropout, key, dtype, acc, precision, project, custom_grad)
    return _finish(y, h_n, c_n, out_dtype, unbatched, batch_first)
