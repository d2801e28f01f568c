"""Flax NNX front door: :class:`LSTM`, a thin module over :func:`lstm_jax.lstm`.

The module owns the parameters (the :class:`~lstm_jax.LSTMParams` pytree of
:func:`lstm_jax.init_lstm`, each array an ``nnx.Param``) and calls the pure functions: no
LSTM math is written here. Arguments are named as ``torch.nn.LSTM``'s, plus the projection,
the forget-gate bias, the research variants and the dtypes. Randomness (inter-layer dropout,
zoneout, recurrent and candidate dropout) comes from the ``dropout`` stream of ``rngs`` and is
switched off by ``deterministic`` (``model.eval()`` sets it, ``model.train()`` clears it).

Example::

    from flax import nnx
    import lstm_jax.nn

    model = lstm_jax.nn.LSTM(8, 32, num_layers=2, zoneout_c=0.1, rngs=nnx.Rngs(0))
    y, state = model(x)                       # x: (B, T, 8) -> y: (B, T, 32)
    model.eval()                              # zoneout takes its expectation
    y, state = model(x, seq_lengths=lengths)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lstm_jax._lstm import lstm
from lstm_jax._params import LSTMParams, LSTMState, init_lstm

__all__ = ["LSTM"]

Array = jax.Array


def _is_variable(v) -> bool:
    return isinstance(v, nnx.Variable)


class LSTM(nnx.Module):
    """A stacked, optionally bidirectional LSTM with torch.nn.LSTM's arguments, for Flax NNX.

    Computes, per layer and direction, with gate order i, f, g, o (see :func:`lstm_jax.lstm`)::

        z = x_t @ w_ih + h_{t-1} @ w_hh + b
        c_t = sigmoid(z_f) * c_{t-1} + sigmoid(z_i) * tanh(z_g)
        h_t = sigmoid(z_o) * tanh(c_t)                 # then h_t @ w_hr if proj_size

    and the research variants when asked (equations in :func:`lstm_jax.variant_step`).

    Args:
      input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
        proj_size: as ``torch.nn.LSTM`` -- except that ``batch_first`` defaults to True (the
        JAX convention). ``dropout`` acts between layers when not ``deterministic``.
      forget_bias, weight_init: initialisation, as :func:`lstm_jax.init_lstm`'s
        ``forget_bias`` and ``init`` (``init`` is linen's method name, hence the rename).
      peephole, layer_norm, cifg, chrono_t_max: parameter-bearing variants and chrono
        initialisation, as :func:`lstm_jax.init_lstm`.
      cell_clip, zoneout_h, zoneout_c, recurrent_dropout, candidate_dropout: call-time
        variants, as :func:`lstm_jax.lstm`; the random ones draw masks unless
        ``deterministic`` (zoneout then takes its expectation).
      unroll, remat, precision, backend: passed to :func:`lstm_jax.lstm`.
      dtype: computation dtype (inputs are cast to it, outputs come back in it; the cell state
        stays float32); None keeps the input's dtype.
      param_dtype: dtype of the parameters.
      deterministic: evaluation mode (no random masks); ``model.eval()`` / ``model.train()``
        set it, and the call's ``deterministic`` overrides it.
      rngs: ``nnx.Rngs``; ``params`` draws the weights, ``dropout`` the masks.

    Attributes:
      params: the :class:`~lstm_jax.LSTMParams` tree, each array an ``nnx.Param``
        (paths such as ``params/layers/0/1/w_hh``); :attr:`lstm_params` gives plain arrays.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = True,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        proj_size: int = 0,
        forget_bias: float = 1.0,
        weight_init: str = "default",
        peephole: bool = False,
        layer_norm: bool = False,
        cifg: bool = False,
        chrono_t_max: float | None = None,
        cell_clip: float | None = None,
        zoneout_h: float = 0.0,
        zoneout_c: float = 0.0,
        recurrent_dropout: float = 0.0,
        candidate_dropout: float = 0.0,
        unroll: int | None = None,
        remat: bool = False,
        precision=None,
        backend: str = "auto",
        dtype=None,
        param_dtype=jnp.float32,
        deterministic: bool = False,
        rngs: nnx.Rngs,
    ):
        params = init_lstm(
            rngs.params(), input_size, hidden_size, num_layers=num_layers, bias=bias,
            bidirectional=bidirectional, proj_size=proj_size, forget_bias=forget_bias,
            init=weight_init, dtype=param_dtype, peephole=peephole, layer_norm=layer_norm,
            cifg=cifg, chrono_t_max=chrono_t_max,
        )
        self._setup(params, rngs, batch_first=batch_first, dropout=dropout, cell_clip=cell_clip,
                    zoneout_h=zoneout_h, zoneout_c=zoneout_c,
                    recurrent_dropout=recurrent_dropout, candidate_dropout=candidate_dropout,
                    unroll=unroll, remat=remat, precision=precision, backend=backend,
                    dtype=dtype, deterministic=deterministic)

    def _setup(self, params: LSTMParams, rngs, **options):
        self.input_size = params.input_size
        self.hidden_size = params.hidden_size
        self.num_layers = params.num_layers
        self.bidirectional = params.bidirectional
        self.proj_size = params.proj_size
        for name, value in options.items():
            setattr(self, name, value)
        self.params = nnx.data(jax.tree.map(nnx.Param, params))
        # Validate the call-time options now rather than at the first call (tracing only).
        x = jax.ShapeDtypeStruct((1, 1, params.input_size), params.layers[0][0].w_ih.dtype)
        jax.eval_shape(lambda p, x: lstm(p, x, **self._call_options()), params, x)
        if self.stochastic:
            try:
                self.rngs = rngs["dropout"].fork()
            except KeyError:
                if not options.get("deterministic"):
                    raise ValueError(
                        "a random option (dropout, zoneout, ...) is on: rngs needs a 'dropout' "
                        "stream or a default one, e.g. nnx.Rngs(0) or nnx.Rngs(params=0, "
                        "dropout=1)") from None
                self.rngs = nnx.data(None)  # evaluation only; a train() call must pass rngs
        else:
            self.rngs = nnx.data(None)

    @classmethod
    def from_params(
        cls,
        params: LSTMParams,
        *,
        batch_first: bool = True,
        dropout: float = 0.0,
        cell_clip: float | None = None,
        zoneout_h: float = 0.0,
        zoneout_c: float = 0.0,
        recurrent_dropout: float = 0.0,
        candidate_dropout: float = 0.0,
        unroll: int | None = None,
        remat: bool = False,
        precision=None,
        backend: str = "auto",
        dtype=None,
        deterministic: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> LSTM:
        """A module holding given parameters, e.g. ``LSTM.from_params(from_torch(sd))``.

        The structure of ``params`` fixes the sizes and the parameter-bearing variants;
        ``rngs`` is needed only when a random option is on.
        """
        if not isinstance(params, LSTMParams):
            raise ValueError(f"params must be LSTMParams, got {type(params).__name__}")
        stochastic = dropout > 0 or zoneout_h or zoneout_c or recurrent_dropout or candidate_dropout
        if stochastic and rngs is None:
            raise ValueError(
                "a random option (dropout, zoneout, ...) is on: pass rngs=nnx.Rngs(...)"
            )
        module = cls(
            params.input_size, params.hidden_size, params.num_layers, params.has_bias, batch_first,
            dropout, params.bidirectional, proj_size=params.proj_size, cell_clip=cell_clip,
            zoneout_h=zoneout_h, zoneout_c=zoneout_c, recurrent_dropout=recurrent_dropout,
            candidate_dropout=candidate_dropout, unroll=unroll, remat=remat, precision=precision,
            backend=backend, dtype=dtype, deterministic=deterministic,
            rngs=rngs if rngs is not None else nnx.Rngs(0),
        )
        # The parameters' structure says which variants are on; the freshly drawn ones go.
        module.params = nnx.data(jax.tree.map(nnx.Param, params))
        return module

    @property
    def stochastic(self) -> bool:
        """Whether any option draws random masks in training."""
        return bool(self.dropout > 0 or self.zoneout_h or self.zoneout_c
                    or self.recurrent_dropout or self.candidate_dropout)

    @property
    def lstm_params(self) -> LSTMParams:
        """The parameters as plain arrays, ready for :func:`lstm_jax.lstm` or ``to_torch``."""
        return jax.tree.map(lambda v: v[...], self.params, is_leaf=_is_variable)

    def _call_options(self) -> dict:
        return dict(
            batch_first=self.batch_first, dropout=self.dropout, cell_clip=self.cell_clip,
            zoneout_h=self.zoneout_h, zoneout_c=self.zoneout_c,
            recurrent_dropout=self.recurrent_dropout, candidate_dropout=self.candidate_dropout,
            unroll=self.unroll, remat=self.remat, precision=self.precision,
            backend=self.backend,
        )

    def __call__(
        self,
        x: Array,
        initial_state: LSTMState | None = None,
        *,
        seq_lengths: Array | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[Array, LSTMState]:
        """Runs the LSTM: ``x: (B, T, input_size)`` (``(T, B, .)`` if not ``batch_first``).

        Args:
          x: the input sequences; unbatched ``(T, input_size)`` works too.
          initial_state: ``LSTMState(h: (L*D, B, H_out), c: (L*D, B, H))``; zeros if None.
          seq_lengths: ``(B,)`` valid lengths (torch's packed-sequence semantics).
          deterministic: overrides the module's ``deterministic`` for this call.
          rngs: overrides the module's random stream for this call.

        Returns:
          ``(y, LSTMState(h_n, c_n))`` as :func:`lstm_jax.lstm`.
        """
        if deterministic is None:
            deterministic = self.deterministic
        key = None
        if self.stochastic and not deterministic:
            stream = rngs["dropout"] if rngs is not None else self.rngs
            if stream is None:
                raise ValueError("training with random options needs rngs (or deterministic=True)")
            key = stream()
        if self.dtype is not None:
            x = jnp.asarray(x, self.dtype)
        return lstm(self.lstm_params, x, initial_state, seq_lengths=seq_lengths, key=key,
                    **self._call_options())
