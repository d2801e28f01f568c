"""Flax linen front door: :class:`LSTM` (over :func:`lstm_jax.lstm`) and :class:`LSTMCell`.

Both are thin shells: the parameters are the pytrees of :func:`lstm_jax.init_lstm` stored as
one linen param (``params["lstm"]``: an :class:`~lstm_jax.LSTMParams`; ``params["lstm_cell"]``: an
:class:`~lstm_jax.LSTMCellParams`), and the math is :func:`lstm_jax.lstm` /
:func:`lstm_jax.lstm_cell`. Randomness comes from the ``"dropout"`` rng collection and is off
when ``deterministic`` (a module attribute that the call's argument overrides, as
``nn.Dropout``).

Example::

    import lstm_jax.linen

    model = lstm_jax.linen.LSTM(input_size=8, hidden_size=32, zoneout_c=0.1)
    variables = model.init(jax.random.key(0), x, deterministic=True)
    y, state = model.apply(variables, x, deterministic=False, rngs={"dropout": key})
    y, state = model.apply(variables, x, deterministic=True)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lstm_jax._cell import lstm_cell
from lstm_jax._lstm import lstm
from lstm_jax._params import LSTMCellParams, LSTMParams, LSTMState, init_lstm

__all__ = ["LSTM", "LSTMCell"]

Array = jax.Array


class LSTM(nn.Module):
    """A stacked, optionally bidirectional LSTM with torch.nn.LSTM's arguments, for Flax linen.

    The same computation as :func:`lstm_jax.lstm` (gate order i, f, g, o; state ``(h, c)``),
    on parameters ``params["lstm"]`` drawn by :func:`lstm_jax.init_lstm`.

    Attributes:
      input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
        proj_size: as ``torch.nn.LSTM`` -- except that ``batch_first`` defaults to True (the
        JAX convention). ``dropout`` acts between layers when not ``deterministic``.
      forget_bias, weight_init: initialisation, as :func:`lstm_jax.init_lstm`'s
        ``forget_bias`` and ``init`` (``init`` is linen's method name, hence the rename).
      peephole, layer_norm, cifg, chrono_t_max: parameter-bearing variants and chrono
        initialisation, as :func:`lstm_jax.init_lstm`.
      cell_clip, zoneout_h, zoneout_c, recurrent_dropout, candidate_dropout: call-time
        variants, as :func:`lstm_jax.lstm`.
      unroll, remat, precision, backend: passed to :func:`lstm_jax.lstm`.
      dtype: computation dtype (inputs are cast to it and outputs come back in it; the cell
        state stays float32); None keeps the input's dtype.
      param_dtype: dtype of the parameters.
      deterministic: evaluation mode (no random masks; zoneout takes its expectation); the
        call's ``deterministic`` argument overrides it.

    Example:
      >>> model = LSTM(input_size=3, hidden_size=8, num_layers=2, peephole=True)
      >>> variables = model.init(jax.random.key(0), jnp.ones((4, 10, 3)))
      >>> y, state = model.apply(variables, jnp.ones((4, 10, 3)))
      >>> y.shape, state.h.shape
      ((4, 10, 8), (2, 4, 8))
    """

    input_size: int
    hidden_size: int
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = True
    dropout: float = 0.0
    bidirectional: bool = False
    proj_size: int = 0
    forget_bias: float = 1.0
    weight_init: str = "default"
    peephole: bool = False
    layer_norm: bool = False
    cifg: bool = False
    chrono_t_max: float | None = None
    cell_clip: float | None = None
    zoneout_h: float = 0.0
    zoneout_c: float = 0.0
    recurrent_dropout: float = 0.0
    candidate_dropout: float = 0.0
    unroll: int | None = None
    remat: bool = False
    precision: Any = None
    backend: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    deterministic: bool | None = None

    def _init(self, key: Array) -> LSTMParams:
        return init_lstm(
            key, self.input_size, self.hidden_size, num_layers=self.num_layers, bias=self.bias,
            bidirectional=self.bidirectional, proj_size=self.proj_size,
            forget_bias=self.forget_bias, init=self.weight_init, dtype=self.param_dtype,
            peephole=self.peephole, layer_norm=self.layer_norm, cifg=self.cifg,
            chrono_t_max=self.chrono_t_max,
        )

    @property
    def stochastic(self) -> bool:
        """Whether any option draws random masks in training."""
        return bool(self.dropout > 0 or self.zoneout_h or self.zoneout_c
                    or self.recurrent_dropout or self.candidate_dropout)

    @nn.compact
    def __call__(
        self,
        x: Array,
        initial_state: LSTMState | None = None,
        *,
        seq_lengths: Array | None = None,
        deterministic: bool | None = None,
    ) -> tuple[Array, LSTMState]:
        """Runs the LSTM: ``x: (B, T, input_size)`` (``(T, B, .)`` if not ``batch_first``).

        Args:
          x: the input sequences; unbatched ``(T, input_size)`` works too.
          initial_state: ``LSTMState(h: (L*D, B, H_out), c: (L*D, B, H))``; zeros if None.
          seq_lengths: ``(B,)`` valid lengths (torch's packed-sequence semantics).
          deterministic: evaluation mode for this call. With a random option on, exactly
            one of this argument and the attribute must be given (as ``nn.Dropout``).

        Returns:
          ``(y, LSTMState(h_n, c_n))`` as :func:`lstm_jax.lstm`.
        """
        params = self.param("lstm", self._init)
        key = None
        # As nn.Dropout: with a random option, exactly one of the attribute and the argument
        # must say whether this is training.
        if self.stochastic and not nn.merge_param(
            "deterministic", self.deterministic, deterministic
        ):
            key = self.make_rng("dropout")
        if self.dtype is not None:
            x = jnp.asarray(x, self.dtype)
        return lstm(
            params, x, initial_state, seq_lengths=seq_lengths, batch_first=self.batch_first,
            dropout=self.dropout, key=key, unroll=self.unroll, precision=self.precision,
            remat=self.remat, backend=self.backend, cell_clip=self.cell_clip,
            zoneout_h=self.zoneout_h, zoneout_c=self.zoneout_c,
            recurrent_dropout=self.recurrent_dropout, candidate_dropout=self.candidate_dropout,
        )


class LSTMCell(nn.RNNCellBase):
    """One LSTM step for Flax's ``nn.RNN``, with the variants; a drop-in for ``nn.LSTMCell``.

    The carry follows **Flax's convention ``(c, h)``** (as ``nn.LSTMCell`` and
    ``nn.OptimizedLSTMCell``), not lstm_jax's ``LSTMState(h, c)``: the cell swaps them at
    its boundary. The math is :func:`lstm_jax.lstm_cell` on ``params["lstm_cell"]``, an
    :class:`~lstm_jax.LSTMCellParams` drawn by :func:`lstm_jax.init_lstm` (gate order i, f, g, o).

    For the whole sequence prefer :class:`LSTM` (or :func:`lstm_jax.lstm`): it hoists the input
    product out of the loop and has a backward pass written for the recurrence.

    Randomness in training (``deterministic=False``): zoneout and candidate-dropout masks come
    from the ``"dropout"`` rng collection and must differ per step, so split it over time; the
    recurrent-dropout mask (Gal & Ghahramani: one per sequence) comes from the
    ``"recurrent_dropout"`` collection, broadcast so that every step draws the same mask::

        nn.RNN(cell, split_rngs={"params": False, "dropout": True, "recurrent_dropout": False})
        rnn.apply(variables, x, rngs={"dropout": k1, "recurrent_dropout": k2})

    Attributes:
      features: hidden size H.
      proj_size, forget_bias, weight_init, peephole, layer_norm, cifg, chrono_t_max: as
        :func:`lstm_jax.init_lstm` (``weight_init`` is its ``init``).
      cell_clip, zoneout_h, zoneout_c, recurrent_dropout, candidate_dropout: as
        :func:`lstm_jax.lstm_cell`.
      precision, param_dtype: as for :class:`LSTM`.
      deterministic: evaluation mode (default True: set it False to train with masks).

    Example:
      >>> rnn = nn.RNN(LSTMCell(features=8, peephole=True))
      >>> variables = rnn.init(jax.random.key(0), jnp.ones((4, 10, 3)))
      >>> y = rnn.apply(variables, jnp.ones((4, 10, 3)))      # (4, 10, 8)
    """

    features: int
    proj_size: int = 0
    forget_bias: float = 1.0
    weight_init: str = "default"
    peephole: bool = False
    layer_norm: bool = False
    cifg: bool = False
    chrono_t_max: float | None = None
    cell_clip: float | None = None
    zoneout_h: float = 0.0
    zoneout_c: float = 0.0
    recurrent_dropout: float = 0.0
    candidate_dropout: float = 0.0
    precision: Any = None
    param_dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], x: Array) -> tuple[tuple[Array, Array], Array]:
        """``((c, h), x: (B, input_size)) -> ((c', h'), h')``."""
        c, h = carry
        params: LSTMCellParams = self.param(
            "lstm_cell",
            lambda key: init_lstm(
                key, x.shape[-1], self.features, proj_size=self.proj_size,
                forget_bias=self.forget_bias, init=self.weight_init, dtype=self.param_dtype,
                peephole=self.peephole, layer_norm=self.layer_norm, cifg=self.cifg,
                chrono_t_max=self.chrono_t_max,
            ).layers[0][0],
        )
        key = recurrent_key = None
        if not self.deterministic:
            if self.zoneout_h or self.zoneout_c or self.candidate_dropout:
                key = self.make_rng("dropout")
            if self.recurrent_dropout:
                recurrent_key = self.make_rng("recurrent_dropout")
        state, y = lstm_cell(
            params, LSTMState(h, c), x, precision=self.precision, cell_clip=self.cell_clip,
            zoneout_h=self.zoneout_h, zoneout_c=self.zoneout_c,
            recurrent_dropout=self.recurrent_dropout, candidate_dropout=self.candidate_dropout,
            key=key, recurrent_key=recurrent_key,
        )
        # The carry keeps initialize_carry's dtypes (float32, or float64 parameters' float64),
        # so nn.RNN's scan sees the same carry type for bfloat16 inputs too; y has x's dtype.
        return (state.c.astype(c.dtype), state.h.astype(h.dtype)), y

    @nn.nowrap
    def initialize_carry(self, rng: Array, input_shape: tuple[int, ...]) -> tuple[Array, Array]:
        """Zeros ``(c: (*batch, H), h: (*batch, H_out))`` for inputs of ``input_shape``,
        in float32 (float64 when ``param_dtype`` is)."""
        del rng
        batch = tuple(input_shape[:-1])
        dtype = jnp.promote_types(self.param_dtype, jnp.float32)
        return (jnp.zeros(batch + (self.features,), dtype),
                jnp.zeros(batch + (self.proj_size or self.features,), dtype))

    @property
    def num_feature_axes(self) -> int:
        return 1
