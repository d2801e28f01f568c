"""Benchmark harness: lstm_jax against torch.nn.LSTM, Flax and ``jax.experimental.rnn``.

Run it as ``python scripts/bench.py`` (or ``lstm-jax bench``) from the repository root::

    python scripts/bench.py                                    # this backend's default table
    python scripts/bench.py --shapes 32,100,128,256 1,1000,32,128 --repeats 20
    python scripts/bench.py --shapes 32,100,128,256,L2,bi      # 2 layers, bidirectional
    python scripts/bench.py --unroll 1,2,4,8 --only fwdbwd     # which unroll wins per shape

Every implementation is timed in one process on the same random inputs: forward alone
(``fwd``) and forward+backward (``fwdbwd``: the gradient of ``sum(y)`` with respect to the
parameters and the input, jitted). Repeats are interleaved across implementations (round
robin), so load from other processes on a shared machine hits all of them alike; the
median is reported, and the ratio to torch is the median of the ratios of bursts timed in the
same round (:func:`paired_ratios`). JAX compile time is the wall time of
``jit(f).lower(...).compile()``.

The table is printed and written to ``benchmarks/results/<machine>.md`` (``--out``):
milliseconds, the ratio to torch.nn.LSTM in float32 (for half-precision rows: to torch's
faster of fp16 and bf16), microseconds per time step, the FLOP count (forward
``2*T*B*4H*(D+H)`` per layer and direction, forward+backward three times that), the achieved
GFLOP/s and compile seconds.

lstm_jax variants are ``Variant(label, kwargs)`` entries of :data:`LSTM_JAX_VARIANTS`: adding a
backend is one line. A variant whose keyword arguments :func:`lstm_jax.lstm` rejects (an
unknown argument, a backend that does not apply to the shape) is skipped with the reason.
This is a benchmark, never a timed test.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from lstm_jax._host_memory import steady_malloc  # --steady-malloc; benchmarks/ import it here

# ----------------------------------------------------------------------------- shapes


class Shape(NamedTuple):
    """One benchmark case: batch, time steps, input features, hidden size, layers, directions."""

    B: int
    T: int
    D: int
    H: int
    layers: int = 1
    bidirectional: bool = False

    @property
    def label(self) -> str:
        s = f"{self.B},{self.T},{self.D},{self.H}"
        if self.layers != 1:
            s += f" L{self.layers}"
        if self.bidirectional:
            s += " bi"
        return s

    def forward_flops(self) -> int:
        """Matrix-product FLOPs of the forward pass: 2*T*B*4H*(in+H) per layer and direction."""
        dirs = 2 if self.bidirectional else 1
        total = 0
        for layer in range(self.layers):
            in_size = self.D if layer == 0 else dirs * self.H
            total += dirs * 2 * self.T * self.B * 4 * self.H * (in_size + self.H)
        return total

    def flops(self, mode: str) -> int:
        return self.forward_flops() * (3 if mode == "fwdbwd" else 1)


def parse_shape(text: str) -> Shape:
    """``"B,T,D,H"`` with optional ``",L<layers>"`` and ``",bi"`` (e.g. ``"32,100,128,256,L2,bi"``)."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        B, T, D, H = (int(p) for p in parts[:4])
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected B,T,D,H[,L<n>][,bi]") from None
    layers, bidirectional = 1, False
    for extra in parts[4:]:
        if extra.lower() == "bi":
            bidirectional = True
        elif re.fullmatch(r"[Ll]\d+", extra):
            layers = int(extra[1:])
        else:
            raise argparse.ArgumentTypeError(f"shape {text!r}: unknown part {extra!r}")
    if min(B, T, D, H, layers) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r}: sizes must be positive")
    return Shape(B, T, D, H, layers, bidirectional)


BI_SHAPE = Shape(32, 100, 128, 256, layers=2, bidirectional=True)
# Issue 4's CPU targets, plus the 2-layer bidirectional case.
CPU_SHAPES = [Shape(32, 100, 128, 256), Shape(1, 1000, 32, 128), Shape(128, 50, 512, 512), BI_SHAPE]
# The full table (issue 4 and issue 7's latency-bound shapes).
GPU_SHAPES = [
    Shape(32, 100, 128, 256),
    Shape(1, 1000, 32, 128),
    Shape(128, 50, 512, 512),
    Shape(64, 100, 256, 256),
    Shape(8, 1000, 128, 256),
    Shape(256, 100, 1024, 1024),
    Shape(1, 500, 64, 64),
    Shape(32, 200, 512, 512),
    Shape(16, 500, 128, 128),
    BI_SHAPE,
]
MODES = ("fwdbwd", "fwd")
# Issue 4's long-sequence memory report: T = 10,000.
MEMORY_SHAPES = [Shape(8, 10_000, 128, 256), Shape(32, 10_000, 128, 256)]

# ----------------------------------------------------------------------------- implementations


class Variant(NamedTuple):
    """An lstm_jax configuration: ``lstm(params, x, **kwargs)``.

    ``gpu_only`` (``cpu_only``) variants are left out on other backends unless ``--impls``
    names them; ``on_request`` ones are left out everywhere unless ``--impls`` names them.
    ``in_place``: force (True/False) whether the training forward pass writes the gate
    activations over ``x @ W_ih`` in place (``_recurrence.in_place_residuals``, CPU-only by
    default until measured elsewhere); None keeps the library's choice.
    """

    label: str
    kwargs: dict
    gpu_only: bool = False
    in_place: bool | None = None
    cpu_only: bool = False
    on_request: bool = False

    def excluded_on(self, backend: str) -> bool:
        """Whether this variant is left out of the default table on ``backend``."""
        return (self.on_request or (self.gpu_only and backend != "gpu")
                or (self.cpu_only and backend != "cpu"))


