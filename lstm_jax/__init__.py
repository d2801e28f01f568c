"""lstm_jax: a functional LSTM for JAX with torch.nn.LSTM semantics.

Pure functions over NamedTuple parameters: :func:`init_lstm` draws them, :func:`lstm_cell`
runs one step, :func:`lstm` runs stacked and bidirectional layers over time with
``jax.lax.scan``; :func:`from_torch` and :func:`to_torch` exchange weights with PyTorch.
Gate order i, f, g, o; state ``LSTMState(h, c)``.
"""

from lstm_jax._cell import lstm_cell as lstm_cell
from lstm_jax._host_memory import steady_malloc as keep_freed_memory
from lstm_jax._cell import variant_step as variant_step
from lstm_jax._interop import from_torch as from_torch
from lstm_jax._interop import to_torch as to_torch
from lstm_jax._lstm import default_unroll as default_unroll
from lstm_jax._lstm import lstm as lstm
from lstm_jax._params import LSTMCellParams as LSTMCellParams
from lstm_jax._params import LSTMParams as LSTMParams
from lstm_jax._params import LSTMState as LSTMState
from lstm_jax._params import init_lstm as init_lstm

__version__ = "0.1.0"

__all__ = [
    "LSTMCellParams",
    "LSTMParams",
    "LSTMState",
    "default_unroll",
    "from_torch",
    "init_lstm",
    "keep_freed_memory",
    "lstm",
    "lstm_cell",
    "to_torch",
    "variant_step",
]
