"""Checks and times the GPU backends of lstm_jax: the Pallas kernel, cuDNN, the scan, torch.

Run on the GPU machine from the repository root (3-4 minutes on an H100: timings past
``--budget`` seconds, 170 by default, are skipped)::

    python scripts/gpu_kernels.py            # writes $OUT/gpu_kernels.md when $OUT is set

and here, on CPU, end to end with tiny shapes and the Pallas interpreter::

    python scripts/gpu_kernels.py --interpret

Three parts, each in its own try/except so that one failure does not lose the rest (errors,
Pallas/Triton lowering errors included, are printed in full):

a. ``pallas_recurrence`` compiled for the GPU against the scan ``recurrence``: forward and
   gradients, relative errors, at precision "highest" (exact float32 products in both) and at
   the default (TF32), float32 and bfloat16 products, with and without padding and lengths.
b. ``cudnn_lstm`` (jax.experimental.rnn) against ``lstm_jax.lstm``: forward and gradients.
c. Timings, forward+backward and forward alone (median after warm-up, block_until_ready):
   ``lstm_jax.lstm`` (scan), one Pallas layer, cuDNN, torch.nn.LSTM (cuDNN) in float32 and
   float16, printed as a Markdown table with ratios to torch's faster precision, plus rows in
   the format of ``lstm_jax.kernels.select.MEASURED_GPU`` to paste there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")  # leave room for torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

import lstm_jax
from lstm_jax._recurrence import recurrence
from lstm_jax.kernels import cudnn_lstm, pallas_recurrence
from lstm_jax.kernels.pallas_lstm import fits_on_chip, fma_fits

T0 = time.perf_counter()
LINES: list[str] = []


def say(text: str = "") -> None:
    print(text, flush=True)
    LINES.append(text)


def banner(text: str) -> None:
    say()
    say(f"## {text}  (t={time.perf_counter() - T0:.0f}s)")
    say()


def rel_err(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def failed(what: str) -> None:
    say(f"FAILED: {what}")
    say("```")
    for line in traceback.format_exc().splitlines():
        say(line)
    say("```")


# ----------------------------------------------------------------------------- a. Pallas check


def _recurrence_problem(B, T, H, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    xw = jax.random.normal(k[0], (T, B, 4 * H), jnp.float32)
    w_hh = (jax.random.normal(k[1], (H, 4 * H), jnp.float32) / np.sqrt(H)).astype(dtype)
    h0 = (0.5 * jax.random.normal(k[2], (B, H), jnp.float32)).astype(dtype)
    c0 = 0.5 * jax.random.normal(k[3], (B, H), jnp.float32)
    lengths = jax.random.randint(k[4], (B,), 1, T + 1).at[0].set(T)
    return xw, w_hh, h0, c0, lengths


def _outputs_and_grads(run, xw, w_hh, h0, c0):
    def loss(xw, w_hh, h0, c0):
        ys, (h, c) = run(xw, w_hh, h0, c0)
        ys32 = ys.astype(jnp.float32)
        weights = jnp.cos(jnp.arange(ys.size, dtype=jnp.float32) * 0.37).reshape(ys.shape)
        return jnp.sum(ys32 * weights) + jnp.sum(h.astype(jnp.float32) ** 2) + jnp.sum(c), (ys, h, c)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    (_, outs), grads = f(xw, w_hh, h0, c0)
    return jax.block_until_ready((outs, grads))


def check_pallas(cases, interpret):
    banner("a. Pallas kernel against the scan recurrence")
    say("| B,T,H | dtype | lengths | precision | ys | h_T | c_T | d xw | d W_hh | d h0 | d c0 | ok |")
    say("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for B, T, H, dtype, masked, precision, tol, *product in cases:
        product = product[0] if product else "mma"
        label = (f"{B},{T},{H} | {jnp.dtype(dtype).name}{' fma' if product == 'fma' else ''} | "
                 f"{'yes' if masked else 'no'} | {precision}")
        try:
            xw, w_hh, h0, c0, lengths = _recurrence_problem(B, T, H, dtype)
            mask = (jnp.arange(T)[:, None] < lengths[None, :]) if masked else None
            ref = _outputs_and_grads(
                lambda *a: recurrence(1, precision, a[0], a[1], None, a[2], a[3], mask),
                xw, w_hh, h0, c0)
            got = _outputs_and_grads(
                lambda *a: pallas_recurrence(a[0], a[1], None, a[2], a[3], mask,
                                             interpret=interpret, precision=precision,
                                             product=product),
                xw, w_hh, h0, c0)
            errs = [rel_err(g, r) for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref))]
            ok = all(e < tol for e in errs) and all(np.isfinite(errs))
            say(f"| {label} | " + " | ".join(f"{e:.1e}" for e in errs) + f" | {'yes' if ok else 'NO'} |")
        except Exception:
            say(f"| {label} | error |||||||| NO |")
            failed(f"pallas check {label}")
    try:  # both directions of a bidirectional layer as one vmapped call (a 2-D grid)
        B, T, H = (2, 7, 16) if interpret else (4, 200, 64)
        probs = [_recurrence_problem(B, T, H, jnp.float32, seed=s)[:4] for s in (1, 2)]
        xw, w_hh, h0, c0 = (jnp.stack(a) for a in zip(*probs))
        axes = (0, 0, None, 0, 0, None)
        ref = jax.vmap(lambda *a: recurrence(1, "highest", *a), in_axes=axes)(
            xw, w_hh, None, h0, c0, None)
        got = jax.jit(jax.vmap(lambda *a: pallas_recurrence(*a, interpret=interpret,
                                                            precision="highest"),
                               in_axes=axes))(xw, w_hh, None, h0, c0, None)
        errs = [rel_err(g, r) for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref))]
        say(f"\nvmapped over 2 directions ({B},{T},{H}): max rel err {max(errs):.1e}")
    except Exception:
        failed("pallas vmapped over directions")
    try:
        H = 128
        xw, w_hh, h0, c0, _ = _recurrence_problem(16, 10, H, jnp.float32)
        pallas_recurrence(xw, w_hh, None, h0, c0, None)
        say("float32 H=128 unexpectedly accepted")
    except ValueError as e:
        say(f"float32 H=128 refused as designed: {e}")


# ----------------------------------------------------------------------------- b. cuDNN check


def check_cudnn(interpret):
    banner("b. cuDNN (jax.experimental.rnn) against lstm_jax.lstm (scan)")
    cases = [(4, 50, 32, 64, 1, False, False), (3, 40, 16, 32, 2, True, True)]
    if interpret:
        cases = cases[:1]
    for B, T, D, H, L, bi, with_lengths in cases:
        label = f"B={B} T={T} D={D} H={H} layers={L} bidirectional={bi} lengths={with_lengths}"
        try:
            params = lstm_jax.init_lstm(jax.random.key(0), D, H, num_layers=L, bidirectional=bi,
                                        init="pytorch")
            x = jax.random.normal(jax.random.key(1), (B, T, D))
            lengths = jnp.array([T] + [max(1, T - 7 * i) for i in range(1, B)], jnp.int32)
            kw = dict(seq_lengths=lengths) if with_lengths else {}

            def loss(run, params, x):
                y, (h, c) = run(params, x)
                return jnp.sum(y * jnp.sin(y)) + jnp.sum(h) + jnp.sum(c * c), (y, h, c)

            ref_run = lambda p, x: lstm_jax.lstm(p, x, precision="highest", **kw)
            cud_run = lambda p, x: cudnn_lstm(p, x, precision="highest", **kw)
            g = lambda run: jax.jit(jax.value_and_grad(
                lambda p, x: loss(run, p, x), argnums=(0, 1), has_aux=True))(params, x)
            (_, out_r), grads_r = g(ref_run)
            (_, out_c), grads_c = g(cud_run)
            errs_out = [rel_err(a, b) for a, b in zip(out_c, out_r)]
            errs_grad = [rel_err(a, b) for a, b in
                         zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads_r))]
            say(f"{label}: outputs y,h,c rel err {', '.join(f'{e:.1e}' for e in errs_out)}; "
                f"grads max rel err {max(errs_grad):.1e}")
        except Exception:
            failed(f"cudnn check {label}")


# ----------------------------------------------------------------------------- c. timings


def pallas_layer(params, x, *, dtype, interpret, num_warps=None, product="mma"):
    """One Pallas layer as lstm() would run it: hoisted input product, then the kernel."""
    p = params.layers[0][0]
    xt = jnp.swapaxes(x, 0, 1).astype(dtype)
    xw = jnp.matmul(xt, p.w_ih.astype(dtype), preferred_element_type=jnp.float32) + p.b
    B, H = x.shape[0], p.w_hh.shape[0]
    h0 = jnp.zeros((B, H), dtype)
    c0 = jnp.zeros((B, H), jnp.float32)
    ys, _ = pallas_recurrence(xw, p.w_hh.astype(dtype), None, h0, c0, None,
                              interpret=interpret, num_warps=num_warps, product=product)
    return jnp.swapaxes(ys, 0, 1).astype(x.dtype)


def _time(fn, budget_s: float, min_reps: int = 5, max_reps: int = 50) -> float:
    """Median milliseconds of fn() (which blocks), after warm-up."""
    fn()
    fn()
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    reps = int(min(max_reps, max(min_reps, budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def jax_timers(apply, params, x):
    def loss(params, x):
        return jnp.sum(apply(params, x).astype(jnp.float32))

    fwd = jax.jit(apply)
    fwdbwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
    t = time.perf_counter()
    jax.block_until_ready(fwdbwd(params, x))
    jax.block_until_ready(fwd(params, x))
    compile_s = time.perf_counter() - t
    return (
        {"fwdbwd": lambda: jax.block_until_ready(fwdbwd(params, x)),
         "fwd": lambda: jax.block_until_ready(fwd(params, x))},
        compile_s,
    )


def torch_timers(B, T, D, H, dtype_name):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(D, H, batch_first=True).to(device=device, dtype=dtype)
    x = torch.randn(B, T, D, device=device, dtype=dtype, requires_grad=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def fwdbwd():
        y, _ = lstm(x)
        y.float().sum().backward()
        sync()

    def fwd():
        with torch.no_grad():
            lstm(x)
        sync()

    return {"fwdbwd": fwdbwd, "fwd": fwd}


def time_all(shapes, interpret, budget_end):
    banner("c. Timings (median ms)")
    results = {}  # (shape, impl, mode) -> ms or str
    notes = {}
    for shape in shapes:
        B, T, D, H = shape
        params = lstm_jax.init_lstm(jax.random.key(0), D, H, init="pytorch")
        x = jax.random.normal(jax.random.key(1), (B, T, D))
        pallas_dtype = next((d for d in (jnp.float32, jnp.bfloat16) if fits_on_chip(H, d)), None)
        impls = [("scan", lambda p, x: lstm_jax.lstm(p, x)[0])]
        if pallas_dtype is not None:
            name = f"pallas {jnp.dtype(pallas_dtype).name}"
            impls.append((name, lambda p, x, d=pallas_dtype: pallas_layer(
                p, x, dtype=d, interpret=interpret)))
        else:
            notes[(shape, "pallas")] = "W_hh does not fit on chip even in bfloat16"
        if fma_fits(H):  # W_hh in registers (product="fma"), in both precisions
            for d in (jnp.float32, jnp.bfloat16):
                impls.append((f"pallas-fma {jnp.dtype(d).name}", lambda p, x, d=d: pallas_layer(
                    p, x, dtype=d, interpret=interpret, product="fma")))
        if not interpret:
            impls.append(("cudnn", lambda p, x: cudnn_lstm(p, x)[0]))
        for name, apply in impls:
            if time.perf_counter() > budget_end:
                notes[(shape, name)] = "skipped: time budget"
                continue
            try:
                timers, compile_s = jax_timers(apply, params, x)
                for mode, fn in timers.items():
                    results[(shape, name, mode)] = _time(fn, 0.3 if not interpret else 0.05)
                notes[(shape, name)] = f"compile {compile_s:.1f}s"
            except Exception:
                failed(f"timing {name} at {shape}")
                notes[(shape, name)] = "error (see above)"
        for dtype_name in ("float32", "float16"):
            name = f"torch {dtype_name}"
            if time.perf_counter() > budget_end:
                continue
            try:
                for mode, fn in torch_timers(B, T, D, H, dtype_name).items():
                    results[(shape, name, mode)] = _time(fn, 0.3 if not interpret else 0.05)
            except Exception:
                failed(f"timing {name} at {shape}")
        say(f"done {shape} (t={time.perf_counter() - T0:.0f}s)")
    return results, notes


def render_timings(shapes, results, notes):
    say()
    impl_names = sorted({k[1] for k in results} | {k[1] for k in notes},
                        key=lambda n: (("scan", "pallas", "cudnn", "torch").index(
                            n.split()[0].split("-")[0]), n))
    jax_names = [n for n in impl_names if not n.startswith("torch")]
    say("| B,T,D,H | mode | " + " | ".join(impl_names)
        + " | best lstm_jax / torch best | us/step (best lstm_jax) |")
    say("|---|---|" + "---|" * len(impl_names) + "---|---|")
    for shape in shapes:
        for mode in ("fwdbwd", "fwd"):
            row = [results.get((shape, n, mode)) for n in impl_names]
            torch_best = min((results[(shape, n, mode)] for n in impl_names
                              if n.startswith("torch") and (shape, n, mode) in results),
                             default=None)
            ours = {n: results[(shape, n, mode)] for n in jax_names if (shape, n, mode) in results}
            best = min(ours.items(), key=lambda kv: kv[1]) if ours else None
            cells = []
            for n, v in zip(impl_names, row):
                if v is None:
                    cells.append("n/a")
                elif torch_best:
                    cells.append(f"{v:.3f} ({v / torch_best:.2f}x)")
                else:
                    cells.append(f"{v:.3f}")
            ratio = f"{best[1] / torch_best:.2f}x ({best[0]})" if best and torch_best else "n/a"
            per_step = f"{1e3 * best[1] / shape[1]:.2f}" if best else "n/a"
            say(f"| {','.join(map(str, shape))} | {mode} | " + " | ".join(cells)
                + f" | {ratio} | {per_step} |")
    say()
    say("Ratios in brackets are to torch's faster precision (float32 or float16) in the same mode.")
    for (shape, name), note in sorted(notes.items(), key=str):
        say(f"- {','.join(map(str, shape))} {name}: {note}")
    say()
    say("Rows for lstm_jax.kernels.select.MEASURED_GPU (fwd+bwd / torch float32 fwd+bwd):")
    say("```python")
    for shape in shapes:
        ref = results.get((shape, "torch float32", "fwdbwd"))
        if not ref:
            continue
        row = {}
        for n in sorted(jax_names, key=lambda n: "bfloat16" in n):  # float32 first
            v = results.get((shape, n, "fwdbwd"))
            if v is not None:  # one precision per backend: float32 where it was measured
                row.setdefault(n.split()[0], round(v / ref, 2))
        say(f"    {tuple(shape)}: {row},")
    say("```")


def num_warps_sweep(cases, interpret, budget_end):
    banner("Pallas num_warps sweep (fwd+bwd ms)")
    for shape, dtype, *product in cases:
        product = product[0] if product else "mma"
        B, T, D, H = shape
        params = lstm_jax.init_lstm(jax.random.key(0), D, H, init="pytorch")
        x = jax.random.normal(jax.random.key(1), (B, T, D))
        for nw in (4, 8):
            if time.perf_counter() > budget_end:
                say("skipped: time budget")
                return
            try:
                apply = lambda p, x, nw=nw: pallas_layer(
                    p, x, dtype=dtype, interpret=interpret, num_warps=nw, product=product)
                timers, _ = jax_timers(apply, params, x)
                ms = _time(timers["fwdbwd"], 0.3)
                say(f"{shape} {jnp.dtype(dtype).name} {product} num_warps={nw}: {ms:.3f} ms")
            except Exception:
                failed(f"sweep {shape} {product} num_warps={nw}")


def environment():
    banner("Environment")
    say(f"- jax {jax.__version__}, backend {jax.default_backend()}, "
        f"device {jax.devices()[0].device_kind}")
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
        say(f"- torch {torch.__version__}, {gpu}, cuDNN {torch.backends.cudnn.version()}")
    except Exception as e:
        say(f"- torch unavailable: {e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interpret", action="store_true",
                    help="CPU smoke run: tiny shapes, Pallas interpreter")
    ap.add_argument("--budget", type=float, default=170.0,
                    help="seconds after which remaining timings are skipped")
    args = ap.parse_args(argv)
    interp = args.interpret
    say("# lstm_jax GPU backends: checks and timings")
    environment()
    budget_end = T0 + args.budget

    if interp:
        check_cases = [(1, 6, 8, jnp.float32, False, "highest", 1e-4),
                       (3, 5, 20, jnp.float32, True, "highest", 1e-4),
                       (3, 5, 20, jnp.float32, True, "highest", 1e-4, "fma")]
        shapes = [(1, 6, 4, 8), (3, 5, 4, 16)]
        sweep = []
    else:
        f32, bf16 = jnp.float32, jnp.bfloat16
        check_cases = [
            (1, 500, 64, f32, False, "highest", 1e-4),
            (1, 500, 64, f32, False, None, 3e-2),
            (3, 37, 40, f32, True, "highest", 1e-4),
            (64, 100, 64, f32, True, "highest", 1e-4),
            (16, 500, 128, bf16, False, None, 5e-2),
            (16, 500, 128, bf16, True, None, 5e-2),
            (1, 500, 64, bf16, False, None, 5e-2),
            (1, 500, 64, f32, False, "highest", 1e-4, "fma"),
            (3, 37, 40, f32, True, "highest", 1e-4, "fma"),
            (1, 500, 64, bf16, False, None, 5e-2, "fma"),
        ]
        shapes = [(1, 500, 64, 64), (16, 500, 128, 128), (8, 1000, 128, 256), (64, 100, 256, 256)]
        sweep = [((1, 500, 64, 64), f32, "fma"), ((1, 500, 64, 64), f32),
                 ((16, 500, 128, 128), bf16), ((1, 500, 64, 64), bf16)]
    try:
        check_pallas(check_cases, interp)
    except Exception:
        failed("part a")
    try:
        check_cudnn(interp)
    except Exception:
        failed("part b")
    try:
        results, notes = time_all(shapes, interp, budget_end)
        render_timings(shapes, results, notes)
    except Exception:
        failed("part c")
    if sweep:
        try:
            num_warps_sweep(sweep, interp, budget_end + 30)
        except Exception:
            failed("sweep")
    say(f"\ntotal {time.perf_counter() - T0:.0f}s")
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gpu_kernels.md").write_text("\n".join(LINES) + "\n")
        print(f"wrote {Path(out, 'gpu_kernels.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