# One line per lstm_jax configuration to time. Issue 7 adds e.g.
#   Variant("lstm_jax-pallas", {"backend": "pallas"}, gpu_only=True),
LSTM_JAX_VARIANTS = [
    Variant("lstm_jax", {}),
    Variant("lstm_jax-autodiff", {"custom_grad": False}),
    Variant("lstm_jax-bf16", {"compute_dtype": "bfloat16"}, gpu_only=True),
    # The in-place activations on the GPU: does XLA:GPU keep the buffer in place (faster,
    # less memory) or copy it at every step? Measured before the default changes there.
    Variant("lstm_jax-inplace", {"backend": "scan"}, gpu_only=True, in_place=True),
    Variant("lstm_jax-bf16-inplace", {"backend": "scan", "compute_dtype": "bfloat16"},
            gpu_only=True, in_place=True),
    Variant("lstm_jax-scan", {"backend": "scan"}),
    # The C++ kernel through XLA's FFI (what "auto" picks on CPU where it measured faster).
    Variant("lstm_jax-cpu", {"backend": "cpu"}, cpu_only=True),
    Variant("lstm_jax-pallas", {"backend": "pallas"}, gpu_only=True),
    Variant("lstm_jax-pallas-bf16", {"backend": "pallas", "compute_dtype": "bfloat16"}, gpu_only=True),
    Variant("lstm_jax-cudnn", {"backend": "cudnn"}, gpu_only=True),
    # Rematerialisation (long sequences): timed only when --impls names them.
    Variant("lstm_jax-remat", {"remat": True}, on_request=True),
    Variant("lstm_jax-scan-remat", {"backend": "scan", "remat": True}, on_request=True),
    Variant("lstm_jax-cpu-remat", {"backend": "cpu", "remat": True}, cpu_only=True,
            on_request=True),
]

TORCH_HALF = ("torch-fp16", "torch-bf16")


class Skip(Exception):
    """An implementation does not apply here (missing library, rejected arguments, platform)."""


class Prepared(NamedTuple):
    run: Callable[[], None]  # one call, synchronised
    compile_s: float | None


class Impl(NamedTuple):
    label: str
    build: Callable[[Shape, str], Prepared]
    half: bool = False  # compared with torch's faster half precision rather than torch fp32


