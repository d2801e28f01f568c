"""The C++ CPU kernel (``backend="cpu"``) against the scan recurrence and torch, its build.

The kernel is compiled on first use (a few seconds, then cached); without a working compiler
these tests skip, as ``backend="auto"`` then keeps the scan.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import lengths_mask, normal

import lstm_jax
from lstm_jax._recurrence import recurrence, remat_recurrence
from lstm_jax.kernels import (
    choose_backend,
    cpu_layer,
    cpu_native,
    cpu_recurrence,
    cpu_remat_layer,
    select,
)

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or cpu_native.unavailable_reason() is not None,
    reason=f"the CPU kernel cannot run here: {cpu_native.unavailable_reason()}",
)


def _problem(steps, batch, hidden, seed=0, lengths=False, bias=True):
    xw = normal((seed, 0), (steps, batch, 4 * hidden))
    w_hh = normal((seed, 1), (hidden, 4 * hidden), 1 / np.sqrt(hidden))
    h0 = normal((seed, 2), (batch, hidden), 0.5)
    c0 = normal((seed, 3), (batch, hidden))
    b = normal((seed, 4), (4 * hidden,), 0.1) if bias else None
    mask = lengths_mask((seed, 5), steps, batch) if lengths else None
    return xw, w_hh, h0, c0, mask, b


def _outputs_and_grads(loop, xw, w_hh, h0, c0, mask, b):
    """Outputs and the gradients of a loss touching every output, for (xw, w_hh, h0, c0, b)."""

    def loss(xw, w_hh, h0, c0, b):
        ys, (h, c) = loop(xw, w_hh, None, h0, c0, mask, b)
        weights = jnp.sin(jnp.arange(ys.size, dtype=jnp.float32)).reshape(ys.shape)
        return jnp.sum(ys * weights) + jnp.sum(h * h) + 0.7 * jnp.sum(jnp.cos(c)), (ys, h, c)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
    (_, outs), grads = jax.jit(grad)(xw, w_hh, h0, c0, b)
    return outs, grads


def _scan(xw, w_hh, w_hr, h0, c0, mask, b):
    return recurrence(1, "highest", xw, w_hh, w_hr, h0, c0, mask, b)


def _assert_close_trees(got, want, rtol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        w = np.asarray(w)  # (in NumPy: jnp would compile a max and an abs for every shape)
        scale = float(np.max(np.abs(w))) + 1e-6
        np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize(
    "steps,batch,hidden,lengths,bias",
    [
        (6, 3, 5, False, True),     # 4H = 20: two 8-wide panels and a 4-column tail
        (9, 5, 24, True, False),    # rows in blocks of 4 and 1; no bias
        (70, 1, 128, False, True),  # long enough for a team of threads to split the units
        (66, 2, 136, True, True),   # a team with unequal parts (72 and 64 units)
    ],
    ids=["tails", "rows-mask-nobias", "team", "team-uneven-mask"],
)
def test_matches_scan_forward_and_gradients(steps, batch, hidden, lengths, bias):
    problem = _problem(steps, batch, hidden, lengths=lengths, bias=bias)
    got_out, got_grads = _outputs_and_grads(cpu_recurrence, *problem)
    want_out, want_grads = _outputs_and_grads(_scan, *problem)
    _assert_close_trees(got_out, want_out, 2e-6)
    _assert_close_trees([g for g in got_grads if g is not None],
                        [g for g in want_grads if g is not None], 1e-5)


def _projected(steps, batch, hidden, proj, seed=1, lengths=False):
    xw, w_hh, h0, c0, mask, b = _problem(steps, batch, hidden, seed=seed, lengths=lengths)
    w_hh = normal((seed, 10), (proj, 4 * hidden), 1 / np.sqrt(proj))
    w_hr = normal((seed, 11), (hidden, proj), 1 / np.sqrt(hidden))
    h0 = normal((seed, 12), (batch, proj), 0.5)
    return xw, w_hh, w_hr, h0, c0, mask, b


@pytest.mark.parametrize(
    "steps,batch,hidden,proj,lengths",
    [
        (6, 3, 5, 3, False),      # tails everywhere, one thread
        (9, 5, 24, 16, True),     # row blocks, masks
        (70, 2, 128, 64, False),  # a team: r and dh + dy exchanged at every step too
        (80, 2, 136, 40, True),   # a team with unequal parts of H (72, 64) and of P (40, 0)
    ],
    ids=["tails", "rows-mask", "team", "team-uneven-mask"],
)
def test_projection_matches_scan_forward_and_gradients(steps, batch, hidden, proj, lengths):
    # proj_size (Sak et al. 2014): h_t = (o * tanh(c_t)) @ w_hr is what is fed back.
    xw, w_hh, w_hr, h0, c0, mask, b = _projected(steps, batch, hidden, proj, lengths=lengths)

    def loss(loop, xw, w_hh, w_hr, h0, c0, b):
        ys, (h, c) = loop(xw, w_hh, w_hr, h0, c0, mask, b)
        weights = jnp.sin(jnp.arange(ys.size, dtype=jnp.float32)).reshape(ys.shape)
        return jnp.sum(ys * weights) + jnp.sum(h * h) + 0.7 * jnp.sum(jnp.cos(c)), (ys, h, c)

    # The caller runs 3 steps alone, then the helpers join (in the team cases).
    kernel = lambda *a: cpu_native._cpu_loop((2, 200_000, 3), a[0], None, *a[1:])
    grads = lambda loop: jax.jit(jax.value_and_grad(
        lambda *a: loss(loop, *a), argnums=(0, 1, 2, 3, 4, 5), has_aux=True))(
        xw, w_hh, w_hr, h0, c0, b)
    (_, got_out), got_grads = grads(kernel)
    (_, want_out), want_grads = grads(_scan)
    assert got_out[0].shape == (steps, batch, proj) and got_out[1].shape == (batch, proj)
    _assert_close_trees(got_out, want_out, 2e-6)
    _assert_close_trees(got_grads, want_grads, 1e-5)


@pytest.mark.parametrize(
    "steps,batch,inputs,hidden,proj,lengths,bias",
    [
        (6, 3, 5, 5, None, False, True),      # tails everywhere, one thread, dx by XLA
        (9, 17, 24, 16, None, True, False),   # dx in the kernel; row blocks, masks, no bias
        (12, 16, 40, 128, None, True, True),  # a team; input columns split 24 + 16
        (10, 16, 20, 136, 40, True, True),    # a team with a projection
        (3, 4, 8, 512, None, True, True),     # 4H = 2048: the weight gradients' wide items
        (3, 5, 8, 512, 24, False, True),      # the same with a projection
        (3, 260, 8, 64, None, True, True),    # batch 260: more than a weight-gradient block
        (2, 3, 16, 2048, None, False, True),  # H = 2048, the largest that auto sends here
        (50, 66, 8, 130, None, True, True),   # >= 8 MiB saved: streaming stores, unaligned
    ],
    ids=["tails", "rows-mask-nobias", "team", "team-proj", "wide", "wide-proj", "b260",
         "h2048", "streamed"],
)
def test_layer_with_the_input_product_inside_matches_scan(steps, batch, inputs, hidden, proj,
                                                          lengths, bias):
    # cpu_layer forms x_t @ w_ih in the loop and dx = dz @ w_ih^T in the backward loop.
    if proj is None:
        xw, w_hh, h0, c0, mask, b = _problem(steps, batch, hidden, lengths=lengths, bias=bias)
        w_hr = None
    else:
        xw, w_hh, w_hr, h0, c0, mask, b = _projected(steps, batch, hidden, proj,
                                                     lengths=lengths)
    x = normal((7, 0), (steps, batch, inputs))
    w_ih = normal((7, 1), (inputs, 4 * hidden), 1 / np.sqrt(inputs))

    def loss(loop, x, w_ih, w_hh, w_hr, h0, c0, b):
        ys, (h, c) = loop(x, w_ih, w_hh, w_hr, h0, c0, mask, b)
        weights = jnp.sin(jnp.arange(ys.size, dtype=jnp.float32)).reshape(ys.shape)
        return jnp.sum(ys * weights) + jnp.sum(h * h) + 0.7 * jnp.sum(jnp.cos(c)), (ys, h, c)

    # The caller runs 3 steps alone, then the helpers join (in the team cases).
    kernel = lambda x, w_ih, *a: cpu_native._cpu_loop((2, 200_000, 3), x, w_ih, *a)
    scan = lambda x, w_ih, *a: _scan(jnp.einsum("tbd,dg->tbg", x, w_ih, precision="highest"),
                                     *a)
    args = (x, w_ih, w_hh, w_hr, h0, c0, b)
    grads = lambda loop: jax.jit(jax.value_and_grad(
        lambda *a: loss(loop, *a), argnums=tuple(range(7)), has_aux=True))(*args)
    (_, got_out), got_grads = grads(kernel)
    (_, want_out), want_grads = grads(scan)
    # float32 sums over D + H products: their rounding grows with sqrt(H).
    grow = max(1.0, np.sqrt(hidden / 512))
    _assert_close_trees(got_out, want_out, 2e-6 * grow)
    _assert_close_trees(got_grads, want_grads, 1e-5 * grow)
    # The public entry point (below batch 4 it forms x @ w_ih before the loop).
    _assert_close_trees(cpu_layer(x, w_ih, w_hh, w_hr, h0, c0, mask, b), want_out, 2e-6 * grow)


def _weight_grads_reference(x, h0, ys, dz):
    """[dW_ih; dW_hh] = sum_t [x_t, h_{t-1}]^T dz_t and db, in float64 NumPy."""
    h_prev = np.concatenate([h0[None], ys[:-1]], axis=0)
    a = h_prev if x is None else np.concatenate([x, h_prev], axis=-1)
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    g = dz.reshape(-1, dz.shape[-1]).astype(np.float64)
    w = a.T @ g
    d = 0 if x is None else x.shape[-1]
    return (None if x is None else w[:d]), w[d:], g.sum(axis=0)


@pytest.mark.parametrize(
    "steps,batch,inputs,out,hidden,threads",
    [
        (7, 3, 5, 6, 5, 1),         # every tail: 4H = 20, rows 5 and 6, K = 21
        (3, 300, 20, 44, 44, 2),    # h0's rows fill the first block of 256 and spill over
        (40, 8, 0, 33, 40, 2),      # no x (the gradient of xw is dz); a projection's P = 33
        (5, 26, 300, 260, 520, 2),  # D + P > 512 (blocks of 128 rows), 4H = 2080: wide items
        (11, 24, 64, 128, 128, 4),  # more threads than XLA's pool has
    ],
    ids=["tails", "h0-spans-blocks", "no-x", "wide", "threads"],
)
def test_weight_grads_match_a_float64_reference(steps, batch, inputs, out, hidden, threads):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((steps, batch, inputs), np.float32) if inputs else None
    h0 = rng.standard_normal((batch, out), np.float32)
    ys = rng.standard_normal((steps, batch, out), np.float32)
    dz = rng.standard_normal((steps, batch, 4 * hidden), np.float32)
    config = (threads, 0, 0)
    for bias in (True, False):
        got = cpu_native.weight_grads(config, None if x is None else jnp.asarray(x),
                                      jnp.asarray(h0), jnp.asarray(ys), jnp.asarray(dz), bias)
        want = _weight_grads_reference(x, h0, ys, dz)
        if not bias:
            want = want[:2] + (None,)
        for g, w in zip(got, want, strict=True):
            assert (g is None) == (w is None)
            if w is not None:
                # float32 sums of steps * batch products of unit normals
                tol = 3e-6 * np.sqrt(steps * batch) * max(1.0, float(np.abs(w).max()) ** 0.5)
                np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=tol)


def test_weight_grads_of_vmapped_problems_match_one_by_one():
    # Both directions of a bidirectional layer (and vmap) are problems of one call.
    rng = np.random.default_rng(4)
    arrays = [jnp.asarray(rng.standard_normal(s, np.float32))
              for s in ((2, 9, 4, 12), (2, 4, 16), (2, 9, 4, 16), (2, 9, 4, 64))]
    both = jax.vmap(lambda *a: cpu_native.weight_grads((2, 0, 0), *a, True))(*arrays)
    for p in range(2):
        one = cpu_native.weight_grads((2, 0, 0), *(a[p] for a in arrays), True)
        for g, w in zip(both, one, strict=True):
            np.testing.assert_array_equal(np.asarray(g[p]), np.asarray(w))


def test_layer_refuses_an_empty_input():
    xw, w_hh, h0, c0, mask, b = _problem(5, 4, 8)
    with pytest.raises(ValueError, match=r"x has no features: shape \(5, 4, 0\)"):
        cpu_layer(jnp.zeros((5, 4, 0)), jnp.zeros((0, 32)), w_hh, None, h0, c0, mask, b)


def test_masked_steps_carry_the_state_and_output_zero():
    xw, w_hh, h0, c0, _, b = _problem(5, 2, 8)
    mask = jnp.array([[True, False]] * 2 + [[False, False]] * 3)  # row 0 stops after 2 steps
    ys, (h, c) = cpu_recurrence(xw, w_hh, None, h0, c0, mask, b)
    assert np.all(np.asarray(ys[2:]) == 0) and np.all(np.asarray(ys[:, 1]) == 0)
    np.testing.assert_array_equal(h[1], h0[1])
    np.testing.assert_array_equal(c[1], c0[1])
    np.testing.assert_array_equal(h[0], ys[1, 0])


@pytest.mark.parametrize("join_step", [0, 5, 79], ids=["from-start", "mid-run", "last-step"])
def test_threads_do_not_change_a_bit(join_step):
    # At H = 128 each thread's part is whole 64-column panels, so every output element is
    # summed in the same order whichever thread or row block forms it, and the team split
    # and the row blocking leave the numbers bit-identical (parts with narrower tail panels,
    # H = 130, split some sums differently and differ by rounding). The caller
    # runs alone until `join_step`, then waits (long) for the helpers there: the team forms
    # at that step wherever XLA's pool has a second thread, as when a helper comes late.
    problem = _problem(80, 3, 128, lengths=True)
    one_out, one_grads = _outputs_and_grads(
        lambda *a: cpu_recurrence(*a, threads=1), *problem)
    many_out, many_grads = _outputs_and_grads(
        lambda *a: cpu_native._cpu_loop((4, 200_000, join_step), a[0], None, *a[1:]), *problem)
    for a, b in zip(jax.tree.leaves((one_out, one_grads)), jax.tree.leaves((many_out, many_grads))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vmapped_problems_match_one_by_one():
    xw, w_hh, h0, c0, mask, b = _problem(7, 2, 16, lengths=True)
    stack = lambda a: jnp.stack([a, 0.5 * a, -a])
    scales = (1.0, 0.5, -1.0)

    def loss(xw, w, h, c):
        ys, (h_n, c_n) = cpu_recurrence(xw, w, None, h, c, mask, b)
        return jnp.sum(ys * jnp.cos(ys)) + jnp.sum(h_n ** 2) + jnp.sum(c_n), (ys, h_n, c_n)

    value_and_grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    (_, outs), grads = jax.jit(jax.vmap(value_and_grad))(
        stack(xw), stack(w_hh), stack(h0), stack(c0))
    for i, scale in enumerate(scales):
        (_, outs_i), grads_i = value_and_grad(scale * xw, scale * w_hh, scale * h0, scale * c0)
        for got, want in zip(jax.tree.leaves((outs, grads)), jax.tree.leaves((outs_i, grads_i)),
                             strict=True):
            np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch", [3, 16])
def test_lstm_cpu_backend_matches_scan_bidirectional_stack(batch):
    # Both directions of a layer are two problems of one call, one per thread; from batch 16
    # each forms dx_t inside its backward loop.
    params = lstm_jax.init_lstm(jax.random.key(3), input_size=6, hidden_size=16, num_layers=2,
                                bidirectional=True)
    x = normal(4, (batch, 9, 6))
    lengths = jnp.array([9, 4, 1] + [9 - i % 9 for i in range(batch - 3)])

    def loss(backend):
        def f(p, x):
            y, s = lstm_jax.lstm(p, x, seq_lengths=lengths, backend=backend)
            return jnp.sum(y * jnp.sin(y)) + jnp.sum(s.h) + jnp.sum(s.c ** 2), (y, s)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)

    (_, got), got_grads = loss("cpu")
    (_, want), want_grads = loss("scan")
    _assert_close_trees(got, want, 2e-6)
    _assert_close_trees(got_grads, want_grads, 1e-5)


@pytest.mark.parametrize(
    "config",
    [dict(num_layers=2), dict(num_layers=2, proj_size=4, bidirectional=True)],
    ids=["L2", "L2-bi-proj4"],
)
def test_lstm_cpu_backend_matches_torch(config):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.LSTM(5, 12, batch_first=True, **config)
    x = np.random.default_rng(0).standard_normal((4, 11, 5)).astype(np.float32)
    y_t, (h_t, c_t) = module(torch.tensor(x))
    y, state = lstm_jax.lstm(lstm_jax.from_torch(module.state_dict()), x, backend="cpu")
    np.testing.assert_allclose(y, y_t.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.h, h_t.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.c, c_t.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_rejects_what_it_cannot_run():
    xw, w_hh, h0, c0, _, _ = _problem(3, 2, 8)
    with pytest.raises(ValueError, match=r"h0 has shape \(1, 8\), expected \(2, 8\)"):
        cpu_recurrence(xw, w_hh, None, h0[:1], c0, None)
    with pytest.raises(ValueError, match=r"mask has shape \(3,\), expected \(3, 2\)"):
        cpu_recurrence(xw, w_hh, None, h0, c0, jnp.ones((3,), bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        cpu_recurrence(xw, w_hh, None, h0, c0, jnp.ones((3, 2)))
    with pytest.raises(ValueError, match=r"b has shape \(8,\), expected \(32,\)"):
        cpu_recurrence(xw, w_hh, None, h0, c0, None, jnp.ones((8,)))
    with pytest.raises(ValueError, match=r"w_hh has shape \(8, 32\), expected \(4, 32\)"):
        cpu_recurrence(xw, w_hh, jnp.ones((8, 4)), h0, c0, None)  # w_hh must be (P, 4H)
    with pytest.raises(ValueError, match=r"w_hr has shape \(4, 4\), expected \(8, P\)"):
        cpu_recurrence(xw, w_hh[:4], jnp.ones((4, 4)), h0[:, :4], c0, None)
    with pytest.raises(ValueError, match="float32 only"):
        cpu_recurrence(xw, w_hh.astype(jnp.bfloat16), None, h0, c0, None)
    with pytest.raises(ValueError, match=r"expected \(8, 32\)"):
        cpu_recurrence(xw, w_hh[:4], None, h0, c0, None)
    params = lstm_jax.init_lstm(jax.random.key(0), 3, 8, cifg=True)
    with pytest.raises(ValueError, match='backend="cpu" cannot run this call: .*variants'):
        lstm_jax.lstm(params, jnp.ones((2, 5, 3)), backend="cpu")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(platform="gpu"), "only on CPU"),
        (dict(platform="cpu", has_variants=True), "variants"),
        (dict(platform="cpu", dtype=jnp.bfloat16), "float32 only"),
    ],
)
def test_explicit_cpu_backend_that_cannot_run_says_why(kwargs, match):
    with pytest.raises(ValueError, match=match):
        choose_backend("cpu", batch=1, hidden=64, **kwargs)


def test_auto_on_cpu_follows_the_measurements():
    table = {(1, 1000, 32, 128): {"scan": 1.0, "cpu": 0.6},
             (32, 100, 128, 256): {"scan": 1.1, "cpu": 1.2}}
    pick = lambda **kw: choose_backend("auto", platform="cpu", table=table, **kw)
    assert pick(batch=1, hidden=128) == "cpu"
    assert pick(batch=1, hidden=100) == "cpu"  # nearest measured shape
    assert pick(batch=2, hidden=100) == "scan"  # above the largest batch where it won
    assert pick(batch=32, hidden=256) == "scan"
    assert pick(batch=1, hidden=256) == "scan"  # above the largest H where the kernel won
    assert pick(batch=1, hidden=128, proj=8) == "cpu"
    # cpu_remat_layer, but not below batch 4 from H = 512 (a chunk's steps there do not pay
    # for packing W again): select.REMAT_SMALL_BATCH, REMAT_WIDE_HIDDEN.
    wide = {(1, 1000, 32, 1024): {"scan": 1.0, "cpu": 0.6},
            (64, 100, 64, 1024): {"scan": 1.0, "cpu": 0.9}}
    remat = lambda batch, hidden: choose_backend("auto", platform="cpu", table=wide,
                                                 batch=batch, hidden=hidden, remat=True)
    assert [remat(b, 256) for b in (1, 3, 4, 64)] == ["cpu"] * 4
    assert [remat(b, 512) for b in (1, 3, 4, 64)] == ["scan", "scan", "cpu", "cpu"]
    assert [choose_backend("auto", platform="cpu", table=wide, batch=b, hidden=512)
            for b in (1, 3)] == ["cpu"] * 2
    for kw in (dict(has_variants=True), dict(dtype=jnp.bfloat16), dict(custom_grad=False)):
        assert pick(batch=1, hidden=128, **kw) == "scan"
    assert choose_backend("auto", platform="cpu", table={}, batch=1, hidden=128) == "scan"
    assert choose_backend("auto", platform="tpu", table=table, batch=1, hidden=128) == "scan"


def test_a_failed_build_says_what_failed(tmp_path):
    with pytest.raises(RuntimeError, match="failed"):
        cpu_native.build(str(tmp_path / "no-such-compiler"), tmp_path / "kernel.so")
    assert not (tmp_path / "kernel.so").exists()


def test_without_a_compiler_auto_keeps_the_scan(tmp_path):
    # A fresh process with no compiler and an empty cache: the reason names the compiler,
    # backend="auto" runs the scan and backend="cpu" says why it cannot.
    script = (
        "import jax, jax.numpy as jnp, lstm_jax\n"
        "from lstm_jax.kernels import cpu_native, select\n"
        "reason = cpu_native.unavailable_reason(); print(reason)\n"
        "table = {(1, 10, 3, 8): {'scan': 1.0, 'cpu': 0.5}}\n"
        "print(select.choose_backend('auto', platform='cpu', batch=1, hidden=8, table=table))\n"
        "p = lstm_jax.init_lstm(jax.random.key(0), 3, 8)\n"
        "try:\n"
        "    lstm_jax.lstm(p, jnp.ones((1, 4, 3)), backend='cpu')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    env = {"PATH": "/nonexistent", "CXX": str(tmp_path / "missing-c++"),
           "LSTM_JAX_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "failed" in lines[0] and "missing-c++" in lines[0]
    assert lines[1] == "scan"
    assert lines[2].startswith('backend="cpu" cannot run this call: building the CPU kernel')


def test_a_broken_cached_build_is_rebuilt_and_readable(tmp_path):
    # A truncated .so in the cache (a killed build, a full disk) is rebuilt, not a permanent
    # "unavailable"; the new file is readable by others where the umask allows (shared caches).
    script = (
        "import os, stat\n"
        "from lstm_jax.kernels import cpu_native\n"
        # Unoptimised: the rebuild is what is tested, and -O0 halves its 7-13 s.
        "cpu_native._FLAGS = tuple(f for f in cpu_native._FLAGS if f != '-O3') + ('-O0',)\n"
        "path = cpu_native.library_path(cpu_native._compiler())\n"
        "path.parent.mkdir(parents=True); path.write_bytes(b'not a library')\n"
        "print(cpu_native.unavailable_reason())\n"
        "print(oct(stat.S_IMODE(os.stat(path).st_mode)))\n"
    )
    env = dict(os.environ, LSTM_JAX_CACHE_DIR=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", "import os; os.umask(0o022)\n" + script],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "0o755"]


def test_cxx_may_carry_a_wrapper(monkeypatch):
    monkeypatch.setenv("CXX", "ccache g++ ")
    assert cpu_native._compiler() == ["ccache", "g++"]
    monkeypatch.delenv("CXX")
    assert cpu_native._compiler()[0].endswith(("c++", "g++"))


def test_cache_key_follows_source_compiler_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("LSTM_JAX_CACHE_DIR", str(tmp_path))
    first = cpu_native.library_path("c++")
    assert first.parent == tmp_path and first.suffix == ".so"
    assert cpu_native.library_path(["c++"]) == first
    assert cpu_native.library_path("ccache c++") != first
    monkeypatch.setattr(cpu_native, "_cpu_signature", lambda: "another CPU")
    assert cpu_native.library_path("c++") != first


def test_default_cpu_table_follows_the_measurements():
    # The kernel measured faster from batch 1 to 256 and H 64 to 2048 (but 256 x 1024).
    for batch, hidden in ((1, 64), (1, 128), (4, 128), (8, 256), (16, 128), (32, 256),
                          (64, 128), (1, 1024), (8, 512), (128, 512), (256, 256), (1, 2048),
                          (8, 2048)):
        assert choose_backend("auto", platform="cpu", batch=batch, hidden=hidden) == "cpu"
    assert choose_backend("auto", platform="cpu", batch=256, hidden=1024) == "scan"  # a tie
    # Where the scan measured faster, it stays (a table with one such shape).
    table = {(128, 50, 512, 512): {"scan": 1.10, "cpu": 1.12},
             (8, 100, 64, 256): {"scan": 1.2, "cpu": 0.9}}
    assert choose_backend("auto", platform="cpu", batch=128, hidden=512, table=table) == "scan"
    assert choose_backend("auto", platform="cpu", batch=8, hidden=256, table=table) == "cpu"
    # Outside the range where the kernel was measured winning: the scan, whatever the
    # nearest measured shape says.
    assert choose_backend("auto", platform="cpu", batch=1, hidden=4096) == "scan"
    assert choose_backend("auto", platform="cpu", batch=512, hidden=128) == "scan"


def test_the_kernel_checks_every_buffer_shape():
    # Called directly (not through cpu_recurrence), a mis-shaped buffer is refused by the
    # kernel itself instead of being read out of bounds.
    f32 = jnp.float32
    results = [jax.ShapeDtypeStruct(s, f32) for s in ((5, 4, 8), (4, 8), (4, 8))]
    call = jax.ffi.ffi_call("lstm_jax_cpu_infer_forward", results)
    # xw, bias, w_ih and w_hr (placeholders without the input product and a projection),
    # w_hh, h0, c0, mask
    args = [jnp.zeros((5, 4, 32)), jnp.zeros(32), jnp.zeros((1, 1)), jnp.zeros((8, 32)),
            jnp.zeros((1, 1)), jnp.zeros((1, 8)), jnp.zeros((4, 8)), jnp.ones((1, 1), bool)]
    flags = dict(threads=1, grace_us=0, join_step=0, has_mask=False, has_proj=False,
                 has_input=False)
    with pytest.raises(Exception, match=r"h0 has shape \(1, 8\), expected \(4, 8\)"):
        jax.block_until_ready(call(*args, **flags))
    args[5] = jnp.zeros((4, 8))
    with pytest.raises(Exception, match=r"mask has shape \(1, 1\), expected \(5, 4\)"):
        jax.block_until_ready(call(*args, **(flags | dict(has_mask=True))))
    with pytest.raises(Exception, match=r"w_hr has shape \(1, 1\), expected \(8, 8\)"):
        jax.block_until_ready(call(*args, **(flags | dict(has_proj=True))))
    # With the input product inside, the first buffer is x (T, B, D) and w_ih is (D, 4H).
    x_args = [jnp.zeros((5, 4, 3))] + args[1:]
    with pytest.raises(Exception, match=r"w_ih has shape \(1, 1\), expected \(3, 32\)"):
        jax.block_until_ready(call(*x_args, **(flags | dict(has_input=True))))
    ys, h, c = call(*args, **flags)
    assert ys.shape == (5, 4, 8) and np.all(np.asarray(ys) == 0)  # zero weights, zero state
    # The backward call with dx inside: a dx buffer of the wrong shape is refused too.
    back = jax.ffi.ffi_call("lstm_jax_cpu_backward", [jax.ShapeDtypeStruct(s, f32) for s in (
        (5, 4, 32), (4, 8), (4, 8), (1, 1, 1), (5, 4, 2))])
    # w_ih, w_hh, w_hr, acts, c_prev, dys, dh_n, dc_n, mask
    back_args = [jnp.zeros((3, 32)), jnp.zeros((8, 32)), jnp.zeros((1, 1)), jnp.zeros((5, 4, 32)),
                 jnp.zeros((5, 4, 8)), jnp.zeros((5, 4, 8)), jnp.zeros((4, 8)), jnp.zeros((4, 8)),
                 jnp.ones((1, 1), bool)]
    with pytest.raises(Exception, match=r"dx has shape \(5, 4, 2\), expected \(5, 4, 3\)"):
        jax.block_until_ready(back(*back_args, **(flags | dict(has_input=True))))
    # The weight gradients: x, h0, ys, dz -> dw_ih, dw_hh, db.
    grads = jax.ffi.ffi_call("lstm_jax_cpu_weight_grad", [jax.ShapeDtypeStruct(s, f32) for s in (
        (3, 32), (8, 32), (32,))])
    grad_args = [jnp.zeros((5, 4, 3)), jnp.zeros((4, 8)), jnp.zeros((5, 4, 8)),
                 jnp.zeros((5, 4, 32))]
    grad_flags = {"threads": 1, "has_input": True, "has_bias": True}
    with pytest.raises(Exception, match=r"ys has shape \(5, 3, 8\), expected \(5, 4, 8\)"):
        jax.block_until_ready(grads(*grad_args[:2], jnp.zeros((5, 3, 8)), grad_args[3],
                                    **grad_flags))
    with pytest.raises(Exception, match=r"dz must be \(\.\.\., T, B, 4H\) and dw_hh"):
        jax.block_until_ready(grads(*grad_args[:3], jnp.zeros((5, 4, 31)), **grad_flags))
    # Two problems (vmap) but room for one gradient: refused, not written past its end.
    two = jax.ffi.ffi_call("lstm_jax_cpu_weight_grad", [jax.ShapeDtypeStruct(s, f32) for s in (
        (2, 3, 32), (1, 8, 32), (2, 32))])
    with pytest.raises(Exception, match=r"dw_hh has shape \(1, 8, 32\), expected \(2, 8, 32\)"):
        jax.block_until_ready(two(*(jnp.stack([a, a]) for a in grad_args), **grad_flags))
    dw_ih, dw_hh, db = grads(*grad_args, **grad_flags)
    assert dw_ih.shape == (3, 32) and db.shape == (32,)
    assert not np.any(np.asarray(dw_hh)) and not np.any(np.asarray(db))  # dz = 0


def test_nan_and_inf_propagate_as_in_the_scan():
    # A diverged run must show: the trainer stops on a non-finite loss.
    xw, w_hh, h0, c0, _, b = _problem(4, 2, 8)
    xw = xw.at[1, 0, 3].set(jnp.nan).at[2, 1, 9].set(jnp.inf)
    got = cpu_recurrence(xw, w_hh, None, h0, c0, None, b)
    want = _scan(xw, w_hh, None, h0, c0, None, b)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
    assert np.isnan(np.asarray(got[0][1:, 0])).any(axis=-1).all()  # from step 1 on


def test_concurrent_calls_from_two_threads_finish_and_agree():
    # Two Python threads running the kernel at once compete for XLA's pool: helpers may come
    # late or not at all. Every call must still finish (no member waits for a helper that
    # never joined) with the single-thread numbers.
    import threading

    problem = _problem(70, 1, 128)
    run = jax.jit(lambda xw, w, h, c: cpu_recurrence(xw, w, None, h, c, None)[0])
    xw, w_hh, h0, c0 = problem[:4]
    want = np.asarray(jax.jit(
        lambda xw, w, h, c: cpu_recurrence(xw, w, None, h, c, None, threads=1)[0]
    )(xw, w_hh, h0, c0))
    results, errors = [], []

    def worker():
        try:
            for _ in range(20):
                results.append(np.asarray(run(xw, w_hh, h0, c0)))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a kernel call did not finish"
    assert not errors and len(results) == 40
    for got in results:
        np.testing.assert_array_equal(got, want)


def test_the_kernel_can_be_switched_off(tmp_path):
    # LSTM_JAX_CPU_KERNEL=0: auto keeps the scan everywhere and "cpu" says why, without
    # compiling anything.
    script = (
        "from lstm_jax.kernels import cpu_native, select\n"
        "print(cpu_native.unavailable_reason())\n"
        "print(select.choose_backend('auto', platform='cpu', batch=1, hidden=128))\n"
    )
    env = dict(os.environ, LSTM_JAX_CPU_KERNEL="0", LSTM_JAX_CACHE_DIR=str(tmp_path),
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["disabled by $LSTM_JAX_CPU_KERNEL=0", "scan"]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "jax.checkpoint"])
def test_vmapped_ensemble_of_bidirectional_stacks_matches_scan(checkpointed):
    # vmap over an ensemble on top of the directions' own vmap: the kernel sees (3, 2)
    # leading problem dimensions; under jax.checkpoint its forward runs again in the backward.
    params = lstm_jax.init_lstm(jax.random.key(0), 4, 16, num_layers=2, bidirectional=True)
    ensemble = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a, -a]), params)
    x = normal(1, (2, 7, 4))
    lengths = jnp.array([7, 3])

    def grads(backend):
        def one(p):
            return jnp.sum(lstm_jax.lstm(p, x, seq_lengths=lengths, backend=backend)[0] ** 2)
        one = jax.checkpoint(one) if checkpointed else one
        return jax.jit(jax.grad(lambda e: jnp.sum(jax.vmap(one)(e))))(ensemble)

    _assert_close_trees(grads("cpu"), grads("scan"), 1e-5)


@pytest.mark.parametrize(
    "steps,batch,inputs,hidden,proj,chunk,lengths,bias",
    [
        (23, 5, 3, 16, 0, 5, False, True),   # T padded to whole chunks with masked steps
        (24, 5, 3, 16, 0, 6, False, True),   # whole chunks, no mask: the unmasked loop
        (17, 2, 4, 8, 0, 4, True, True),     # batch 2: the input product outside the kernel
        (30, 8, 6, 16, 8, 6, True, False),   # a projection, no bias
        (40, 16, 8, 128, 0, 7, True, True),  # dx inside the kernel, a team of threads
    ],
    ids=["padded", "whole", "batch2-mask", "proj-nobias", "team-dx"],
)
def test_remat_layer_matches_the_scan_remat(steps, batch, inputs, hidden, proj, chunk, lengths,
                                            bias):
    out = proj or hidden
    x = normal((7, 0), (steps, batch, inputs))
    w_ih = normal((7, 1), (inputs, 4 * hidden), 1 / np.sqrt(inputs))
    w_hh = normal((7, 2), (out, 4 * hidden), 1 / np.sqrt(out))
    w_hr = normal((7, 3), (hidden, out), 1 / np.sqrt(hidden)) if proj else None
    h0 = normal((7, 4), (batch, out), 0.5)
    c0 = normal((7, 5), (batch, hidden))
    b = normal((7, 6), (4 * hidden,), 0.1) if bias else None
    mask = lengths_mask((7, 7), steps, batch) if lengths else None

    def run(loop):
        def loss(x, w_ih, w_hh, w_hr, h0, c0, b):
            ys, (h, c) = loop(x, w_ih, w_hh, w_hr, h0, c0, mask, b)
            weights = jnp.sin(jnp.arange(ys.size, dtype=jnp.float32)).reshape(ys.shape)
            return jnp.sum(ys * weights) + jnp.sum(h * h) + 0.7 * jnp.sum(jnp.cos(c)), (ys, h, c)

        grad = jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True)
        return jax.jit(grad)(x, w_ih, w_hh, w_hr, h0, c0, b)

    (_, got), got_grads = run(lambda *a: cpu_remat_layer(chunk, *a))
    (_, want), want_grads = run(lambda *a: remat_recurrence(1, "highest", chunk, *a))
    _assert_close_trees(got, want, 2e-6)
    _assert_close_trees(got_grads, want_grads, 1e-5)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        cpu_remat_layer(0, x, w_ih, w_hh, w_hr, h0, c0, mask, b)


def test_lstm_cpu_backend_with_remat_keeps_the_gradients_and_less_memory():
    params = lstm_jax.init_lstm(jax.random.key(5), input_size=4, hidden_size=32,
                                bidirectional=True)
    x = normal(6, (4, 400, 4))
    lengths = jnp.array([400, 399, 250, 3])

    def grad(backend, remat):
        def loss(p, x):
            y, s = lstm_jax.lstm(p, x, seq_lengths=lengths, backend=backend, remat=remat)
            return jnp.sum(y * jnp.sin(y)) + jnp.sum(s.h) + jnp.sum(s.c ** 2)
        return jax.grad(loss, argnums=(0, 1))

    _assert_close_trees(jax.jit(grad("cpu", True))(params, x),
                        jax.jit(grad("scan", False))(params, x), 1e-5)
    # Without remat the forward saves 4H + H floats per step and row (gates, c_{t-1}):
    # 2 directions x 400 x 4 x 160 x 4 bytes = 2 MiB; with it, ~sqrt(T) steps of them.
    temp = {remat: jax.jit(grad("cpu", remat)).lower(params, x).compile()
            .memory_analysis().temp_size_in_bytes for remat in (False, True)}
    saved = 2 * 400 * 4 * 5 * 32 * 4
    assert temp[False] - temp[True] >= 0.7 * saved
