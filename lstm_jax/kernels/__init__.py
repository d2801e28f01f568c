"""Optional LSTM backends, chosen by the core; a kernel never owns parameters.

* :func:`pallas_recurrence`: a persistent Pallas kernel for one layer's time loop (GPU via
  Triton; any platform with ``interpret=True``), same contract as the scan recurrence.
* :func:`cudnn_lstm`: the whole stack through ``jax.experimental.rnn`` (cuDNN; GPU, float32,
  no projection).
* :func:`cpu_recurrence`: a C++ kernel for one layer's time loop on CPU through XLA's FFI,
  compiled on first use with the host's compiler, same contract as the scan recurrence;
  :func:`cpu_layer` the same with the input product inside (what ``backend="cpu"`` runs),
  :func:`cpu_remat_layer` that rematerialised chunk by chunk (``remat=True``).
* :func:`choose_backend`: picks ``"scan"``, ``"pallas"``, ``"cudnn"`` or ``"cpu"`` per
  platform and shape (:data:`BACKENDS` names them); :func:`pallas_product` picks the Pallas
  kernel's tensor-core (``"mma"``) or register (``"fma"``) products.
* :func:`fits_on_chip` says whether W_hh stays on chip in the Pallas kernel;
  :func:`to_cudnn_weights` converts parameters to cuDNN's flat layout.
"""

from lstm_jax.kernels.cpu_native import cpu_layer as cpu_layer
from lstm_jax.kernels.cpu_native import cpu_remat_layer as cpu_remat_layer
from lstm_jax.kernels.cpu_native import kernel_remat_chunk as kernel_remat_chunk
from lstm_jax.kernels.cpu_native import cpu_recurrence as cpu_recurrence
from lstm_jax.kernels.cudnn import cudnn_lstm as cudnn_lstm
from lstm_jax.kernels.cudnn import to_cudnn_weights as to_cudnn_weights
from lstm_jax.kernels.pallas_lstm import fits_on_chip as fits_on_chip
from lstm_jax.kernels.pallas_lstm import pallas_recurrence as pallas_recurrence
from lstm_jax.kernels.select import BACKENDS as BACKENDS
from lstm_jax.kernels.select import choose_backend as choose_backend
from lstm_jax.kernels.select import pallas_product as pallas_product

__all__ = [
    "BACKENDS",
    "choose_backend",
    "cpu_layer",
    "cpu_remat_layer",
    "cpu_recurrence",
    "cudnn_lstm",
    "fits_on_chip",
    "kernel_remat_chunk",
    "pallas_product",
    "pallas_recurrence",
    "to_cudnn_weights",
]