def _is_half(dtype) -> bool:
    if dtype is None:
        return False
    import jax.numpy as jnp

    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _random_input(shape: Shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((shape.B, shape.T, shape.D), np.float32)


def _compile_jax(apply: Callable, params, x, mode: str, label: str) -> Prepared:
    """jit + lower + compile ``apply(params, x) -> y`` (or its gradient); timed."""
    import jax
    import jax.numpy as jnp

    if mode == "fwdbwd":

        def loss(p, xx):
            return jnp.sum(apply(p, xx).astype(jnp.float32))

        fn = jax.grad(loss, argnums=(0, 1))
    else:
        fn = apply
    t0 = time.perf_counter()
    try:
        lowered = jax.jit(fn).lower(params, x)
    except Exception as e:  # rejected at trace time: unknown kwargs, unsupported shape
        raise Skip(f"{label} rejected: {type(e).__name__}: {_first_line(e)}") from None
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0

    def run():
        jax.block_until_ready(compiled(params, x))

    return Prepared(run, compile_s)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


@contextlib.contextmanager
def _in_place_residuals(flag: bool | None):
    """Forces ``_recurrence.in_place_residuals()`` to ``flag`` while tracing (None: no change)."""
    if flag is None:
        yield
        return
    from lstm_jax import _recurrence

    library_choice = _recurrence.in_place_residuals
    _recurrence.in_place_residuals = lambda: flag
    try:
        yield
    finally:
        _recurrence.in_place_residuals = library_choice


def lstm_jax_impl(variant: Variant) -> Impl:
    def build(shape: Shape, mode: str) -> Prepared:
        import jax
        import jax.numpy as jnp

        import lstm_jax

        params = lstm_jax.init_lstm(
            jax.random.key(0),
            shape.D,
            shape.H,
            num_layers=shape.layers,
            bidirectional=shape.bidirectional,
        )
        x = jnp.asarray(_random_input(shape))

        def apply(p, xx):
            return lstm_jax.lstm(p, xx, **variant.kwargs)[0]

        with _in_place_residuals(variant.in_place):
            return _compile_jax(apply, params, x, mode, variant.label)

    return Impl(variant.label, build, half=_is_half(variant.kwargs.get("compute_dtype")))


def flax_impl() -> Impl:
    """``nn.RNN(nn.OptimizedLSTMCell)``, stacked and ``nn.Bidirectional`` as a Flax user writes it."""

    def build(shape: Shape, mode: str) -> Prepared:
        import jax
        import jax.numpy as jnp

        try:
            import flax.linen as nn
        except ImportError as e:
            raise Skip(f"flax not importable: {e}") from None

        class FlaxLSTM(nn.Module):
            hidden: int
            layers: int
            bidirectional: bool

            @nn.compact
            def __call__(self, x):
                for _ in range(self.layers):
                    if self.bidirectional:
                        x = nn.Bidirectional(
                            nn.RNN(nn.OptimizedLSTMCell(self.hidden)),
                            nn.RNN(nn.OptimizedLSTMCell(self.hidden)),
                        )(x)
                    else:
                        x = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(x)
                return x

        model = FlaxLSTM(shape.H, shape.layers, shape.bidirectional)
        x = jnp.asarray(_random_input(shape))
        params = model.init(jax.random.key(0), x)
        return _compile_jax(model.apply, params, x, mode, "flax")

    return Impl("flax", build)


def jax_rnn_impl() -> Impl:
    """``jax.experimental.rnn.lstm``: cuDNN through JAX (GPU only, float32)."""

    def build(shape: Shape, mode: str) -> Prepared:
        import jax
        import jax.numpy as jnp

        if jax.default_backend() != "gpu":
            raise Skip("jax.experimental.rnn has no lowering on " + jax.default_backend())
        from jax.experimental import rnn

        dirs = 2 if shape.bidirectional else 1
        weights = rnn.init_lstm_weight(
            jax.random.key(0), shape.D, shape.H, shape.layers, shape.bidirectional
        )
        state = jnp.zeros((shape.layers * dirs, shape.B, shape.H), jnp.float32)
        lengths = jnp.full((shape.B,), shape.T, jnp.int32)
        x = jnp.asarray(_random_input(shape))

        def apply(w, xx):
            return rnn.lstm(
                xx, state, state, w, lengths, shape.D, shape.H, shape.layers, 0.0,
                shape.bidirectional,
            )[0]

        return _compile_jax(apply, weights, x, mode, "jax.experimental.rnn")

    return Impl("jax.experimental.rnn", build)


def torch_impl(label: str, dtype_name: str) -> Impl:
    """``torch.nn.LSTM`` (cuDNN on GPU, oneDNN/ATen on CPU) in ``dtype_name``."""

    def build(shape: Shape, mode: str) -> Prepared:
        try:
            import torch
        except ImportError as e:
            raise Skip(f"torch not importable: {e}") from None
        cuda = torch.cuda.is_available()
        device = "cuda" if cuda else "cpu"
        dtype = getattr(torch, dtype_name)
        if dtype != torch.float32 and not cuda:
            raise Skip(f"{label}: half precision timed on GPU only")
        torch.manual_seed(0)
        model = torch.nn.LSTM(
            shape.D, shape.H, num_layers=shape.layers, bidirectional=shape.bidirectional,
            batch_first=True,
        ).to(device=device, dtype=dtype)
        x = torch.from_numpy(_random_input(shape)).to(device=device, dtype=dtype)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        if mode == "fwdbwd":
            x.requires_grad_(True)
            inputs = list(model.parameters()) + [x]

            def run():
                y, _ = model(x)
                torch.autograd.grad(y.float().sum(), inputs)
                sync()
        else:

            def run():
                with torch.no_grad():
                    model(x)
                sync()

        return Prepared(run, None)

    return Impl(label, build, half=dtype_name != "float32")


def default_impls(backend: str, unrolls: list[int] | None = None) -> list[Impl]:
    """Everything that applies on ``backend`` (``"cpu"``, ``"gpu"``, ...), in table order.

    With ``unrolls``, each lstm_jax variant is timed once per unroll (labels ``"<label> u=K"``).
    """
    impls = []
    for v in LSTM_JAX_VARIANTS:
        if unrolls:
            for u in unrolls:
                impls.append(
                    lstm_jax_impl(v._replace(label=f"{v.label} u={u}",
                                             kwargs={**v.kwargs, "unroll": u}))
                )
        else:
            impls.append(lstm_jax_impl(v))
    impls.append(flax_impl())
    impls.append(jax_rnn_impl())
    impls.append(torch_impl("torch", "float32"))
    impls.append(torch_impl("torch-fp16", "float16"))
    impls.append(torch_impl("torch-bf16", "bfloat16"))
    return impls


def _excluded(label: str, backend: str) -> bool:
    """Whether ``label`` is left out of the default table on ``backend``."""
    base = label.split(" u=")[0]
    if base in ("jax.experimental.rnn",) + TORCH_HALF:
        return backend != "gpu"
    return any(v.label == base and v.excluded_on(backend) for v in LSTM_JAX_VARIANTS)


def select_impls(impls: list[Impl], patterns: list[str] | None, backend: str) -> list[Impl]:
    """Filters by fnmatch ``patterns`` on labels; GPU-only (CPU-only) entries there unless named."""
    chosen = []
    for impl in impls:
        if patterns:
            named = any(
                fnmatch.fnmatchcase(impl.label, p) or fnmatch.fnmatchcase(impl.label.split(" u=")[0], p)
                for p in patterns
            )
            if not named:
                continue
            exact = any(p in (impl.label, impl.label.split(" u=")[0]) for p in patterns)
            if _excluded(impl.label, backend) and not exact:
                continue
        elif _excluded(impl.label, backend):
            continue
        chosen.append(impl)
    return chosen


# ----------------------------------------------------------------------------- timing


class Result(NamedTuple):
    shape: Shape
    mode: str
    impl: str
    ms: float | None
    compile_s: float | None = None
    status: str = "ok"  # "ok", "skip" or "error"
    note: str = ""
    half: bool = False
    others_cpu: float | None = None  # share of the CPUs other processes used while timing
    # (round, median ms of the burst) of every burst kept: ratio() pairs bursts by round.
    bursts: tuple[tuple[int, float], ...] = ()


def _cpu_counters() -> tuple[float, float, float] | None:
    """(wall, busy CPU seconds of the machine, CPU seconds of this process), or None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / tick  # all but idle and iowait
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system


def _wait_until_quiet(quiet: float, deadline: float, window: float = 1.0) -> None:
    """Sleeps until other processes use at most ``quiet`` of the CPUs over ``window`` seconds."""
    while time.perf_counter() < deadline:
        start = _cpu_counters()
        if start is None:
            return
        time.sleep(window)
        busy = _others_cpu(start, _cpu_counters())
        if busy is None or busy <= quiet:
            return


def _others_cpu(start, end) -> float | None:
    if start is None or end is None or end[0] <= start[0]:
        return None
    wall = end[0] - start[0]
    others = (end[1] - start[1]) - (end[2] - start[2])
    return max(0.0, min(1.0, others / (wall * (os.cpu_count() or 1))))


def _calibrate(run: Callable[[], None], min_time: float) -> int:
    """Calls per round so that one implementation's calls last at least ``min_time`` seconds."""
    once = math.inf
    for _ in range(3):  # the fastest of three: one call descheduled by a busy machine misleads
        t0 = time.perf_counter()
        run()
        once = min(once, time.perf_counter() - t0)
        if once >= min_time:
            return 1
    return max(1, min(1000, math.ceil(min_time / max(once, 1e-7))))


def bench_case(
    shape: Shape,
    mode: str,
    impls: list[Impl],
    *,
    repeats: int,
    warmup: int,
    min_time: float,
    quiet: float | None = None,
    max_wait: float = 600.0,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Prepares every implementation for one shape and mode, then times them round robin.

    With ``quiet`` (a fraction of the CPUs, e.g. 0.15) each implementation's burst of calls
    waits until other processes use less than that; a burst during which they used more is
    set aside and timed again, until each implementation has ``repeats`` undisturbed bursts or
    ``max_wait`` seconds have passed. Disturbed bursts count only if no burst was undisturbed.
    """
    prepared, results = {}, {}
    for impl in impls:
        try:
            p = impl.build(shape, mode)
            for _ in range(warmup):
                p.run()
            inner = _calibrate(p.run, min_time)
            prepared[impl.label] = (p, inner, [])
        except Skip as e:
            log(f"  skip {impl.label} at {shape.label} {mode}: {e}")
            results[impl.label] = Result(shape, mode, impl.label, None, status="skip",
                                         note=str(e), half=impl.half)
        except Exception as e:  # a failing implementation must not stop the benchmark
            log(f"  error {impl.label} at {shape.label} {mode}: {type(e).__name__}: {_first_line(e)}")
            results[impl.label] = Result(shape, mode, impl.label, None, status="error",
                                         note=f"{type(e).__name__}: {_first_line(e)}", half=impl.half)
    order = list(prepared)
    # torch's bursts are what the others' are paired with (paired_ratios): a burst timed again
    # in an extra round gets one of torch's beside it.
    references = [label for label in order if label == "torch" or label in TORCH_HALF]
    deadline = time.perf_counter() + max_wait
    kept = {label: ([], [], []) for label in order}  # (call times, others' CPU, bursts)
    disturbed = {label: ([], [], []) for label in order}
    r = 0

    def wanting(label):
        return len(kept[label][1]) < repeats

    while order and (r < repeats or (quiet is not None and time.perf_counter() < deadline
                                     and any(wanting(label) for label in order))):
        # Rotate the order so no implementation always follows the same neighbour.
        k = r % len(order)
        for label in order[k:] + order[:k]:
            if r >= repeats and not wanting(label) and label not in references:
                continue
            p, inner, _ = prepared[label]
            if quiet is not None:
                _wait_until_quiet(quiet, deadline, window=0.1)
            # One untimed call first: the previous implementation's burst left the caches
            # with its own weights and buffers, and the first call after a switch ran up to
            # 1.5x slower (32,100,128,256 forward), whichever library came before.
            p.run()
            start = _cpu_counters()
            times = []
            for _ in range(inner):
                # Each call timed on its own: the median then ignores the calls that another
                # process on a shared machine stalled (which a mean would not).
                t0 = time.perf_counter()
                p.run()
                times.append(time.perf_counter() - t0)
            busy = _others_cpu(start, _cpu_counters())
            clean = quiet is None or busy is None or busy <= quiet
            pool = kept[label] if clean else disturbed[label]
            pool[0].extend(times)
            if busy is not None:
                pool[1].append(busy)
            pool[2].append((r, 1e3 * statistics.median(times)))
        r += 1
    for impl in impls:
        if impl.label in prepared:
            label = impl.label
            times, busy, bursts = kept[label]
            note = ""
            if quiet is not None:
                note = f"{len(busy)} undisturbed bursts of {len(busy) + len(disturbed[label][1])}"
                if not times:  # never quiet: keep what there is, and say so
                    times, busy, bursts = disturbed[label]
                    note += " (none: disturbed timings kept)"
            results[label] = Result(
                shape, mode, label, 1e3 * statistics.median(times), prepared[label][0].compile_s,
                note=note, half=impl.half, others_cpu=statistics.mean(busy) if busy else None,
                bursts=tuple(bursts),
            )
    return [results[impl.label] for impl in impls]


# ----------------------------------------------------------------------------- tables


def _reference_ms(rows: list[Result], half: bool) -> tuple[float | None, str]:
    ms = {r.impl: r.ms for r in rows if r.ms is not None}
    if half:
        halves = [(ms[k], k) for k in TORCH_HALF if k in ms]
        if halves:
            best = min(halves)
            return best[0], best[1]
        return None, ""
    return ms.get("torch"), "torch"


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def paired_ratios(row: Result, reference: Result) -> list[float]:
    """``row``'s burst over ``reference``'s in every round where both kept one.

    Adjacent bursts of a round ran within a second of each other. On a shared VM the speed of
    the cores drifts over seconds to minutes (on the 2-core Xeon VM a core's peak multiply-add
    rate moved between 76 and 150 GFLOP/s: ``benchmarks/cpu-notes.md``), which a ratio of
    medians taken over the whole run mixes in; a ratio per round mostly cancels it.
    """
    ref = dict(reference.bursts)
    return [ms / ref[r] for r, ms in row.bursts if r in ref and ref[r] > 0]


def ratio_spread(row: Result, rows: list[Result]) -> tuple[float, float, float, int] | None:
    """(median, first quartile, third quartile, count) of :func:`paired_ratios` against the
    reference (torch fp32; half rows: torch's faster half precision), or None without paired
    rounds."""
    half = row.half and row.impl not in TORCH_HALF
    _, label = _reference_ms(rows, half)
    reference = next((r for r in rows if r.impl == label), None)
    if reference is None or row.ms is None:
        return None
    pairs = paired_ratios(row, reference)
    if not pairs:
        return None
    if len(pairs) == 1:
        return pairs[0], pairs[0], pairs[0], 1
    q1, q2, q3 = statistics.quantiles(pairs, n=4, method="inclusive")
    return q2, q1, q3, len(pairs)


# Fewer rounds than this in common (bursts that other processes disturbed are timed again in
# extra rounds, where their partners may not run) leave the ratio to the two medians.
MIN_PAIRED_ROUNDS = 3


def ratio(row: Result, rows: list[Result]) -> float | None:
    """``row`` against torch fp32 (half rows: torch's faster half precision): the median of
    the per-round ratios (:func:`paired_ratios`) where at least :data:`MIN_PAIRED_ROUNDS`
    rounds timed both, else the ratio of the two medians."""
    # torch's own half rows are compared with torch fp32: how much half precision buys.
    spread = ratio_spread(row, rows)
    if spread is not None and spread[3] >= MIN_PAIRED_ROUNDS:
        return spread[0]
    half = row.half and row.impl not in TORCH_HALF
    ref, _ = _reference_ms(rows, half)
    if row.ms is None or ref is None:
        return None
    return row.ms / ref


DETAIL_HEADER = (
    "| shape B,T,D,H | mode | impl | ms | vs torch | us/step | GFLOP | GFLOP/s | compile s "
    "| others' CPU |"
)


def detail_table(results: list[Result]) -> str:
    lines = [DETAIL_HEADER, "|" + "---|" * 10]
    for shape, mode, rows in _groups(results):
        for row in rows:
            rat = ratio(row, rows)
            spread = ratio_spread(row, rows)
            if row.ms is None:
                ms = row.status
                per_step = gflops = "-"
            else:
                ms = _fmt(row.ms)
                per_step = _fmt(1e3 * row.ms / shape.T)
                gflops = _fmt(shape.flops(mode) / (row.ms * 1e-3) / 1e9)
            rat_s = "-" if rat is None else f"{rat:.2f}x"
            if spread is not None and spread[3] >= MIN_PAIRED_ROUNDS and row.impl != "torch":
                rat_s += f" ({spread[1]:.2f}-{spread[2]:.2f})"
            if rat is not None and row.half and row.impl not in TORCH_HALF:
                rat_s += " (vs half)"
            lines.append(
                f"| {shape.label} | {_mode_label(mode)} | {row.impl} | {ms} | {rat_s} | {per_step} | "
                f"{shape.flops(mode) / 1e9:.3g} | {gflops} | "
                f"{'-' if row.compile_s is None else f'{row.compile_s:.2f}'} | "
                f"{'-' if row.others_cpu is None else f'{100 * row.others_cpu:.0f}%'} |"
            )
    return "\n".join(lines)


def summary_table(results: list[Result]) -> str:
    """One row per shape and mode: torch's milliseconds and every other ratio."""
    labels = []
    for r in results:
        if r.impl not in labels:
            labels.append(r.impl)
    others = [lab for lab in labels if lab != "torch"]
    head = ["shape B,T,D,H", "mode", "torch ms"] + others + ["others' CPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape, mode, rows in _groups(results):
        by = {r.impl: r for r in rows}
        torch_ms = by["torch"].ms if "torch" in by else None
        cells = [shape.label, _mode_label(mode), _fmt(torch_ms)]
        shares = [r.others_cpu for r in rows if r.others_cpu is not None]
        busy = statistics.mean(shares) if shares else None
        for lab in others:
            row = by.get(lab)
            if row is None or row.ms is None:
                cells.append("-" if row is None else row.status)
                continue
            rat = ratio(row, rows)
            cells.append(f"{rat:.2f}x" if rat is not None else f"{_fmt(row.ms)} ms")
        cells.append("-" if busy is None else f"{100 * busy:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unroll_table(results: list[Result]) -> str:
    """For an ``--unroll`` sweep: milliseconds per unroll and the winner, per variant and shape."""
    sweeps: dict[tuple, dict[int, float]] = {}
    for r in results:
        m = re.fullmatch(r"(.+) u=(\d+)", r.impl)
        if m and r.ms is not None:
            sweeps.setdefault((r.shape, r.mode, m.group(1)), {})[int(m.group(2))] = r.ms
    if not sweeps:
        return ""
    unrolls = sorted({u for d in sweeps.values() for u in d})
    head = ["shape B,T,D,H", "mode", "variant"] + [f"u={u} ms" for u in unrolls] + ["best", "vs u=1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (shape, mode, variant), d in sweeps.items():
        best = min(d, key=d.get)
        gain = f"{d[best] / d[1]:.2f}x" if 1 in d else "-"
        cells = [shape.label, _mode_label(mode), variant]
        cells += [(f"**{_fmt(d[u])}**" if u == best else _fmt(d[u])) if u in d else "-" for u in unrolls]
        cells += [str(best), gain]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mode_label(mode: str) -> str:
    return {"fwdbwd": "fwd+bwd", "fwd": "fwd"}.get(mode, mode)


def _groups(results: list[Result]):
    keys = []
    for r in results:
        if (r.shape, r.mode) not in keys:
            keys.append((r.shape, r.mode))
    for shape, mode in keys:
        yield shape, mode, [r for r in results if r.shape == shape and r.mode == mode]


# ----------------------------------------------------------------------------- machine


def machine_name() -> str:
    """``cpu-<n>core-<family>`` on CPU (``cpu-2core-intel-xeon``, ``cpu-2core-amd-epyc``: the
    same VM size came as either, and the two rank the libraries differently), the slugged
    device kind on an accelerator (``nvidia-h100-80gb-hbm3``)."""
    import jax

    if jax.default_backend() == "cpu":
        family = cpu_family(_cpu_model())
        return f"cpu-{os.cpu_count()}core" + (f"-{family}" if family else "")
    kind = jax.devices()[0].device_kind
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")


def cpu_family(model: str) -> str:
    """The vendor and family of a CPU model name, slugged: ``"Intel(R) Xeon(R) Processor @
    2.50GHz"`` gives ``"intel-xeon"``, ``"AMD EPYC 9B14"`` gives ``"amd-epyc"``, and an
    unknown model ``""``."""
    text = re.sub(r"\((r|tm)\)|@.*$", " ", model.lower())
    words = [w for w in re.split(r"[^a-z0-9]+", text)
             if w and w not in ("processor", "cpu", "unknown")]
    return "-".join(words[:2])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> list[str]:
    import jax

    import lstm_jax

    lines = []
    backend = jax.default_backend()
    if backend == "cpu":
        lines.append(f"- machine: {_cpu_model()}, {os.cpu_count()} cores, {platform.platform()}")
    else:
        lines.append(f"- device: {jax.devices()[0].device_kind} ({backend}); host {_cpu_model()}, "
                     f"{os.cpu_count()} cores")
    versions = [f"python {platform.python_version()}", f"jax {jax.__version__}"]
    try:
        import jaxlib

        versions.append(f"jaxlib {jaxlib.__version__}")
    except ImportError:
        pass
    try:
        import flax

        versions.append(f"flax {flax.__version__}")
    except ImportError:
        versions.append("flax not installed")
    try:
        import torch

        t = f"torch {torch.__version__} ({torch.get_num_threads()} threads"
        if torch.cuda.is_available():
            t += f", {torch.cuda.get_device_name()}, cuDNN {torch.backends.cudnn.version()}, "
            t += f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}"
        versions.append(t + ")")
    except ImportError:
        versions.append("torch not installed")
    lines.append("- versions: " + ", ".join(versions))
    lines.append(
        f"- lstm_jax {lstm_jax.__version__}, default unroll on {backend}: {lstm_jax.default_unroll()}; "
        f"jax_default_matmul_precision={getattr(jax.config, 'jax_default_matmul_precision', None)}"
    )
    if hasattr(os, "nice") and os.nice(0) != 0:
        lines.append(f"- process priority: nice {os.nice(0)} (raised over other jobs on a shared machine)")
    if flags := os.environ.get("XLA_FLAGS"):
        lines.append(f"- XLA_FLAGS={flags}")
    return lines


def _load() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def render(results: list[Result], header: list[str], footer: list[str]) -> str:
    parts = ["\n".join(header), "## Summary (ratio to torch.nn.LSTM fp32; half-precision rows: to torch's faster of fp16/bf16)",
             summary_table(results)]
    unroll = unroll_table(results)
    if unroll:
        parts += ["## Unroll sweep (milliseconds; best in bold)", unroll]
    parts += ["## Details", detail_table(results)]
    if footer:
        parts.append("\n".join(footer))
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- main


def _unroll_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--unroll {text!r}: expected integers like 1,2,4,8") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--unroll {text!r}: expected positive integers")
    return values


# ----------------------------------------------------------------------------- memory

MEMORY_VARIANTS = [
    Variant("lstm_jax", {}),
    Variant("lstm_jax remat", {"remat": True}),
    Variant("lstm_jax-autodiff", {"custom_grad": False}),
    Variant("lstm_jax-autodiff remat", {"custom_grad": False, "remat": True}),
    # Off CPU, the activations written over x @ W_ih in place (CPU's default), to compare.
    Variant("lstm_jax-inplace", {"backend": "scan"}, gpu_only=True, in_place=True),
    Variant("lstm_jax-scan", {"backend": "scan"}),
    Variant("lstm_jax-scan remat", {"backend": "scan", "remat": True}),
    Variant("lstm_jax-cpu", {"backend": "cpu"}, cpu_only=True),
    Variant("lstm_jax-cpu remat", {"backend": "cpu", "remat": True}, cpu_only=True),
]


class MemoryRow(NamedTuple):
    shape: Shape
    impl: str
    temp_bytes: int | None  # XLA's working memory beyond arguments and outputs
    total_bytes: int | None  # arguments + outputs + temporaries - aliased
    note: str = ""


def _xla_memory(fn, *args) -> tuple[int, int]:
    """``(temp, total)`` bytes of the compiled ``jit(fn)`` (``memory_analysis``: no run)."""
    import jax

    m = jax.jit(fn).lower(*args).compile().memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return int(m.temp_size_in_bytes), int(total)


def _torch_memory(shape: Shape) -> tuple[int | None, int | None, str]:
    """Peak CUDA memory of one torch fwd+bwd beyond the parameters and input; GPU only."""
    try:
        import torch
    except ImportError:
        return None, None, "torch not importable"
    if not torch.cuda.is_available():
        return None, None, "torch's CPU allocator keeps no peak statistics"
    model = torch.nn.LSTM(shape.D, shape.H, num_layers=shape.layers,
                          bidirectional=shape.bidirectional, batch_first=True).cuda()
    x = torch.from_numpy(_random_input(shape)).cuda().requires_grad_(True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y, _ = model(x)
    torch.autograd.grad(y.sum(), list(model.parameters()) + [x])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return peak, None, "peak allocated during fwd+bwd (cuDNN)"


def memory_results(shapes: list[Shape], log: Callable[[str], None] = print) -> list[MemoryRow]:
    """Memory of one training step (``jit(grad)``) per implementation, from XLA's buffer plan."""
    import jax
    import jax.numpy as jnp

    import lstm_jax

    rows = []
    for shape in shapes:
        x = jax.ShapeDtypeStruct((shape.B, shape.T, shape.D), jnp.float32)
        params = lstm_jax.init_lstm(jax.random.key(0), shape.D, shape.H, num_layers=shape.layers,
                                    bidirectional=shape.bidirectional)
        for v in MEMORY_VARIANTS:
            if v.excluded_on(jax.default_backend()):
                continue

            def loss(p, xx, kw=v.kwargs):
                return jnp.sum(lstm_jax.lstm(p, xx, **kw)[0])

            with _in_place_residuals(v.in_place):
                temp, total = _xla_memory(jax.grad(loss, argnums=(0, 1)), params, x)
            rows.append(MemoryRow(shape, v.label, temp, total))
            log(f"{shape.label} {v.label}: temp {temp / 2**20:.1f} MiB, total {total / 2**20:.1f} MiB")
        try:
            import flax.linen as nn

            model = nn.RNN(nn.OptimizedLSTMCell(shape.H))
            if shape.layers == 1 and not shape.bidirectional:
                flax_params = model.init(jax.random.key(0), jnp.zeros((1, 1, shape.D)))
                temp, total = _xla_memory(jax.grad(lambda p, xx: jnp.sum(model.apply(p, xx)),
                                                   argnums=(0, 1)), flax_params, x)
                rows.append(MemoryRow(shape, "flax", temp, total))
        except ImportError:
            pass
        peak, _, note = _torch_memory(shape)
        rows.append(MemoryRow(shape, "torch", peak, None, note))
    return rows


def memory_table(rows: list[MemoryRow]) -> str:
    def mib(b):
        return "-" if b is None else f"{b / 2**20:.1f}"

    lines = ["| shape B,T,D,H | impl | working memory MiB | total MiB | KiB per step | note |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        per_step = "-" if r.temp_bytes is None else f"{r.temp_bytes / 1024 / r.shape.T:.0f}"
        lines.append(f"| {r.shape.label} | {r.impl} | {mib(r.temp_bytes)} | {mib(r.total_bytes)} "
                     f"| {per_step} | {r.note} |")
    return "\n".join(lines)


def _at_least(minimum, kind):
    """An argparse type: a number of ``kind`` >= ``minimum`` (else a usage error, exit 2)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value >= minimum):  # also rejects nan
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lstm-jax bench",
        description="Time lstm_jax against torch.nn.LSTM, Flax's OptimizedLSTMCell and "
        "jax.experimental.rnn; print a Markdown table and write it to benchmarks/results/.",
    )
    p.add_argument("--shapes", nargs="+", type=parse_shape, metavar="B,T,D,H[,L2][,bi]",
                   help="shapes to time (default: --cpu-shapes on CPU, --gpu-shapes elsewhere)")
    table = p.add_mutually_exclusive_group()
    table.add_argument("--cpu-shapes", action="store_true",
                       help="issue 4's three CPU shapes plus 32,100,128,256 L2 bi")
    table.add_argument("--gpu-shapes", "--gpu", action="store_true", help="the full table")
    p.add_argument("--repeats", type=_at_least(1, int), default=10,
                   help="timed rounds per case (each >= --min-time per implementation)")
    p.add_argument("--warmup", type=_at_least(0, int), default=2,
                   help="untimed calls before timing")
    p.add_argument("--min-time", type=_at_least(0, float), default=0.02,
                   help="seconds per implementation per round: fast calls are repeated")
    p.add_argument("--only", choices=MODES, help="time only forward+backward or only forward")
    p.add_argument("--unroll", type=_unroll_list, metavar="1,2,4,8",
                   help="time each lstm_jax variant at these unrolls and report the winner "
                   "(default impls then: lstm_jax and torch)")
    p.add_argument("--impls", type=lambda s: [v for v in s.split(",") if v], metavar="PATTERNS",
                   help="comma-separated labels or fnmatch patterns, e.g. 'lstm_jax*,torch*'")
    p.add_argument("--out", type=Path,
                   help="Markdown file or existing folder (default benchmarks/results/<machine>.md; "
                   "<machine>-unroll.md for a sweep)")
    p.add_argument("--max-seconds", type=float,
                   help="start no new shape after this many seconds (partial table kept)")
    p.add_argument("--quiet", type=float, metavar="FRACTION",
                   help="on a shared machine: time only while other processes use at most this "
                   "fraction of the CPUs (e.g. 0.15), timing again bursts they disturbed")
    p.add_argument("--max-wait", type=_at_least(0, float), default=600.0,
                   help="seconds per case to wait for --quiet before keeping disturbed rounds")
    p.add_argument("--steady-malloc", action="store_true",
                   help="CPU: make glibc keep freed memory (reproducible timings on VMs where "
                   "page faults are costly; changes what both libraries pay)")
    p.add_argument("--notes", type=Path, help="a Markdown file appended to the results file")
    p.add_argument("--memory", action="store_true",
                   help="instead of timing: memory of one training step (jit(grad)) from XLA's "
                   "buffer plan, with and without remat (default shapes: T=10,000), to "
                   "benchmarks/results/<machine>-memory.md")
    return p


def run_benchmarks(
    shapes: list[Shape],
    impls: list[Impl],
    modes=MODES,
    *,
    repeats: int = 10,
    warmup: int = 2,
    min_time: float = 0.02,
    max_seconds: float | None = None,
    quiet: float | None = None,
    max_wait: float = 600.0,
    on_case: Callable[[list[Result]], None] | None = None,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Times every implementation on every shape and mode; returns the results in table order."""
    results: list[Result] = []
    start = time.perf_counter()
    for i, shape in enumerate(shapes):
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            log(f"time budget of {max_seconds:.0f} s spent: not run: "
                + "; ".join(s.label for s in shapes[i:]))
            break
        for mode in modes:
            log(f"{shape.label} {_mode_label(mode)} (load {_load()})")
            case = bench_case(shape, mode, impls, repeats=repeats, warmup=warmup,
                              min_time=min_time, quiet=quiet, max_wait=max_wait, log=log)
            for r in case:
                if r.ms is not None:
                    comp = "" if r.compile_s is None else f", compile {r.compile_s:.2f} s"
                    busy = "" if r.others_cpu is None else f", others' CPU {100 * r.others_cpu:.0f}%"
                    log(f"  {r.impl}: {r.ms:.3f} ms{comp}{busy}{', ' + r.note if r.note else ''}")
            results += case
            if on_case is not None:
                on_case(results)
    return results


def main(argv: list[str] | None = None) -> int:
    # Let JAX and torch share the accelerator's memory: allocate on demand, not 75% up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    args = build_parser().parse_args(argv)
    malloc_note = None
    if args.steady_malloc:
        malloc_note = (
            "- --steady-malloc: glibc keeps freed memory (no mmapped blocks, one arena, no "
            "trimming), so repeated calls reuse pages instead of faulting in fresh ones"
            if steady_malloc() else "- --steady-malloc requested but mallopt is unavailable"
        )
    import jax

    backend = jax.default_backend()
    if args.memory:
        return memory_main(args, argv)
    if args.shapes:
        shapes = args.shapes
    elif args.cpu_shapes or (backend == "cpu" and not args.gpu_shapes):
        shapes = CPU_SHAPES
    else:
        shapes = GPU_SHAPES
    patterns = args.impls
    if patterns is None and args.unroll:
        patterns = ["lstm_jax", "torch"]
    impls = select_impls(default_impls(backend, args.unroll), patterns, backend)
    if not impls:
        print(f"no implementation matches --impls {','.join(patterns or [])}", file=sys.stderr)
        return 2
    modes = (args.only,) if args.only else MODES
    machine = machine_name()
    name = f"{machine}-unroll.md" if args.unroll else f"{machine}.md"
    out = args.out or Path("benchmarks/results") / name
    if out.is_dir():
        out = out / name
    command = "python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = [
        f"# lstm_jax benchmark: {machine}",
        "",
        *environment(),
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{command.strip()}`",
        f"- method: {args.repeats} rounds after {args.warmup} warm-up calls, interleaved across "
        f"implementations; a round makes each implementation's calls last >= {args.min_time * 1e3:.0f} ms "
        "(fast ones called several times) after one untimed call (the implementation before "
        "it left the caches cold); ms: the median over all calls, each timed alone and "
        "synchronised (block_until_ready / torch.cuda.synchronize); vs torch: the median over "
        "rounds of the ratio of the two bursts' medians in the same round (a shared "
        "machine's speed drifts over seconds to minutes), in the details with the quartiles "
        "of those ratios in brackets; with fewer than 3 rounds in common, the ratio of the "
        "two medians, without brackets. fwd+bwd: gradient of sum(y) with respect "
        "to the parameters and x (jitted for JAX; torch.autograd.grad); fwd: y alone "
        "(torch under no_grad). float32 unless labelled, each library's default matmul precision.",
        "- GFLOP: matrix products only, forward 2*T*B*4H*(D+H) per layer and direction, "
        "fwd+bwd 3x. compile s: jit(f).lower(...).compile() wall time. others' CPU: share of "
        "the machine's CPU time other processes took while timing (from /proc/stat): above "
        "a few percent the timings are disturbed.",
        f"- load average (1/5/15 min) at start: {_load()}",
    ]
    if malloc_note:
        header.append(malloc_note)
    if args.quiet is not None:
        header.append(
            f"- --quiet {args.quiet:g}: each implementation's burst of calls starts when other "
            f"processes use <= {100 * args.quiet:.0f}% of the CPUs; a burst they disturbed "
            f"(more than that) is timed again, for up to {args.max_wait:.0f} s per case, and only "
            "undisturbed bursts count unless there were none"
        )
    notes = [args.notes.read_text()] if args.notes else []
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(results, done=False):
        footer = ["(partial: still running)"]
        if done:
            footer = [f"- load average at end: {_load()}"]
            missing = [s.label for s in shapes if s not in {r.shape for r in results}]
            if missing:
                footer.append(f"- not run (--max-seconds {args.max_seconds:g}): {'; '.join(missing)}")
        out.write_text(render(results, header, footer + notes))

    results = run_benchmarks(
        shapes, impls, modes, repeats=args.repeats, warmup=args.warmup, min_time=args.min_time,
        max_seconds=args.max_seconds, quiet=args.quiet, max_wait=args.max_wait, on_case=write,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    write(results, done=True)
    print(render(results, header, []))
    print(f"written to {out}", file=sys.stderr)
    return 0


def memory_main(args, argv) -> int:
    """``--memory``: the training-step memory table, printed and written next to the timings."""
    shapes = args.shapes or MEMORY_SHAPES
    machine = machine_name()
    out = args.out or Path("benchmarks/results") / f"{machine}-memory.md"
    if out.is_dir():
        out = out / f"{machine}-memory.md"
    command = "python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = memory_results(shapes, log=lambda s: print(s, file=sys.stderr, flush=True))
    text = "\n".join([
        f"# lstm_jax training-step memory: {machine}",
        "",
        *environment(),
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{command.strip()}`",
        "- method: jit(grad of sum(y) w.r.t. parameters and x), float32, compiled and not run; "
        "working memory is XLA's temporary buffers (residuals, gradients in flight), total adds "
        "the arguments and outputs (memory_analysis()). torch: peak CUDA allocation of one "
        "fwd+bwd beyond parameters and input (GPU only).",
        "",
        memory_table(rows),
        "",
    ] + ([args.notes.read_text()] if args.notes else []))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(memory_table(rows))
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
