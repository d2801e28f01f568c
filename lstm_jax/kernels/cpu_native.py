"""A C++ LSTM recurrence for CPU, called through XLA's FFI (``jax.ffi``).

At small batch a CPU LSTM step is a few tens of thousands of multiply-adds, and a
``lax.scan`` spends most of each step dispatching XLA's per-operation thunks (about 8 per
forward step and 14 per backward step, 0.4-0.7 us each on the 2-core benchmark machine:
``benchmarks/cpu-notes.md``). ``cpu_lstm.cc`` runs the whole time loop of one layer in one
call instead: per step one register-blocked product ``h @ W_hh`` and the fused gate math,
nothing in between. It is the CPU counterpart of the persistent Pallas kernel.

Same contract as :func:`lstm_jax._recurrence.recurrence` (gate order i, f, g, o; masked
steps carry the state and output zero; ``proj_size`` projections included) and the same
backward design: the kernel's backward walks time in reverse carrying ``(dh, dc)`` and emits
``dz_t``; after the loop a second call forms ``dW_hh`` (with ``dW_ih`` and ``db``, see
:func:`weight_grads`) as one packed product over all steps, ``dW_hr`` is an XLA product, and
the gradient of ``xw`` is ``dz`` itself. :func:`cpu_layer`, what
``lstm(..., backend="cpu")`` runs, hands the kernel the layer input instead of ``xw``: from
batch 4 each step forms ``x_t @ W_ih`` itself, from batch 16 the backward loop forms ``dx_t``
too.
Threads come from XLA's own CPU pool: several problems (``vmap``, the two directions of a
bidirectional layer) run one per thread with no synchronisation; a single sequence large
enough is split by hidden units between two or more threads (each keeps its share of
``W_hh`` in its core's cache), which exchange ``h`` (or ``dz``) once per step through a
barrier. The calling thread starts at once; a helper thread joins at the first step boundary
after it arrives.

The kernel is compiled on first use with the host's C++ compiler (``$CXX``, else ``c++`` or
``g++`` from the PATH; ``-O3 -march=native``) against the FFI headers that jaxlib ships, and
cached under ``$LSTM_JAX_CACHE_DIR`` (default ``$XDG_CACHE_HOME/lstm_jax``, i.e.
``~/.cache/lstm_jax``), keyed by the source, the compiler, jaxlib and the CPU. Where no
compiler works, or ``$LSTM_JAX_CPU_KERNEL=0``, :func:`unavailable_reason` says why and
``backend="auto"`` keeps the scan.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax._cell import input_product, matmul
from lstm_jax._recurrence import projection_grad, remat_chunk

Array = jax.Array

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_lstm.cc")
# Set to 0 to keep backend="auto" off the kernel (an escape hatch; "cpu" then refuses too).
ENABLE_VARIABLE = "LSTM_JAX_CPU_KERNEL"
_TARGETS = {
    "lstm_jax_cpu_train_forward": "LstmJaxTrainForward",
    "lstm_jax_cpu_infer_forward": "LstmJaxInferForward",
    "lstm_jax_cpu_backward": "LstmJaxBackward",
    "lstm_jax_cpu_weight_grad": "LstmJaxWeightGrad",
}
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$LSTM_JAX_CACHE_DIR`` or ``~/.cache/lstm_jax``."""
    root = os.environ.get("LSTM_JAX_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lstm_jax"


def _compiler() -> list[str] | None:
    """The C++ compiler command: ``$CXX`` (which may carry a wrapper, e.g. ``ccache g++``),
    else ``c++`` or ``g++`` from the PATH."""
    cxx = os.environ.get("CXX", "").strip()
    if cxx:
        return shlex.split(cxx)
    found = shutil.which("c++") or shutil.which("g++")
    return [found] if found else None


def _cpu_signature() -> str:
    """The CPU's model and instruction-set flags (``-march=native`` code is only valid there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: the best description the standard library has
        return " ".join(platform.uname()) + " " + platform.processor()
    keep = [line for line in text.splitlines()
            if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(sorted(set(keep)))


def _compiler_version(cxx: list[str]) -> str:
    try:
        return subprocess.run([*cxx, "--version"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def library_path(cxx: list[str] | str) -> Path:
    """The cached shared library for this source, compiler, jaxlib and CPU."""
    import jaxlib

    cxx = shlex.split(cxx) if isinstance(cxx, str) else cxx
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(_FLAGS).encode(), " ".join(cxx).encode(),
                 _compiler_version(cxx).encode(), jaxlib.__version__.encode(),
                 platform.machine().encode(), _cpu_signature().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"cpu_lstm-{key.hexdigest()[:20]}.so"


def build(cxx: list[str] | str, target: Path) -> None:
    """Compiles ``cpu_lstm.cc`` with ``cxx`` into ``target``; RuntimeError with the compiler's
    message if that fails (``target`` is then left untouched)."""
    cxx = shlex.split(cxx) if isinstance(cxx, str) else cxx
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [*cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as err:
            raise RuntimeError(f"running {' '.join(cxx)} failed: {err}") from err
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        # mkstemp made the file private; a shared cache needs it readable as the umask allows.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _load() -> str | None:
    """Builds (once per machine) and registers the kernel; returns why it cannot, or None."""
    if os.environ.get(ENABLE_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"disabled by ${ENABLE_VARIABLE}={os.environ[ENABLE_VARIABLE]}"
    cxx = _compiler()
    if cxx is None:
        return "no C++ compiler found (set $CXX, or install g++ or clang++)"
    try:
        path = library_path(cxx)
        if not path.exists():
            log.info("compiling the CPU LSTM kernel into %s (once per machine)", path)
            build(cxx, path)
        try:
            lib = _open(path)
        except (OSError, AttributeError):
            # A cached file that does not load (truncated, another build's): build it again.
            build(cxx, path)
            lib = _open(path)
        for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except Exception as err:  # noqa: BLE001 - any failure means "no kernel here", said once
        return f"building the CPU kernel failed: {err}"
    return None


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for symbol in _TARGETS.values():
        getattr(lib, symbol)  # AttributeError if the file is not this kernel
    return lib


def unavailable_reason() -> str | None:
    """Why the CPU kernel cannot be used on this machine (no compiler, failed build), or None.

    The first call compiles the kernel (a few seconds) unless a cached build exists.
    """
    return _load()


def default_threads() -> int:
    """Threads the kernel may use: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _require_kernel():
    reason = _load()
    if reason is not None:
        raise RuntimeError(f'backend="cpu" is unavailable: {reason}')


def _ffi(name, results, aliases=None):
    """The kernel's FFI target ``name`` as a JAX function (vmapped problems are leading axes)."""
    return jax.ffi.ffi_call(name, results, vmap_method="broadcast_all",
                            input_output_aliases=aliases)


def _call(name, results, *args, config, has_mask, has_proj, has_input, aliases=None):
    _require_kernel()
    threads, grace_us, join_step = config
    return _ffi(name, results, aliases)(
        *args, threads=np.int64(threads), grace_us=np.int64(grace_us),
        join_step=np.int64(join_step), has_mask=bool(has_mask), has_proj=bool(has_proj),
        has_input=bool(has_input))


def _mask_arg(mask):
    # The kernel ignores the buffer when has_mask is false; a (1, 1) placeholder keeps the
    # call's signature fixed (likewise w_hr without a projection, w_ih without has_input).
    return jnp.ones((1, 1), bool) if mask is None else mask


def _bias_arg(b, four_h):
    return jnp.zeros((four_h,), jnp.float32) if b is None else b


def _weight_arg(w):
    return jnp.zeros((1, 1), jnp.float32) if w is None else w


def _flags(mask, w_hr, w_ih):
    return {"has_mask": mask is not None, "has_proj": w_hr is not None,
            "has_input": w_ih is not None}


# Smallest batch at which the kernel forms x_t @ W_ih itself, and dx_t = dz_t @ W_ih^T in the
# backward loop. Below, one XLA product over all steps does it faster: a step's product
# then has too few rows to pay for streaming W_ih once per step. In-process A/B (2-core
# benchmark machine, fwd+bwd against the input product outside): batch 1 +10-14% slower
# inside; batch 4 6% faster (dx inside: 1% slower); batch 16 4-5% faster; batch 32 and
# 128 2% faster (forward alone 8-22% faster from batch 4 on).
FUSE_INPUT_MIN_BATCH = 4
KERNEL_DX_MIN_BATCH = 16


def _forward(config, first, w_ih, w_hh, w_hr, h0, c0, mask, b, save):
    """The forward call: ``first`` is xw (T, B, 4H), or with ``w_ih`` the layer input x."""
    steps, batch = first.shape[:2]
    out, four_h = w_hh.shape
    hidden = four_h // 4
    f32 = jnp.float32
    results = [jax.ShapeDtypeStruct((steps, batch, out), f32),
               jax.ShapeDtypeStruct((batch, out), f32),
               jax.ShapeDtypeStruct((batch, hidden), f32)]
    args = (first, _bias_arg(b, four_h), _weight_arg(w_ih), w_hh, _weight_arg(w_hr), h0, c0,
            _mask_arg(mask))
    flags = _flags(mask, w_hr, w_ih)
    if not save:
        return _call("lstm_jax_cpu_infer_forward", results, *args, config=config, **flags)
    results += [jax.ShapeDtypeStruct((steps, batch, four_h), f32),
                jax.ShapeDtypeStruct((steps, batch, hidden), f32)]
    # Given xw, the gate activations are written over it (each step reads its row before
    # writing it).
    return _call("lstm_jax_cpu_train_forward", results, *args, config=config,
                 aliases={0: 3} if w_ih is None else None, **flags)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cpu_loop(config, first, w_ih, w_hh, w_hr, h0, c0, mask, b):
    ys, h, c = _forward(config, first, w_ih, w_hh, w_hr, h0, c0, mask, b, save=False)
    return ys, (h, c)


def _cpu_loop_fwd(config, first, w_ih, w_hh, w_hr, h0, c0, mask, b):
    ys, h, c, acts, c_prev = _forward(config, first, w_ih, w_hh, w_hr, h0, c0, mask, b,
                                      save=True)
    x = None if w_ih is None else first  # xw itself is not needed
    return (ys, (h, c)), (x, w_ih, w_hh, w_hr, h0, mask, b, ys, acts, c_prev)


def weight_grads(config, x, h0, ys, dz, bias):
    """``(dW_ih, dW_hh, db)`` of a layer from its backward loop's ``dz: (T, B, 4H)``.

    With ``A_t = [x_t, h_{t-1}]`` (``h_{-1} = h0``, ``h_{t-1} = y_{t-1}`` elsewhere, which is
    the state wherever ``dz`` is non-zero), ``[dW_ih; dW_hh] = sum_t A_t^T dz_t`` and
    ``db = sum_t,b dz_t``: one product in the kernel over all ``(t, b)`` that reads ``x``,
    ``h0`` and ``ys`` in place. ``x=None`` gives ``dW_ih = None`` (the gradient of ``xw``
    is ``dz`` itself); ``bias=False`` gives ``db = None``. Shapes: ``x: (T, B, D)``,
    ``h0: (B, P)``, ``ys: (T, B, P)``, float32; leading dimensions (vmap) are problems of
    one call. ``config`` is the kernel's ``(threads, helper wait, join step)``; only the
    threads count here.
    """
    _require_kernel()
    f32 = jnp.float32
    four_h = dz.shape[-1]
    results = [jax.ShapeDtypeStruct((x.shape[-1], four_h) if x is not None else (1, 1), f32),
               jax.ShapeDtypeStruct((ys.shape[-1], four_h), f32),
               jax.ShapeDtypeStruct((four_h,) if bias else (1,), f32)]
    dw_ih, dw_hh, db = _ffi("lstm_jax_cpu_weight_grad", results)(
        _weight_arg(x), h0, ys, dz, threads=np.int64(config[0]), has_input=x is not None,
        has_bias=bool(bias))
    return (dw_ih if x is not None else None), dw_hh, (db if bias else None)


def _cpu_loop_bwd(config, residuals, cotangents):
    x, w_ih, w_hh, w_hr, h0, mask, b, ys, acts, c_prev = residuals
    dys, (dh_n, dc_n) = cotangents
    f32 = jnp.float32
    steps, batch, hidden = c_prev.shape
    out = w_hh.shape[0]
    # dh_t + dy_t for dW_hr, and dx: placeholders the kernel leaves alone without them.
    results = [jax.ShapeDtypeStruct(acts.shape, f32),
               jax.ShapeDtypeStruct((batch, out), f32),
               jax.ShapeDtypeStruct((batch, hidden), f32),
               jax.ShapeDtypeStruct((steps, batch, out) if w_hr is not None else (1, 1, 1), f32),
               jax.ShapeDtypeStruct(x.shape if x is not None else (1, 1, 1), f32)]
    kernel_dx = w_ih is not None and batch >= KERNEL_DX_MIN_BATCH
    if not kernel_dx:
        results[-1] = jax.ShapeDtypeStruct((1, 1, 1), f32)
    dz, dh0, dc0, dh_total, dx = _call(
        "lstm_jax_cpu_backward", results, _weight_arg(w_ih if kernel_dx else None), w_hh,
        _weight_arg(w_hr), acts, c_prev, dys.astype(f32), dh_n.astype(f32), dc_n.astype(f32),
        _mask_arg(mask), config=config, **_flags(mask, w_hr, w_ih if kernel_dx else None))
    if w_ih is not None and not kernel_dx:
        dx = matmul(dz, w_ih.T, f32)
    dw_ih, dw_hh, db = weight_grads(config, x, h0, ys, dz, bias=b is not None)
    dw_hr = None if w_hr is None else projection_grad(w_hr, acts, c_prev, dh_total, f32, None)
    if w_ih is None:  # the gradient of xw is dz itself
        return dz, None, dw_hh, dw_hr, dh0, dc0, None, db
    return dx, dw_ih, dw_hh, dw_hr, dh0, dc0, None, db


_cpu_loop.defvjp(_cpu_loop_fwd, _cpu_loop_bwd)


def _config(threads, helper_wait_us):
    threads = default_threads() if threads is None else int(threads)
    wait = 0 if helper_wait_us is None else max(0, int(helper_wait_us))
    return threads, wait, 0


def _check(first, w_ih, w_hh, w_hr, h0, c0, mask, b):
    """Shapes and dtypes, with the names the caller used."""
    steps, batch = first.shape[:2]
    four_h = w_hh.shape[-1] if w_hh.ndim == 2 else -1
    if four_h % 4 or four_h <= 0:
        raise ValueError(f"w_hh must have shape (P, 4H), got {w_hh.shape}")
    hidden = four_h // 4
    out = hidden if w_hr is None else w_hr.shape[-1]
    if w_hr is not None and (w_hr.ndim != 2 or w_hr.shape[0] != hidden):
        raise ValueError(f"w_hr has shape {w_hr.shape}, expected ({hidden}, P)")
    if w_hh.shape != (out, four_h):
        raise ValueError(f"w_hh has shape {w_hh.shape}, expected {(out, four_h)}")
    if w_ih is None and first.shape[-1] != four_h:
        raise ValueError(f"xw has shape {first.shape}, expected (T, B, {four_h}) for w_hh "
                         f"of shape {w_hh.shape}")
    expected = {"h0": (batch, out), "c0": (batch, hidden), "mask": (steps, batch),
                "b": (four_h,)}
    if w_ih is not None:
        expected["w_ih"] = (first.shape[-1], four_h)
    for name, a in (("h0", h0), ("c0", c0), ("mask", mask), ("b", b), ("w_ih", w_ih)):
        if a is not None and a.shape != expected[name]:
            raise ValueError(f"{name} has shape {a.shape}, expected {expected[name]}")
    first_name = "xw" if w_ih is None else "x"
    for name, a in ((first_name, first), ("w_ih", w_ih), ("w_hh", w_hh), ("w_hr", w_hr),
                    ("h0", h0), ("c0", c0), ("b", b)):
        if a is not None and a.dtype != jnp.float32:
            raise ValueError(f"the CPU kernel runs float32 only; {name} has dtype {a.dtype}")
    if mask is not None and mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be bool, got dtype {mask.dtype}")


def _check_layer(x, w_ih, w_hh, w_hr, h0, c0, mask, b):
    """:func:`_check` for a layer input ``x: (T, B, D)`` with ``w_ih``."""
    if x.ndim != 3:
        raise ValueError(f"x must have shape (T, B, D), got {x.shape}")
    if x.shape[-1] == 0:
        raise ValueError(f"x has no features: shape {x.shape}, expected (T, B, D) with D >= 1")
    _check(x, w_ih, w_hh, w_hr, h0, c0, mask, b)


def cpu_recurrence(
    xw: Array,
    w_hh: Array,
    w_hr: Array | None,
    h0: Array,
    c0: Array,
    mask: Array | None,
    b: Array | None = None,
    *,
    threads: int | None = None,
    helper_wait_us: int | None = None,
    precision=None,
) -> tuple[Array, tuple[Array, Array]]:
    """One LSTM layer over time in one C++ call: ``xw: (T, B, 4H)`` -> ``(ys, (h_T, c_T))``.

    A drop-in for :func:`lstm_jax._recurrence.recurrence` on CPU (same arguments after its
    static ones, same results and gradients within float tolerance)::

        h, c = h0, c0
        for t in range(T):                       # inside the kernel
            z = xw[t] + b + h @ w_hh             # gate order i, f, g, o
            i, f, o, g = sigmoid(z_i), sigmoid(z_f), sigmoid(z_o), tanh(z_g)
            c = f * c + i * g                    # carried only where mask[t]
            h = o * tanh(c)                      # times w_hr with a projection
            ys[t] = h if mask[t] else 0

    Args:
      xw: ``(T, B, 4H)`` float32 input pre-activations ``x @ w_ih``.
      w_hh: ``(P, 4H)`` float32 recurrent weight (P = H without a projection).
      w_hr: ``(H, P)`` float32 projection (``proj_size``, Sak et al. 2014) or None.
      h0: ``(B, P)`` and c0: ``(B, H)`` float32 initial state.
      mask: ``(T, B)`` bool or None; False steps keep the state and output zero. Each
        sequence's valid steps must come first (as ``lstm``'s ``seq_lengths`` make them):
        the weight gradient takes ``h_{t-1}`` from the previous step's output.
      b: ``(4H,)`` float32 bias added to ``xw`` inside the loop, or None.
      threads: at most this many threads split one sequence's hidden units or take whole
        vmapped problems; None: the CPUs this process may use (:func:`default_threads`).
        Also capped by the size of XLA's CPU thread pool, where the helpers come from.
      helper_wait_us: how long the calling thread waits for helper threads before its first
        step; None: not at all, it starts alone and helpers that arrive later join at the
        next step boundary.
      precision: ignored (the kernel's products are exact float32 sums); accepted for the
        common loop signature.

    Returns:
      ``(ys: (T, B, P), (h_T: (B, P), c_T: (B, H)))``.

    Example:
      >>> T, B, H = 5, 2, 8
      >>> xw = jnp.zeros((T, B, 4 * H)); w = jnp.zeros((H, 4 * H))
      >>> state = jnp.zeros((B, H))
      >>> ys, (h, c) = cpu_recurrence(xw, w, None, state, state, None)  # doctest: +SKIP
      >>> ys.shape  # doctest: +SKIP
      (5, 2, 8)
    """
    del precision
    if xw.ndim != 3:
        raise ValueError(f"xw must have shape (T, B, 4H), got {xw.shape}")
    _check(xw, None, w_hh, w_hr, h0, c0, mask, b)
    return _cpu_loop(_config(threads, helper_wait_us), xw, None, w_hh, w_hr, h0, c0, mask, b)


def cpu_layer(
    x: Array,
    w_ih: Array,
    w_hh: Array,
    w_hr: Array | None,
    h0: Array,
    c0: Array,
    mask: Array | None,
    b: Array | None = None,
    *,
    threads: int | None = None,
    helper_wait_us: int | None = None,
    precision=None,
) -> tuple[Array, tuple[Array, Array]]:
    """One LSTM layer over time in one C++ call, input product included: ``x: (T, B, D)``.

    :func:`cpu_recurrence` with ``xw = x @ w_ih`` formed inside the loop, step by step, by
    the same register-blocked products (from batch :data:`FUSE_INPUT_MIN_BATCH` on), and
    ``dx = dz @ w_ih^T`` inside the backward loop (from batch :data:`KERNEL_DX_MIN_BATCH`):
    no ``(T, B, 4H)`` array of input products is written and read back, and the products
    run at the kernel's rate. ``dW_ih = sum_t x_t^T dz_t`` is part of the one product after
    the loop that also forms ``dW_hh`` and ``db`` (:func:`weight_grads`).
    At smaller batches one XLA product over all steps forms ``xw`` (or ``dx``) faster.
    This is what ``lstm(..., backend="cpu")`` runs.

    Args:
      x: ``(T, B, D)`` float32 layer input (time-major).
      w_ih: ``(D, 4H)`` float32 input weight.
      Others as for :func:`cpu_recurrence`.

    Returns:
      ``(ys: (T, B, P), (h_T: (B, P), c_T: (B, H)))``.

    Example:
      >>> T, B, D, H = 5, 2, 3, 8
      >>> x = jnp.ones((T, B, D)); w_ih = jnp.zeros((D, 4 * H)); w = jnp.zeros((H, 4 * H))
      >>> state = jnp.zeros((B, H))
      >>> ys, (h, c) = cpu_layer(x, w_ih, w, None, state, state, None)  # doctest: +SKIP
      >>> ys.shape  # doctest: +SKIP
      (5, 2, 8)
    """
    del precision
    _check_layer(x, w_ih, w_hh, w_hr, h0, c0, mask, b)
    return _layer_loop(_config(threads, helper_wait_us), x, w_ih, w_hh, w_hr, h0, c0, mask, b)


def _layer_loop(config, x, w_ih, w_hh, w_hr, h0, c0, mask, b):
    """:func:`cpu_layer`'s dispatch after its checks: the input product inside the kernel
    from batch :data:`FUSE_INPUT_MIN_BATCH`, one XLA product before it below."""
    if x.shape[1] < FUSE_INPUT_MIN_BATCH:
        xw = input_product(x, w_ih, jnp.float32)
        return _cpu_loop(config, xw, None, w_hh, w_hr, h0, c0, mask, b)
    return _cpu_loop(config, x, w_ih, w_hh, w_hr, h0, c0, mask, b)


def kernel_remat_chunk(steps: int) -> int:
    """Steps per kernel call under remat: about twice the scan's sqrt(T), capped at T, and a
    divisor of T where one is near (:func:`lstm_jax._recurrence.remat_chunk`).

    Each call packs W and forms its team of threads again; twice as many steps per call
    (so half as many states kept, twice the activations of one chunk at a time) made
    ``jit(grad)`` of one layer 12-15% faster at 32,100,128,256, 4,1000,32,128 and
    8,2000,128,256 and 5% at 8,10000,128,256, for 0.4-8 MiB more working memory there
    (benchmarks/cpu-notes.md).
    """
    return remat_chunk(steps, scale=2)


def _remat_chunks(x, mask, chunk):
    """x and mask padded with masked steps to whole chunks: ``(n, chunk, B, ...)`` each (mask
    None stays None where no step is padded: the kernel's unmasked loop)."""
    steps, batch = x.shape[:2]
    n = -(-steps // chunk)
    pad = n * chunk - steps
    if mask is None and pad == 0:
        return x.reshape((n, chunk) + x.shape[1:]), None
    mask = jnp.ones((steps, batch), bool) if mask is None else mask
    x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    mask = jnp.pad(mask, ((0, pad), (0, 0)))
    return x.reshape((n, chunk) + x.shape[1:]), mask.reshape((n, chunk, batch))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _cpu_remat_loop(config, chunk, x, w_ih, w_hh, w_hr, h0, c0, mask, b):
    return _cpu_remat_fwd(config, chunk, x, w_ih, w_hh, w_hr, h0, c0, mask, b)[0]


def _cpu_remat_fwd(config, chunk, x, w_ih, w_hh, w_hr, h0, c0, mask, b):
    steps = x.shape[0]
    x_c, mask_c = _remat_chunks(x, mask, chunk)

    def chunk_step(state, inputs):
        x_k, m_k = inputs
        ys_k, new_state = _layer_loop(config, x_k, w_ih, w_hh, w_hr, *state, m_k, b)
        return new_state, (ys_k, state)

    (h, c), (ys_c, starts) = jax.lax.scan(chunk_step, (h0, c0), (x_c, mask_c))
    ys = ys_c.reshape((-1,) + ys_c.shape[2:])[:steps]
    return (ys, (h, c)), (x, w_ih, w_hh, w_hr, b, mask, starts)


def _cpu_remat_bwd(config, chunk, residuals, cotangents):
    x, w_ih, w_hh, w_hr, b, mask, starts = residuals
    dys, (dh_n, dc_n) = cotangents
    steps = x.shape[0]
    x_c, mask_c = _remat_chunks(x, mask, chunk)
    dys_c, _ = _remat_chunks(dys.astype(jnp.float32), None, chunk)

    def chunk_step(carry, inputs):
        state, sums = carry
        x_k, m_k, dys_k, (h_k, c_k) = inputs

        def run(x_k, w_ih, w_hh, w_hr, h_k, c_k, b):
            return _layer_loop(config, x_k, w_ih, w_hh, w_hr, h_k, c_k, m_k, b)

        # The chunk's forward pass again, now saving its activations, and its backward pass
        # (the kernel's own, through _cpu_loop's custom_vjp).
        _, pullback = jax.vjp(run, x_k, w_ih, w_hh, w_hr, h_k, c_k, b)
        dx_k, *weights, dh_k, dc_k, db_k = pullback((dys_k, state))
        sums = jax.tree_util.tree_map(jnp.add, sums, (*weights, db_k))
        return ((dh_k, dc_k), sums), dx_k

    zeros = tuple(None if w is None else jnp.zeros_like(w) for w in (w_ih, w_hh, w_hr, b))
    init = ((dh_n.astype(jnp.float32), dc_n.astype(jnp.float32)), zeros)
    ((dh0, dc0), (dw_ih, dw_hh, dw_hr, db)), dx_c = jax.lax.scan(
        chunk_step, init, (x_c, mask_c, dys_c, starts), reverse=True)
    dx = dx_c.reshape((-1,) + dx_c.shape[2:])[:steps]
    return dx, dw_ih, dw_hh, dw_hr, dh0, dc0, None, db


_cpu_remat_loop.defvjp(_cpu_remat_fwd, _cpu_remat_bwd)


def cpu_remat_layer(
    chunk: int,
    x: Array,
    w_ih: Array,
    w_hh: Array,
    w_hr: Array | None,
    h0: Array,
    c0: Array,
    mask: Array | None,
    b: Array | None = None,
    *,
    threads: int | None = None,
    helper_wait_us: int | None = None,
    precision=None,
) -> tuple[Array, tuple[Array, Array]]:
    """:func:`cpu_layer` rematerialised chunk by chunk (``lstm(..., backend="cpu", remat=True)``).

    The forward pass runs the kernel over ``chunk`` steps at a time (about 2 sqrt(T):
    :func:`kernel_remat_chunk`) and keeps only the state entering each chunk,
    none of the gate activations. The backward pass walks the chunks in reverse: each chunk's
    forward loop again, saving its activations, then the kernel's backward loop and its
    weight-gradient product, whose results are summed over the chunks. Working memory
    O(T / chunk + chunk) steps instead of O(T) gate activations, for one more forward pass
    (Chen et al. 2016). Same arguments and results as :func:`cpu_layer`; T is padded to whole
    chunks with masked steps, which carry the state and output zero.

    Example:
      >>> T, B, D, H = 100, 4, 3, 8
      >>> x = jnp.ones((T, B, D)); w_ih = jnp.zeros((D, 4 * H)); w = jnp.zeros((H, 4 * H))
      >>> state = jnp.zeros((B, H))
      >>> ys, (h, c) = cpu_remat_layer(10, x, w_ih, w, None, state, state, None)  # doctest: +SKIP
    """
    del precision
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    _check_layer(x, w_ih, w_hh, w_hr, h0, c0, mask, b)
    return _cpu_remat_loop(_config(threads, helper_wait_us), int(chunk), x, w_ih, w_hh, w_hr,
                           h0, c0, mask, b)
