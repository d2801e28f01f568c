"""Parameter containers and initialisation for the functional LSTM.

Weights are stored input-major so that the hot products are ``x @ W`` with no transpose:

* ``w_ih``: (input_size, 4H) -- gate blocks in the order i, f, g, o (as torch.nn.LSTM);
* ``w_hh``: (H_out, 4H) where H_out = proj_size or hidden_size;
* ``b``:    (4H,) or None -- one combined bias (torch's ``b_ih + b_hh``);
* ``w_hr``: (H, H_out) or None -- the output projection of Sak et al. 2014 (torch's ``proj_size``).

Research variants that carry weights add optional fields (None when off), so the structure
still says what is on (see ``docs/variants.md``):

* CIFG (coupled input-forget gate, ``i = 1 - f``): no input-gate block, so ``w_ih: (in, 3H)``,
  ``w_hh: (H_out, 3H)``, ``b: (3H,)`` in the order f, g, o;
* ``w_peep``: (P, H) or None -- peephole weights (Gers & Schmidhuber 2000), one row per
  sigmoid gate: i, f, o (P = 3), or f, o with CIFG (P = 2);
* ``ln_x_scale``, ``ln_h_scale``: (G*H,) or None -- layer-norm gains of the input and the
  recurrent pre-activations (Ba et al. 2016); their shifts add up with ``b``, which holds them;
* ``ln_c_scale``, ``ln_c_bias``: (H,) or None -- layer-norm gain and shift of the cell state.

The structure of the pytree alone says how many layers there are, whether the LSTM is
bidirectional, projected and biased, so :func:`lstm_jax.lstm` takes no argument that could
disagree with it.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class LSTMState(NamedTuple):
    """Recurrent state of an LSTM, hidden state first (as torch, Equinox and Haiku).

    For a single cell ``h: (B, H_out)`` and ``c: (B, H)``. For :func:`lstm_jax.lstm`
    ``h: (num_layers * D, B, H_out)`` and ``c: (num_layers * D, B, H)``, indexed
    ``layer * D + direction``. Flax's own cells order their carry ``(c, h)``: convert
    where the two meet.
    """

    h: Array
    c: Array


class LSTMCellParams(NamedTuple):
    """Weights of one layer in one direction (gate order i, f, g, o; f, g, o with CIFG).

    The first four fields are torch.nn.LSTM's; the rest belong to research variants and are
    None when the variant is off (see :func:`init_lstm`).
    """

    w_ih: Array
    w_hh: Array
    b: Array | None = None
    w_hr: Array | None = None
    w_peep: Array | None = None
    ln_x_scale: Array | None = None
    ln_h_scale: Array | None = None
    ln_c_scale: Array | None = None
    ln_c_bias: Array | None = None

    @property
    def input_size(self) -> int:
        return self.w_ih.shape[0]

    @property
    def hidden_size(self) -> int:
        # Read from w_hh (or w_hr), not w_ih // 4, so that CIFG's three gate blocks work too.
        return self.w_hh.shape[0] if self.w_hr is None else self.w_hr.shape[0]

    @property
    def num_gates(self) -> int:
        """4 (i, f, g, o), or 3 (f, g, o) for a coupled input-forget gate."""
        return self.w_hh.shape[1] // self.hidden_size

    @property
    def cifg(self) -> bool:
        return self.num_gates == 3

    @property
    def peephole(self) -> bool:
        return self.w_peep is not None

    @property
    def layer_norm(self) -> bool:
        return self.ln_h_scale is not None

    @property
    def is_plain(self) -> bool:
        """True when these are torch.nn.LSTM's weights and nothing else."""
        return self.num_gates == 4 and all(getattr(self, n) is None for n in self._fields[4:])

    @property
    def output_size(self) -> int:
        return self.w_hh.shape[0]


