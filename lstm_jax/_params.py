"""Parameter containers and initialisation for the functional LSTM.

Weights are stored input-major so that the hot products are ``x @ W`` with no transpose:

* ``w_ih``: (input_size, 4H) -- gate blocks in the order i, f, g, o (as torch.nn.LSTM);
* ``w_hh``: (H_out, 4H) where H_out = proj_size or hidden_size;
* ``b``:    (4H,) or None -- one combined bias (torch's ``b_ih + b_hh``);
* ``w_hr``: (H, H_out) or None -- the output projection of Sak et al. 2014 (torch's ``proj_size``).

The structure of the pytree alone says how many layers there are, whether the LSTM is
bidirectional, projected and biased, so :func:`lstm_jax.lstm` takes no argument that could
disagree with it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

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
    """Weights of one layer in one direction (gate order i, f, g, o)."""

    w_ih: Array
    w_hh: Array
    b: Array | None = None
    w_hr: Array | None = None

    @property
    def input_size(self) -> int:
        return self.w_ih.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w_ih.shape[1] // 4

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
            directions.append(LSTMCellParams(w_ih=w_ih, w_hh=w_hh, b=b, w_hr=w_hr))
        layers.append(tuple(directions))
    return LSTMParams(layers=tuple(layers))
