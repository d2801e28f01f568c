"""Which backend runs an LSTM call: ``"scan"``, ``"pallas"``, ``"cudnn"`` or ``"cpu"``.

``choose_backend("auto", ...)`` looks up the measured shape nearest to the call (by batch and
hidden size) in the platform's table, :data:`MEASURED_GPU` on an NVIDIA GPU and
:data:`MEASURED_CPU` on CPU, and takes the fastest backend measured there among those that
can run the call; a backend with no measurement at that shape is never picked, so
``"scan"`` is the fallback everywhere (and the only choice on TPU).

An explicit ``"pallas"``, ``"cudnn"`` or ``"cpu"`` that cannot run the call raises a
ValueError that says why, rather than silently running something else.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from lstm_jax.kernels import pallas_lstm

BACKENDS = ("auto", "scan", "pallas", "cudnn", "cpu")
# Forward+backward time of one layer relative to torch.nn.LSTM (oneDNN) measured in the same
# process on the 2-core AMD EPYC benchmark VM (jax 0.10.2, torch 2.13.0), keyed by (batch,
# steps, input_size, hidden). "cpu" is the C++ kernel (threads split the hidden units of one
# sequence, or take whole problems; from batch 4 the input product runs inside it), "scan"
# the lax.scan loop. The first seven rows are from benchmarks/results/cpu-2core-amd-epyc.md
# (2026-11-27 10:18 UTC), the rest from a run of those two and torch at 10:37 UTC
# (benchmarks/cpu-notes.md, where 128,50,512,512 read 1.12 / 1.06 and 32,100,128,256
# 1.30 / 0.97: ratios move by ~5% between runs); the last four from a run at 12:47 UTC with
# the weight gradients in the kernel (benchmarks/cpu-notes.md). The kernel won everywhere
# but at 256 x 1024, a tie (1050 ms each), where the scan stays. On the same VM size as a
# Cascade Lake Xeon (benchmarks/results/cpu-2core-intel-xeon.md; more runs in the notes) the kernel
# also beat the scan at every shape it timed (e.g. 32,100,128,256 0.69-1.07 against
# 0.98-1.41, 8,1000,128,256 0.87 against 1.39), so the same table serves both.
# With remat=True the C++ kernel runs one call per chunk of ~2 sqrt(T) steps
# (cpu_native.cpu_remat_layer), each packing W again and forming its team of threads again.
# fwd+bwd against the scan's remat, in-process medians on the 2-core benchmark VM
# (2026-11-27, benchmarks/cpu-notes.md): 4,1000,32,128 0.68, 8,10000,128,256 0.69,
# 2,500,64,256 0.72, 32,100,128,256 0.74, 16,500,128,128 0.78, 128,50,512,512 0.96; at batch
# 1 1,1000,32,128 0.78 and 1,1000,32,256 0.73, but 1,500,64,512 1.17 and 1,200,64,1024 1.33:
# there a step streams W from memory and a chunk's steps do not pay for packing it again.
# So `auto` keeps the scan for remat below batch 4 from H = 512.
REMAT_SMALL_BATCH, REMAT_WIDE_HIDDEN = 4, 512
MEASURED_CPU: dict[tuple[int, int, int, int], dict[str, float]] = {
    (1, 500, 64, 64): {"scan": 0.78, "cpu": 0.48},
    (1, 1000, 32, 128): {"scan": 0.96, "cpu": 0.54},
    (4, 1000, 32, 128): {"scan": 0.65, "cpu": 0.37},
    (8, 1000, 128, 256): {"scan": 1.05, "cpu": 0.73},
    (16, 500, 128, 128): {"scan": 0.94, "cpu": 0.67},
    (32, 100, 128, 256): {"scan": 1.22, "cpu": 0.92},
    (128, 50, 512, 512): {"scan": 1.15, "cpu": 1.05},
    (1, 500, 64, 512): {"scan": 1.02, "cpu": 0.79},
    (8, 200, 128, 512): {"scan": 1.06, "cpu": 0.91},
    (64, 100, 128, 128): {"scan": 1.31, "cpu": 0.96},
    (64, 100, 128, 256): {"scan": 1.28, "cpu": 1.03},
    (128, 100, 128, 128): {"scan": 1.38, "cpu": 1.01},
    (1, 200, 64, 1024): {"scan": 1.30, "cpu": 0.99},
    (4, 200, 128, 1024): {"scan": 1.57, "cpu": 0.98},
    (32, 100, 64, 512): {"scan": 1.22, "cpu": 1.06},
    (64, 100, 64, 512): {"scan": 1.17, "cpu": 1.03},  # configs/charlm.yaml's layer
    (256, 50, 256, 256): {"scan": 1.12, "cpu": 1.01},
    (256, 20, 512, 1024): {"scan": 1.12, "cpu": 1.12},
    (8, 100, 512, 2048): {"scan": 1.07, "cpu": 0.74},
    (1, 200, 128, 2048): {"scan": 1.09, "cpu": 0.81},
}
_NVIDIA = ("gpu", "cuda")

# Forward+backward time of one layer relative to torch.nn.LSTM (cuDNN, float32) measured in
# the same process on an H100 (2026-11-26, jax 0.11.2, torch 2.11, each library's default
# precision; benchmarks/results/nvidia-h100-80gb-hbm3.md from scripts/gpu_session.sh),
# keyed by (batch, steps, input_size, hidden). "scan" is the lax.scan loop with the custom
# backward at the default unroll, "pallas" the persistent kernel with tensor-core products
# (bfloat16 at H=128, where float32 does not fit on chip), "pallas-fma" the same kernel with
# W_hh in registers (product="fma"; not measured yet, so never picked), "cudnn"
# jax.experimental.rnn. Lower is faster.
MEASURED_GPU: dict[tuple[int, int, int, int], dict[str, float]] = {
    (1, 500, 64, 64): {"scan": 4.61, "pallas": 2.37, "cudnn": 15.33},
    (16, 500, 128, 128): {"scan": 2.25, "pallas": 1.66, "cudnn": 7.21},
    (8, 1000, 128, 256): {"scan": 0.35, "cudnn": 1.12},
    (64, 100, 256, 256): {"scan": 0.38, "cudnn": 0.80},
    (32, 200, 512, 512): {"scan": 0.35, "cudnn": 0.94},
    (256, 100, 1024, 1024): {"scan": 0.91, "cudnn": 1.07},
}


def _is_float(dtype, *names) -> bool:
    return jnp.dtype(dtype) in tuple(jnp.dtype(n) for n in names)


def pallas_unsupported_reason(*, platform: str, hidden: int, proj: int, dtype,
                              has_variants: bool = False, remat: bool = False,
                              interpret: bool = False) -> str | None:
    """Why the Pallas kernel cannot run this call, or None when it can."""
    if platform not in _NVIDIA and not interpret:
        return (f"the Pallas LSTM kernel compiles only for NVIDIA GPUs (platform is {platform!r});"
                " elsewhere it runs only in interpret mode, for tests")
    if proj:
        return "the Pallas LSTM kernel has no projection (proj_size) support"
    if has_variants:
        return "the Pallas LSTM kernel implements only the plain LSTM cell, not the variants"
    if remat:
        return "the Pallas LSTM kernel keeps all gate activations; remat=True needs the scan"
    if not _is_float(dtype, jnp.float32, jnp.bfloat16):
        return f"the Pallas LSTM kernel supports float32 and bfloat16, not {jnp.dtype(dtype)}"
    if not interpret and not pallas_lstm.fits_on_chip(hidden, dtype):
        return (f"W_hh of hidden size {hidden} in {jnp.dtype(dtype)} is above the Pallas "
                f"kernel's on-chip limit of {pallas_lstm.MAX_WEIGHT_BYTES // 1024} KiB "
                "(float32 H <= 64, bfloat16 H <= 128)")
    return None


def cudnn_unsupported_reason(*, platform: str, proj: int, dtype, has_variants: bool = False,
                             remat: bool = False, dropout_active: bool = False) -> str | None:
    """Why the cuDNN path cannot run this call, or None when it can."""
    if platform not in _NVIDIA:
        return f"cuDNN runs only on NVIDIA GPUs (platform is {platform!r})"
    if proj:
        return "jax.experimental.rnn has no projection (proj_size) support"
    if has_variants:
        return "cuDNN implements only the plain LSTM cell, not the variants"
    if not _is_float(dtype, jnp.float32):
        return f"jax.experimental.rnn supports float32 only, not {jnp.dtype(dtype)}"
    if remat:
        return "cuDNN keeps its own reserve space; remat=True needs the scan"
    if dropout_active:
        return "inter-layer dropout is drawn from our key, which cuDNN cannot reproduce"
    if not _cudnn_available():
        return "this jaxlib has no cuDNN RNN kernels (not a CUDA build)"
    return None


def cpu_unsupported_reason(*, platform: str, dtype, has_variants: bool = False,
                           build: bool = True) -> str | None:
    """Why the C++ CPU kernel cannot run this call, or None when it can.

    With ``build`` (the default) the kernel is compiled if no cached build exists, so that a
    machine without a working compiler is told here.
    """
    if platform != "cpu":
        return f"the C++ LSTM kernel runs only on CPU (platform is {platform!r})"
    if has_variants:
        return "the C++ LSTM kernel implements only the plain LSTM cell, not the variants"
    if not _is_float(dtype, jnp.float32):
        return f"the C++ LSTM kernel supports float32 only, not {jnp.dtype(dtype)}"
    if build:
        from lstm_jax.kernels import cpu_native

        return cpu_native.unavailable_reason()
    return None


def _cudnn_available() -> bool:
    from lstm_jax.kernels.cudnn import cudnn_available

    return cudnn_available()


def _nearest(batch: int, hidden: int, table):
    def distance(key):
        b, _, _, h = key
        return abs(math.log2(max(batch, 1) / b)) + abs(math.log2(max(hidden, 1) / h))

    return min(table, key=distance) if table else None


def _pallas_times(measured: dict, hidden: int) -> dict[str, float]:
    """The measured Pallas variants that apply at this hidden size: {"mma"|"fma": time}."""
    times = {}
    if "pallas" in measured:
        times["mma"] = measured["pallas"]
    if "pallas-fma" in measured and pallas_lstm.fma_fits(hidden):
        times["fma"] = measured["pallas-fma"]
    return times


def pallas_product(*, batch: int, hidden: int, table: dict | None = None) -> str:
    """How the Pallas kernel runs its per-step products for this call: ``"mma"`` or ``"fma"``.

    The variant measured faster at the nearest measured shape; ``"mma"`` (tensor cores, the
    measured default) where nothing says otherwise.
    """
    table = MEASURED_GPU if table is None else table
    key = _nearest(batch, hidden, table)
    times = _pallas_times(table[key], hidden) if key is not None else {}
    return min(times, key=times.get) if times else "mma"


def choose_backend(
    backend: str = "auto",
    *,
    platform: str,
    batch: int,
    hidden: int,
    proj: int = 0,
    dtype=jnp.float32,
    has_variants: bool = False,
    remat: bool = False,
    dropout_active: bool = False,
    custom_grad: bool = True,
    interpret: bool = False,
    table: dict | None = None,
) -> str:
    """Resolves ``backend`` to ``"scan"``, ``"pallas"``, ``"cudnn"`` or ``"cpu"`` for one call.

    Args:
      backend: ``"auto"``, ``"scan"``, ``"pallas"``, ``"cudnn"`` or ``"cpu"``.
      platform: ``jax.default_backend()`` (or the platform of the inputs' device).
      batch, hidden: B and H of the call.
      proj: ``proj_size`` (0 without projection).
      dtype: compute dtype of the recurrent products (float32, or bfloat16 for mixed
        precision).
      has_variants: a research variant (peephole, layer norm, CIFG, zoneout, recurrent
        dropout...) is active: only the scan implements them.
      remat: rematerialisation was requested (the scan and the CPU kernel have it).
      dropout_active: inter-layer dropout with a key (cuDNN cannot reproduce our mask).
      custom_grad: False asks for autodiff of the scan (a reference): "auto" gives "scan".
      interpret: allow "pallas" off-GPU in interpret mode (tests only).
      table: measurements to choose from; :data:`MEASURED_GPU` (NVIDIA GPU) or
        :data:`MEASURED_CPU` (CPU) when None.

    Returns:
      The backend to run.

    Raises:
      ValueError: for an unknown name, or an explicit backend that cannot run the call.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    pallas_reason = pallas_unsupported_reason(
        platform=platform, hidden=hidden, proj=proj, dtype=dtype, has_variants=has_variants,
        remat=remat, interpret=interpret)
    if backend == "scan":
        return "scan"
    if backend == "pallas":
        if pallas_reason:
            raise ValueError(f'backend="pallas" cannot run this call: {pallas_reason}')
        return "pallas"
    cudnn_reason = cudnn_unsupported_reason(
        platform=platform, proj=proj, dtype=dtype, has_variants=has_variants, remat=remat,
        dropout_active=dropout_active)
    if backend == "cudnn":
        if cudnn_reason:
            raise ValueError(f'backend="cudnn" cannot run this call: {cudnn_reason}')
        return "cudnn"
    if backend == "cpu":
        reason = cpu_unsupported_reason(platform=platform, dtype=dtype,
                                        has_variants=has_variants)
        if reason:
            raise ValueError(f'backend="cpu" cannot run this call: {reason}')
        return "cpu"

    # auto
    if not custom_grad:
        return "scan"
    if platform == "cpu":
        return _auto_cpu(batch, hidden, dtype, has_variants, remat,
                         MEASURED_CPU if table is None else table)
    if platform not in _NVIDIA:
        return "scan"
    table = MEASURED_GPU if table is None else table
    key = _nearest(batch, hidden, table)
    if key is None:
        return "scan"
    measured = dict(table[key])
    pallas_times = _pallas_times(measured, hidden)
    if pallas_times:
        measured["pallas"] = min(pallas_times.values())
    candidates = {"scan": True, "pallas": pallas_reason is None,
                  "cudnn": cudnn_reason is None}
    timed = {name: measured[name] for name, ok in candidates.items() if ok and name in measured}
    if not timed:
        return "scan"
    return min(timed, key=timed.get)


def _auto_cpu(batch, hidden, dtype, has_variants, remat, table) -> str:
    """"cpu" where the C++ kernel measured faster at the nearest shape and can run the call.

    Only inside the measured range where it won: a batch or hidden size above every shape
    at which the kernel beat the scan keeps the scan (the nearest-shape rule alone would send
    1 x 4096 to the kernel on the strength of 1 x 1024).
    """
    wins = [key for key, times in table.items()
            if "cpu" in times and times["cpu"] < times.get("scan", float("inf"))]
    if not wins or batch > max(b for b, *_ in wins) or hidden > max(k[3] for k in wins):
        return "scan"
    if remat and batch < REMAT_SMALL_BATCH and hidden >= REMAT_WIDE_HIDDEN:
        return "scan"
    key = _nearest(batch, hidden, table)
    measured = table[key]
    if "cpu" not in measured or measured["cpu"] >= measured.get("scan", float("inf")):
        return "scan"
    # Checked last: the first use on a machine compiles the kernel.
    reason = cpu_unsupported_reason(platform="cpu", dtype=dtype, has_variants=has_variants)
    return "cpu" if reason is None else "scan"