class LSTMParams(NamedTuple):
    """A stack of layers: ``layers[l][d]`` is layer ``l``, direction ``d`` (0 forward, 1 reverse)."""

    layers: tuple[tuple[LSTMCellParams, ...], ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_directions(self) -> int:
        return len(self.layers[0])

    @property
    def bidirectional(self) -> bool:
        return self.num_directions == 2

    @property
    def input_size(self) -> int:
        return self.layers[0][0].input_size

    @property
    def hidden_size(self) -> int:
        return self.layers[0][0].hidden_size

    @property
    def output_size(self) -> int:
        return self.layers[0][0].output_size

    @property
    def proj_size(self) -> int:
        return 0 if self.layers[0][0].w_hr is None else self.output_size

    @property
    def has_bias(self) -> bool:
        return self.layers[0][0].b is not None

    @property
    def cifg(self) -> bool:
        return self.layers[0][0].cifg

    @property
    def peephole(self) -> bool:
        return self.layers[0][0].peephole

    @property
    def layer_norm(self) -> bool:
        return self.layers[0][0].layer_norm

    @property
    def is_plain(self) -> bool:
        """True when every layer holds torch.nn.LSTM's weights and nothing else."""
        return all(p.is_plain for directions in self.layers for p in directions)


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _orthogonal_blocks(key: Array, rows: int, hidden: int, dtype) -> Array:
    """(rows, 4*hidden): each gate's (rows, hidden) block drawn orthogonal on its own."""
    init = jax.nn.initializers.orthogonal()
    blocks = [init(k, (rows, hidden), jnp.float32) for k in jax.random.split(key, 4)]
    return jnp.concatenate(blocks, axis=1).astype(dtype)


def _gate_bias(hidden: int, forget_bias: float, dtype) -> Array:
    # Only the forget block is non-zero: the cell starts out remembering (Gers et al. 2000;
    # Jozefowicz et al. 2015 recommend 1.0).
    return jnp.zeros((4 * hidden,), jnp.float32).at[hidden : 2 * hidden].set(forget_bias).astype(dtype)


def init_lstm(
    key: Array,
    input_size: int,
    hidden_size: int,
    *,
    num_layers: int = 1,
    bias: bool = True,
    bidirectional: bool = False,
    proj_size: int = 0,
    forget_bias: float = 1.0,
    init: str = "default",
    dtype=jnp.float32,
    peephole: bool = False,
    layer_norm: bool = False,
    cifg: bool = False,
    chrono_t_max: float | None = None,
) -> LSTMParams:
    """Draws the parameters of a (stacked, optionally bidirectional, projected) LSTM.

    Two schemes:

    * ``init="default"`` (the JAX convention, as Flax's LSTM cells): input and projection
      weights ``N(0, 1/fan_in)`` (LeCun normal), recurrent weights orthogonal per gate block,
      biases zero except the forget gate's, which is ``forget_bias``.
    * ``init="pytorch"``: every weight ``U(-k, k)`` with ``k = 1/sqrt(hidden_size)`` and the
      combined bias the sum of torch's two ``U(-k, k)`` biases, plus ``forget_bias`` on the
      forget block. ``init="pytorch", forget_bias=0.0`` is distributed exactly as torch.nn.LSTM.

    Args:
      key: PRNG key.
      input_size: features of the input ``x``.
      hidden_size: H, size of the cell state.
      num_layers: stacked layers; layer l > 0 reads the D * H_out outputs of layer l - 1.
      bias: whether the gates have a bias.
      bidirectional: adds a reverse-time direction to every layer (D = 2).
      proj_size: if > 0, h is projected to this size after each step (must be < hidden_size).
      forget_bias: initial forget-gate bias (1.0 by default; the classic advice is 1 or 2).
      init: ``"default"`` or ``"pytorch"``.
      dtype: parameter dtype.
      peephole: add peephole weights ``w_peep`` (Gers & Schmidhuber 2000): the input and
        forget gates see ``c_{t-1}``, the output gate sees ``c_t``. Initialised to zero, so
        the LSTM starts out as the plain one.
      layer_norm: add layer-norm gains (ones) and the cell-norm shift (zeros) of Ba et al.
        2016: ``ln_x_scale``, ``ln_h_scale`` (G*H,), ``ln_c_scale``, ``ln_c_bias`` (H,).
      cifg: coupled input-forget gate, ``i = 1 - f`` (Greff et al. 2017): the input-gate
        block is left out of ``w_ih``, ``w_hh`` and ``b`` (3 blocks f, g, o; a quarter fewer
        gate weights). The other blocks are drawn exactly as without ``cifg``.
      chrono_t_max: if given, chrono initialisation (Tallec & Ollivier 2018) replaces
        ``forget_bias``: ``b_f = log(u)``, ``u ~ U(1, chrono_t_max - 1)`` per unit, and
        ``b_i = -b_f`` (no input bias with ``cifg``). Use the longest time dependency
        expected in the data (e.g. the sequence length). Needs ``bias=True`` and
        ``chrono_t_max > 2``.

    Returns:
      :class:`LSTMParams` whose ``layers[l][d]`` is an :class:`LSTMCellParams`.

    Example:
      >>> params = init_lstm(jax.random.key(0), 8, 16, num_layers=2, bidirectional=True)
      >>> params.layers[1][0].w_ih.shape   # layer 1 reads both directions of layer 0
      (32, 64)
    """
    _check_positive_int("input_size", input_size)
    _check_positive_int("hidden_size", hidden_size)
    _check_positive_int("num_layers", num_layers)
    _check_positive_int("proj_size", proj_size, minimum=0)
    if proj_size >= hidden_size:
        raise ValueError(
            f"proj_size must be smaller than hidden_size ({hidden_size}), got {proj_size}"
        )
    if init not in ("default", "pytorch"):
        raise ValueError(f'init must be "default" or "pytorch", got {init!r}')
    for name, flag in (("bias", bias), ("bidirectional", bidirectional), ("peephole", peephole),
                       ("layer_norm", layer_norm), ("cifg", cifg)):
        if not isinstance(flag, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if isinstance(forget_bias, bool) or not isinstance(forget_bias, numbers.Real):
        raise ValueError(f"forget_bias must be a number, got {forget_bias!r}")
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(f"dtype must be a floating-point dtype, got {jnp.dtype(dtype)}")
    if chrono_t_max is not None:
        if isinstance(chrono_t_max, bool) or not isinstance(chrono_t_max, (int, float)) or not (
            chrono_t_max > 2
        ):
            raise ValueError(f"chrono_t_max must be a number > 2, got {chrono_t_max!r}")
        if not bias:
            raise ValueError("chrono_t_max sets gate biases: it needs bias=True")
    H = hidden_size
    H_out = proj_size or hidden_size
    D = 2 if bidirectional else 1
    layers = []
    for layer in range(num_layers):
        in_size = input_size if layer == 0 else D * H_out
        directions = []
        for direction in range(D):
            k_ih, k_hh, k_b1, k_b2, k_hr = jax.random.split(
                jax.random.fold_in(key, layer * D + direction), 5
            )
            if init == "default":
                lecun = jax.nn.initializers.lecun_normal()
                w_ih = lecun(k_ih, (in_size, 4 * H), jnp.float32).astype(dtype)
                w_hh = _orthogonal_blocks(k_hh, H_out, H, dtype)
                b = _gate_bias(H, forget_bias, dtype) if bias else None
                w_hr = lecun(k_hr, (H, H_out), jnp.float32).astype(dtype) if proj_size else None
            else:
                bound = 1.0 / math.sqrt(H)

                def uniform(k, shape):
                    return jax.random.uniform(k, shape, jnp.float32, -bound, bound)

                w_ih = uniform(k_ih, (in_size, 4 * H)).astype(dtype)
                w_hh = uniform(k_hh, (H_out, 4 * H)).astype(dtype)
                b = None
                if bias:
                    b = uniform(k_b1, (4 * H,)) + uniform(k_b2, (4 * H,))
                    b = (b + _gate_bias(H, forget_bias, jnp.float32)).astype(dtype)
                w_hr = uniform(k_hr, (H, H_out)).astype(dtype) if proj_size else None
            if chrono_t_max is not None:
                b = _chrono_bias(jax.random.fold_in(k_b2, 1), b, H, chrono_t_max)
            p = LSTMCellParams(w_ih=w_ih, w_hh=w_hh, b=b, w_hr=w_hr)
            directions.append(_add_variants(p, H, dtype, peephole, layer_norm, cifg))
        layers.append(tuple(directions))
    return LSTMParams(layers=tuple(layers))


def _chrono_bias(key: Array, b: Array, hidden: int, t_max: float) -> Array:
    """Chrono init (Tallec & Ollivier 2018): ``b_f = log U(1, t_max - 1)``, ``b_i = -b_f``.

    A forget bias of log(T) makes the gate's characteristic memory time about T steps; drawing
    T uniformly covers the range of time scales up to ``t_max``.
    """
    u = jax.random.uniform(key, (hidden,), jnp.float32, 1.0, t_max - 1.0)
    b_f = jnp.log(u)
    b = b.astype(jnp.float32).at[hidden : 2 * hidden].set(b_f).at[:hidden].set(-b_f)
    return b


def _add_variants(
    p: LSTMCellParams, hidden: int, dtype, peephole: bool, layer_norm: bool, cifg: bool
) -> LSTMCellParams:
    """Adds the weights of the parameter-bearing variants to plain 4-block parameters."""
    w_ih, w_hh, b = p.w_ih, p.w_hh, p.b
    dtype = jnp.dtype(dtype)
    if b is not None:
        b = b.astype(dtype)
    if cifg:
        # Drop the input-gate block: the rest stays exactly as drawn for the plain LSTM.
        w_ih, w_hh = w_ih[:, hidden:], w_hh[:, hidden:]
        b = None if b is None else b[hidden:]
    gates = 3 if cifg else 4
    w_peep = jnp.zeros((gates - 1, hidden), dtype) if peephole else None
    ln = dict(
        ln_x_scale=jnp.ones((gates * hidden,), dtype),
        ln_h_scale=jnp.ones((gates * hidden,), dtype),
        ln_c_scale=jnp.ones((hidden,), dtype),
        ln_c_bias=jnp.zeros((hidden,), dtype),
    ) if layer_norm else {}
    return p._replace(w_ih=w_ih, w_hh=w_hh, b=b, w_peep=w_peep, **ln)
