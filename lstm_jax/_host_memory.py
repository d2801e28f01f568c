"""Host memory: keep glibc from handing a step's large blocks back to the OS every step.

By default glibc serves blocks above its mmap threshold (which adapts, up to 32 MiB) with
fresh ``mmap`` pages and returns freed heap memory to the OS. XLA:CPU takes one block for all of
a program's temporaries, so a training step whose temporaries exceed 32 MiB (a char-level LM
with B=64, T=100, H=512 saves ~75 MiB of activations) gets a fresh block every step and faults
in every page of it: on the 2-core benchmark VM about 5 ms per 36 MiB. :func:`steady_malloc`
makes freed memory stay with the process, so repeated steps reuse resident pages.

Measured on the 2-core benchmark machine (``lstm-jax train``, seconds of training, runs
alternating): ``configs/charlm.yaml`` with ``train.steps=60``, 21.8-23.1 s (median 22.4, five
runs) against 23.7-27.1 s (median 24.8, five runs) without; the default adding task (about
10 MiB of activations) was slower with it, 23.1-25.8 s (median 24.9, eight runs) against
21.8-25.2 s (median 23.1, eight runs): one arena shared by all threads costs small steps more
than the page faults it saves. Hence :func:`keep_freed_memory_for` only above the threshold.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os

# glibc's largest dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit): blocks above
# it are always mmapped, and faulted in again after every free.
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024

# "1" forces steady_malloc in `lstm-jax train`, "0" keeps glibc's defaults; unset (or any
# other value): decided by the size of a step's activations.
ENV_VARIABLE = "LSTM_JAX_KEEP_FREED_MEMORY"


def steady_malloc() -> bool:
    """Makes glibc keep freed memory instead of returning it to the OS (process-wide).

    Public as ``lstm_jax.keep_freed_memory()``: the first call of a CPU training script whose
    steps allocate more than 32 MiB of temporaries (``lstm-jax train`` decides by itself).

    No block is mmapped, all threads share the main heap (thread arenas are mmapped heaps of at
    most 64 MiB) and nothing is trimmed: after the first call of a program, repeated calls
    reuse resident pages. Call it before JAX or torch allocate (before their thread pools
    exist, or those threads keep arenas of their own). Returns False where mallopt is
    unavailable (not glibc).
    """
    m_trim_threshold, m_mmap_threshold, m_mmap_max, m_arena_max = -1, -3, -4, -8
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        settings = ((m_trim_threshold, 1 << 30), (m_mmap_threshold, MMAP_THRESHOLD_MAX),
                    (m_mmap_max, 0), (m_arena_max, 1))
        return all(bool(libc.mallopt(option, value)) for option, value in settings)
    except (OSError, AttributeError):
        return False


def accelerator_plugin_installed() -> bool:
    """Whether JAX may find a GPU or TPU here (a PJRT plugin or libtpu is installed).

    Checked without starting JAX's backends: that would create the thread pools whose arenas
    :func:`steady_malloc` must come before.
    """
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    if importlib.util.find_spec("libtpu") is not None:
        return True
    try:
        import jax_plugins  # the namespace package older plugins install into
    except ImportError:
        return False
    return bool(list(getattr(jax_plugins, "__path__", [])))


def keep_freed_memory_for(activation_bytes: int | None, *, platform_is_cpu: bool) -> bool:
    """Whether a training process should call :func:`steady_malloc`.

    ``$LSTM_JAX_KEEP_FREED_MEMORY`` decides when set to "1"/"true"/"yes"/"on" or
    "0"/"false"/"no"/"off" (any other value counts as unset); otherwise yes on CPU when a
    step saves more than :data:`MMAP_THRESHOLD_MAX` bytes of activations (None: unknown, no).
    A heuristic: XLA's temporaries are about twice the saved activations, and the two
    configs measured lay on either side (9.4 MiB of activations: slower with it; 75 MiB:
    9-10% faster).
    """
    forced = os.environ.get(ENV_VARIABLE, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return platform_is_cpu and activation_bytes is not None and activation_bytes > MMAP_THRESHOLD_MAX
