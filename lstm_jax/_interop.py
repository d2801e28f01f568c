"""Weight exchange with ``torch.nn.LSTM`` (no torch import needed).

torch stores ``weight_ih_l{k}{suffix}: (4H, in)``, ``weight_hh_l{k}{suffix}: (4H, H_out)``,
two biases ``bias_ih``/``bias_hh: (4H,)`` and, with ``proj_size``, ``weight_hr: (H_out, H)``;
``suffix`` is ``""`` or ``"_reverse"``. Its gate order is ours (i, f, g, o), so conversion is
a transpose and the sum of the two biases.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from lstm_jax._params import LSTMCellParams, LSTMParams

_KEY = re.compile(r"^(weight_ih|weight_hh|weight_hr|bias_ih|bias_hh)_l(\d+)(_reverse)?$")


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # torch has no NumPy bfloat16: go via float32
            return value.float().numpy().astype(jnp.bfloat16)
        value = value.numpy()
    return np.asarray(value)


def _for_torch(value) -> np.ndarray:
    """A new array torch.from_numpy reads: bfloat16 (NumPy holds it as ml_dtypes) as float32."""
    a = np.asarray(value)
    return np.array(a, np.float32 if a.dtype == jnp.bfloat16 else a.dtype)


def from_torch(state_dict: Mapping, dtype=None) -> LSTMParams:
    """Converts a ``torch.nn.LSTM.state_dict()`` (tensors or NumPy arrays) to :class:`LSTMParams`.

    The structure (layers, directions, projection, bias) is read from the keys; torch's two
    biases are summed into one. Keys of a wrapping module (``"lstm.weight_ih_l0"``) are
    accepted if every key shares the prefix.

    Args:
      state_dict: mapping of torch's parameter names to arrays (bfloat16 tensors too).
      dtype: dtype of the returned arrays; defaults to that of the inputs.

    Example:
      >>> params = from_torch(torch.nn.LSTM(3, 5, num_layers=2).state_dict())
    """
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError("state_dict must be a non-empty mapping of torch.nn.LSTM parameter names")
    prefixes = {k.rsplit(".", 1)[0] if "." in k else "" for k in state_dict}
    if len(prefixes) != 1:
        raise ValueError(f"state_dict mixes modules {sorted(prefixes)}: pass one LSTM's parameters")
    arrays: dict[tuple[str, int, int], np.ndarray] = {}
    for name, value in state_dict.items():
        short = name.rsplit(".", 1)[-1]
        match = _KEY.match(short)
        if match is None:
            raise ValueError(
                f"unexpected key {name!r} in state_dict: expected torch.nn.LSTM names such as "
                "'weight_ih_l0', 'weight_hh_l0_reverse', 'bias_ih_l1', 'weight_hr_l0'"
            )
        kind, layer, reverse = match.group(1), int(match.group(2)), int(bool(match.group(3)))
        arrays[(kind, layer, reverse)] = _to_numpy(value)

    num_layers = 1 + max(layer for _, layer, _ in arrays)
    num_dirs = 1 + max(d for _, _, d in arrays)
    has_bias = any(kind.startswith("bias") for kind, _, _ in arrays)
    has_proj = any(kind == "weight_hr" for kind, _, _ in arrays)
    kinds = ["weight_ih", "weight_hh"] + ["bias_ih", "bias_hh"] * has_bias + ["weight_hr"] * has_proj
    missing = [
        f"{kind}_l{layer}{'_reverse' if d else ''}"
        for layer in range(num_layers)
        for d in range(num_dirs)
        for kind in kinds
        if (kind, layer, d) not in arrays
    ]
    if missing:
        raise ValueError(f"state_dict is missing keys {missing}")

    w_hh0 = arrays[("weight_hh", 0, 0)]
    if w_hh0.ndim != 2 or w_hh0.shape[0] % 4:
        raise ValueError(f"weight_hh_l0 has shape {w_hh0.shape}, expected (4 * hidden_size, H_out)")
    H = w_hh0.shape[0] // 4
    H_out = arrays[("weight_hr", 0, 0)].shape[0] if has_proj else H
    input_size = arrays[("weight_ih", 0, 0)].shape[1]

    def get(kind, layer, d, shape):
        a = arrays[(kind, layer, d)]
        if a.shape != shape:
            suffix = "_reverse" if d else ""
            raise ValueError(f"{kind}_l{layer}{suffix} has shape {a.shape}, expected {shape}")
        return jnp.asarray(a, dtype=dtype)

    layers = []
    for layer in range(num_layers):
        in_size = input_size if layer == 0 else num_dirs * H_out
        directions = []
        for d in range(num_dirs):
            b = None
            if has_bias:
                b = get("bias_ih", layer, d, (4 * H,)) + get("bias_hh", layer, d, (4 * H,))
            w_hr = get("weight_hr", layer, d, (H_out, H)).T if has_proj else None
            directions.append(
                LSTMCellParams(
                    w_ih=get("weight_ih", layer, d, (4 * H, in_size)).T,
                    w_hh=get("weight_hh", layer, d, (4 * H, H_out)).T,
                    b=b,
                    w_hr=w_hr,
                )
            )
        layers.append(tuple(directions))
    return LSTMParams(layers=tuple(layers))


def to_torch(params: LSTMParams) -> dict[str, np.ndarray]:
    """Converts :class:`LSTMParams` to torch.nn.LSTM's parameter names and layouts.

    The combined bias goes to ``bias_ih`` and ``bias_hh`` is zero. bfloat16 parameters come
    back as float32 arrays (exactly: NumPy's bfloat16 is not one torch reads), which
    ``load_state_dict`` copies into a bfloat16 module as they are. It wants tensors::

        module.load_state_dict({k: torch.from_numpy(v) for k, v in to_torch(params).items()})
    """
    if not isinstance(params, LSTMParams):
        raise ValueError(f"params must be LSTMParams, got {type(params).__name__}")
    out: dict[str, np.ndarray] = {}
    for layer, directions in enumerate(params.layers):
        for d, p in enumerate(directions):
            extra = [name for name in p._fields[4:] if getattr(p, name) is not None]
            if extra:
                raise ValueError(
                    f"layer {layer} has parameters torch.nn.LSTM cannot represent: {extra} "
                    "(peephole or layer-norm weights of a research variant)"
                )
            if p.cifg:
                raise ValueError(
                    f"layer {layer} is a coupled input-forget gate (CIFG) LSTM with 3 gate "
                    "blocks: torch.nn.LSTM cannot represent it"
                )
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            out["weight_ih" + suffix] = _for_torch(p.w_ih.T)
            out["weight_hh" + suffix] = _for_torch(p.w_hh.T)
            if p.b is not None:
                out["bias_ih" + suffix] = _for_torch(p.b)
                out["bias_hh" + suffix] = np.zeros_like(out["bias_ih" + suffix])
            if p.w_hr is not None:
                out["weight_hr" + suffix] = _for_torch(p.w_hr.T)
    return out
