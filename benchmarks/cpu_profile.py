"""Scratch profiling of lstm_jax on CPU (issue 4): where does the time go against torch?

    PYTHONPATH=. python benchmarks/cpu_profile.py gemm             # machine's GEMM rate
    PYTHONPATH=. python benchmarks/cpu_profile.py parts 32,100,128,256
    PYTHONPATH=. python benchmarks/cpu_profile.py flags 32,100,128,256   # XLA flag sweep (subprocesses)
    PYTHONPATH=. python benchmarks/cpu_profile.py compile         # jit(grad) compile, 2-layer bi

Not part of the library: experiments whose winners go into the core by hand.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import numpy as np


QUIET = float(os.environ.get("QUIET", "0.15"))  # other processes' CPU share allowed
MAX_WAIT = float(os.environ.get("MAX_WAIT", "300"))


def timeit(fn, n=20, warmup=3):
    """Median ms of n calls, timed while other processes leave the CPUs alone (shared machine)."""
    from lstm_jax.bench import _cpu_counters, _others_cpu, _wait_until_quiet

    for _ in range(warmup):
        fn()
    deadline = time.perf_counter() + MAX_WAIT
    while True:
        _wait_until_quiet(QUIET, deadline, window=0.5)
        start = _cpu_counters()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        busy = _others_cpu(start, _cpu_counters())
        if busy is None or busy <= QUIET or time.perf_counter() > deadline:
            return 1e3 * statistics.median(ts)


def jtime(f, *args, n=20):
    import jax

    c = jax.jit(f).lower(*args).compile()
    return timeit(lambda: jax.block_until_ready(c(*args)), n=n)


def gemm():
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    print(f"torch threads {torch.get_num_threads()}")
    print("| M,K,N | jax ms | jax GFLOP/s | torch ms | torch GFLOP/s |\n|---|---|---|---|---|")
    for M, K, N in [
        (1, 128, 512), (1, 32, 512), (32, 256, 1024), (128, 512, 2048), (3200, 128, 1024),
        (6400, 512, 2048), (256, 3200, 1024), (512, 6400, 2048), (1024, 1024, 1024),
        (2048, 2048, 2048),
    ]:
        a = rng.standard_normal((M, K), np.float32)
        b = rng.standard_normal((K, N), np.float32)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        n = 200 if M * K * N < 1e7 else 10
        tj = jtime(jnp.matmul, ja, jb, n=n)
        ta_, tb_ = torch.from_numpy(a), torch.from_numpy(b)
        tt = timeit(lambda: torch.matmul(ta_, tb_), n=n)
        fl = 2 * M * K * N / 1e9
        print(f"| {M},{K},{N} | {tj:.4f} | {fl / tj * 1e3:.0f} | {tt:.4f} | {fl / tt * 1e3:.0f} |")


def _setup(shape, **kw):
    import jax
    import jax.numpy as jnp

    import lstm_jax

    B, T, D, H = shape
    params = lstm_jax.init_lstm(jax.random.key(0), D, H)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, D), np.float32))

    def loss(p, xx):
        return jnp.sum(lstm_jax.lstm(p, xx, **kw)[0])

    return params, x, jax.grad(loss, argnums=(0, 1)), loss


def torch_time(shape, n=10):
    import torch

    B, T, D, H = shape
    m = torch.nn.LSTM(D, H, batch_first=True)
    x = torch.randn(B, T, D, requires_grad=True)
    inp = list(m.parameters()) + [x]

    def fb():
        y, _ = m(x)
        torch.autograd.grad(y.sum(), inp)

    def f():
        with torch.no_grad():
            m(x)

    return timeit(fb, n=n), timeit(f, n=n)


def parts(shape_text):
    """fwd+bwd of lstm_jax split into its pieces, each jitted alone."""
    import jax
    import jax.numpy as jnp

    from lstm_jax._recurrence import recurrence

    shape = tuple(int(v) for v in shape_text.split(","))
    B, T, D, H = shape
    n = 10
    tfb, tf = torch_time(shape, n)
    print(f"torch fwd+bwd {tfb:.2f} ms, fwd {tf:.2f} ms")
    fl = 2 * T * B * 4 * H * (D + H)
    for u in (1, 2, 4, 8):
        params, x, g, loss = _setup(shape, unroll=u)
        t = jtime(g, params, x, n=n)
        tfw = jtime(loss, params, x, n=n)
        ta = jtime(jax.grad(loss, argnums=(0, 1)), params, x, n=n) if False else None
        print(f"lstm_jax u={u}: fwd+bwd {t:.2f} ms ({t / tfb:.2f}x, {3 * fl / t / 1e6:.0f} GFLOP/s), "
              f"fwd {tfw:.2f} ms ({tfw / tf:.2f}x)")
        del ta
    rng = np.random.default_rng(1)
    p = params.layers[0][0]
    xw = jnp.asarray(rng.standard_normal((T, B, 4 * H), np.float32))
    h0 = jnp.zeros((B, H))
    c0 = jnp.zeros((B, H))
    for u in (1, 4):
        def fwd_loop(xw, w):
            return recurrence(u, None, xw, w, None, h0, c0, None)[0]

        def fb_loop(xw, w):
            return jax.grad(lambda a, b: jnp.sum(fwd_loop(a, b)), argnums=(0, 1))(xw, w)

        tl = jtime(fwd_loop, xw, p.w_hh, n=n)
        tb = jtime(fb_loop, xw, p.w_hh, n=n)
        print(f"  recurrence alone u={u}: fwd {tl:.2f} ms ({1e3 * tl / T:.1f} us/step), "
              f"fwd+bwd {tb:.2f} ms ({1e3 * tb / T:.1f} us/step)")
    # The per-step matmul alone, T times in a loop.
    hb = jnp.asarray(rng.standard_normal((B, H), np.float32))

    def mm_loop(h, w):
        def body(c, _):
            return jnp.tanh(c @ w)[:, :H], None
        return jax.lax.scan(body, h, None, length=T)[0]

    print(f"  T x (h @ w_hh) + tanh in a scan: {jtime(mm_loop, hb, p.w_hh, n=n):.2f} ms")
    tin = jtime(lambda a, b: a @ b, x.reshape(B * T, D), p.w_ih, n=n)
    print(f"  hoisted x @ w_ih: {tin:.3f} ms")


FLAG_SETS = [
    "",
    "--xla_cpu_experimental_ynn_fusion_type=",
    "--xla_cpu_use_multi_output_fusion=true",
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_cpu_use_thunk_runtime=false",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_experimental_xnn_fusion_type=dot",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_small_while_loop_byte_threshold=1000000000",
    "--xla_cpu_disable_loop_unrolling=true",
]


def one(shape_text, unrolls="1,4"):
    shape = tuple(int(v) for v in shape_text.split(","))
    out = []
    for u in (int(v) for v in unrolls.split(",")):
        params, x, g, loss = _setup(shape, unroll=u)
        out.append(f"u={u} fwdbwd {jtime(g, params, x, n=10):.2f} fwd {jtime(loss, params, x, n=10):.2f}")
    tfb, tf = torch_time(shape, 10)
    print(" | ".join(out) + f" | torch {tfb:.2f} / {tf:.2f}")


def flags(shape_text, unrolls="1,4"):
    for fl in FLAG_SETS:
        env = dict(os.environ, XLA_FLAGS=fl)
        r = subprocess.run([sys.executable, __file__, "one", shape_text, unrolls], env=env,
                           capture_output=True, text=True)
        tail = (r.stdout.strip() or r.stderr.strip().splitlines()[-1:] or ["?"])
        print(f"{fl or '(none)'}: {tail if isinstance(tail, str) else tail[0]}", flush=True)


def kparts(shape_text):
    """fwd+bwd of backend="cpu" split into the kernel calls and XLA's products around them."""
    import jax
    import jax.numpy as jnp

    from lstm_jax.kernels.cpu_native import _forward, cpu_recurrence

    shape = tuple(int(v) for v in shape_text.split(","))
    B, T, D, H = shape
    n = 10
    fl = 2 * T * B * 4 * H * (D + H)
    tfb, tf = torch_time(shape, n)
    print(f"torch fwd+bwd {tfb:.2f} ms, fwd {tf:.2f} ms")
    params, x, g, loss = _setup(shape, backend="cpu")
    t = jtime(g, params, x, n=n)
    print(f"cpu kernel: fwd+bwd {t:.2f} ms ({t / tfb:.2f}x, {3 * fl / t / 1e6:.0f} GFLOP/s), "
          f"fwd {jtime(loss, params, x, n=n):.2f} ms")
    rng = np.random.default_rng(1)
    p = params.layers[0][0]
    xw = jnp.asarray(rng.standard_normal((T, B, 4 * H), np.float32))
    xt = jnp.asarray(rng.standard_normal((T, B, D), np.float32))
    h0 = c0 = jnp.zeros((B, H))
    cfg = (os.cpu_count(), 0, 0)  # threads, helper wait (none), the step helpers may join

    def fwd_train(xw, w):
        return _forward(cfg, xw, None, w, None, h0, c0, None, p.b, save=True)

    def fwd_bwd(xw, w):
        return jax.grad(lambda a, b: jnp.sum(cpu_recurrence(a, b, None, h0, c0, None, p.b)[0]),
                        argnums=(0, 1))(xw, w)

    rec = 2 * T * B * 4 * H * H
    tk = jtime(fwd_train, xw, p.w_hh, n=n)
    tkb = jtime(fwd_bwd, xw, p.w_hh, n=n)
    print(f"  kernel forward (train) {tk:.2f} ms ({rec / tk / 1e6:.0f} GFLOP/s); "
          f"recurrence fwd+bwd incl. dW_hh {tkb:.2f} ms")
    dz = xw
    ys = jnp.asarray(rng.standard_normal((T, B, H), np.float32))
    prods = {
        "x @ w_ih": (lambda a, w: jnp.einsum("tbd,dg->tbg", a, w), xt, p.w_ih, D),
        "dx = dz @ w_ih^T": (lambda z, w: jnp.einsum("tbg,dg->tbd", z, w), dz, p.w_ih, D),
        "dw_ih = x^T dz": (lambda a, z: jnp.einsum("tbd,tbg->dg", a, z), xt, dz, D),
        "dw_hh = h^T dz": (lambda a, z: jnp.einsum("tbh,tbg->hg", a, z), ys, dz, H),
    }
    for name, (f, a, b_, k) in prods.items():
        tp = jtime(f, a, b_, n=n)
        print(f"  {name}: {tp:.2f} ms ({2 * T * B * 4 * H * k / tp / 1e6:.0f} GFLOP/s)")


def compile_times():
    import jax
    import jax.numpy as jnp

    import lstm_jax

    params = lstm_jax.init_lstm(jax.random.key(0), 128, 256, num_layers=2, bidirectional=True)
    for T in (10, 100, 1000, 5000):
        x = jnp.ones((8, T, 128)) * 0.1
        for u in (1, 2, 4, 8):
            def loss(p, xx):
                return jnp.sum(lstm_jax.lstm(p, xx, unroll=u)[0])
            t0 = time.perf_counter()
            jax.jit(jax.grad(loss)).lower(params, x).compile()
            print(f"T={T} unroll={u}: jit(grad) lower+compile {time.perf_counter() - t0:.2f} s",
                  flush=True)


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    {"gemm": gemm, "parts": parts, "flags": flags, "one": one, "compile": compile_times,
     "kparts": kparts}[cmd](*rest)
