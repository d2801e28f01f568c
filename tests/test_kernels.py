"""Optional backends on CPU: the Pallas kernel in interpret mode against the scan recurrence,
the cuDNN weight conversion against ``jax.experimental.rnn.lstm_ref``, backend selection.

Interpret mode is slow to trace, so the kernel cases are few and tiny (B=2, T=5).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import normal

import lstm_jax
from lstm_jax import LSTMState
from lstm_jax._recurrence import recurrence
from lstm_jax.kernels import (
    choose_backend,
    cudnn_lstm,
    pallas_lstm,
    pallas_recurrence,
    select,
    to_cudnn_weights,
)
from lstm_jax.kernels import cudnn as cudnn_mod

T, B = 5, 2


def _problem(hidden, seed=0, dtype=jnp.float32):
    xw = normal((seed, 0), (T, B, 4 * hidden))
    w_hh = normal((seed, 1), (hidden, 4 * hidden), 0.5).astype(dtype)
    h0 = normal((seed, 2), (B, hidden)).astype(dtype)
    c0 = normal((seed, 3), (B, hidden))
    return xw, w_hh, h0, c0


# Sequence 0 runs all 5 steps, sequence 1 only 2 (padded-batch semantics).
MASK = jnp.arange(T)[:, None] < jnp.array([T, 2])[None, :]


def _loss_and_grads(run, xw, w_hh, h0, c0):
    """Outputs and the gradients of a loss touching every output."""

    def loss(xw, w_hh, h0, c0):
        ys, (h, c) = run(xw, w_hh, h0, c0)
        weights = jnp.sin(jnp.arange(ys.size, dtype=jnp.float32)).reshape(ys.shape)
        return jnp.sum(ys * weights) + jnp.sum(h * h) + 0.7 * jnp.sum(c), (ys, h, c)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(xw, w_hh, h0, c0)


@pytest.mark.parametrize("hidden,masked", [(8, False), (16, True)], ids=["H8", "H16-mask"])
def test_pallas_matches_scan_forward_and_gradients(hidden, masked):
    xw, w_hh, h0, c0 = _problem(hidden)
    mask = MASK if masked else None
    scan = lambda *a: recurrence(1, "highest", a[0], a[1], None, a[2], a[3], mask)
    kern = lambda *a: pallas_recurrence(
        a[0], a[1], None, a[2], a[3], mask, interpret=True, precision="highest"
    )
    (l_ref, out_ref), g_ref = _loss_and_grads(scan, xw, w_hh, h0, c0)
    (l_k, out_k), g_k = _loss_and_grads(kern, xw, w_hh, h0, c0)
    for a, b in zip(out_ref + g_ref, out_k + g_k):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(l_k), float(l_ref), rtol=1e-5)
    if masked:  # past its end, sequence 1 outputs zero and keeps its state
        ys, h, _ = out_k
        assert np.all(np.asarray(ys[2:, 1]) == 0)
        np.testing.assert_allclose(np.asarray(h[1]), np.asarray(out_ref[0][1, 1]), rtol=1e-6)


@pytest.mark.parametrize("block_b", [1, 2, 4])
def test_pallas_fma_products_match_scan(block_b):
    # product="fma": W_hh in registers, a multiply and a sum per row, tiles of 1, 2 or 4 rows
    # (4: the batch of 2 padded). Lengths included: sequence 1 stops after 2 steps.
    xw, w_hh, h0, c0 = _problem(8, seed=4)
    scan = lambda *a: recurrence(1, "highest", a[0], a[1], None, a[2], a[3], MASK)
    kern = lambda *a: pallas_recurrence(a[0], a[1], None, a[2], a[3], MASK, interpret=True,
                                        product="fma", block_b=block_b)
    (l_ref, out_ref), g_ref = _loss_and_grads(scan, xw, w_hh, h0, c0)
    (l_k, out_k), g_k = _loss_and_grads(kern, xw, w_hh, h0, c0)
    for a, b in zip(out_ref + g_ref, out_k + g_k):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_pallas_fma_refuses_large_hidden_and_bad_product():
    xw, w_hh, h0, c0 = _problem(128)
    with pytest.raises(ValueError, match="registers"):
        pallas_recurrence(xw, w_hh, None, h0, c0, None, interpret=True, product="fma")
    small = _problem(8)
    with pytest.raises(ValueError, match="product"):
        pallas_recurrence(small[0], small[1], None, small[2], small[3], None, interpret=True,
                          product="wmma")
    assert pallas_lstm.fma_fits(64) and pallas_lstm.fma_fits(40) and not pallas_lstm.fma_fits(65)


def test_pallas_vmapped_over_directions():
    # lstm() runs both directions as one vmapped call; the kernel must batch the same way.
    probs = [_problem(8, seed=s) for s in (1, 2)]
    xw, w_hh, h0, c0 = (jnp.stack(a) for a in zip(*probs))
    axes = (0, 0, None, 0, 0, None)
    ref = jax.vmap(lambda *a: recurrence(1, "highest", *a), in_axes=axes)(
        xw, w_hh, None, h0, c0, None)
    out = jax.vmap(lambda *a: pallas_recurrence(*a, interpret=True), in_axes=axes)(
        xw, w_hh, None, h0, c0, None)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_pallas_bfloat16_products_match_scan():
    xw, w_hh, h0, c0 = _problem(16, seed=3, dtype=jnp.bfloat16)
    ref = recurrence(1, None, xw, w_hh, None, h0, c0, None)
    out = pallas_recurrence(xw, w_hh, None, h0, c0, None, interpret=True)
    assert out[0].dtype == jnp.bfloat16 and out[1][1].dtype == jnp.float32
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32),
                                   rtol=2e-2, atol=2e-2)


def test_pallas_rejects_projection_and_bad_tiles():
    xw, w_hh, h0, c0 = _problem(8)
    with pytest.raises(NotImplementedError, match="projection"):
        pallas_recurrence(xw, w_hh, jnp.zeros((8, 4)), h0, c0, None, interpret=True)
    with pytest.raises(ValueError, match="block_b"):
        pallas_recurrence(xw, w_hh, None, h0, c0, None, interpret=True, block_b=24)
    big = _problem(256)
    with pytest.raises(ValueError, match="limit"):
        pallas_recurrence(big[0], big[1], None, big[2], big[3], None)


@pytest.mark.parametrize(
    "hidden,dtype,product",
    [(64, jnp.float32, "mma"), (128, jnp.bfloat16, "mma"), (40, jnp.float32, "mma"),
     (64, jnp.float32, "fma"), (64, jnp.bfloat16, "fma")],
)
def test_pallas_lowers_to_triton_for_cuda(hidden, dtype, product):
    # Cross-lowering from this CPU runs the real Pallas->Triton lowering of both kernels
    # (power-of-two shapes, supported primitives, dot sizes): what interpret mode cannot check.
    xw, w_hh, h0, c0 = _problem(hidden, dtype=dtype)
    mask = MASK

    def grads(xw, w_hh, h0, c0):
        run = lambda *a: pallas_recurrence(a[0], a[1], None, a[2], a[3], mask, product=product)
        return jax.grad(lambda *a: jnp.sum(run(*a)[0].astype(jnp.float32)), argnums=(0, 1))(
            xw, w_hh, h0, c0)

    try:
        text = jax.jit(grads).trace(xw, w_hh, h0, c0).lower(lowering_platforms=("cuda",)).as_text()
    except Exception as e:  # newer jaxlibs compile the Triton IR at lowering: needs the CUDA plugin
        if jax.__version_info__ > (0, 10, 2):
            pytest.skip(f"cross-lowering for CUDA unavailable here: {type(e).__name__}")
        raise
    assert text.count("lstm_forward") >= 1 and text.count("lstm_backward") >= 1
    assert "triton" in text


def test_on_chip_budget():
    # W_hh is H x 4H: 64 KiB at H=64 in float32 stays in shared memory, 256 KiB at H=128
    # does not (an H100 block has at most 227 KiB); in bfloat16 H=128 takes 128 KiB.
    assert pallas_lstm.recurrent_weight_bytes(64) == 64 * 1024
    assert pallas_lstm.fits_on_chip(64) and pallas_lstm.fits_on_chip(40)
    assert not pallas_lstm.fits_on_chip(128)
    assert pallas_lstm.fits_on_chip(128, jnp.bfloat16)
    assert not pallas_lstm.fits_on_chip(256, jnp.bfloat16)
    assert pallas_lstm.padded_hidden(8) == 16 and pallas_lstm.padded_hidden(100) == 128


# ----------------------------------------------------------------------------- cuDNN


@pytest.mark.parametrize(
    "layers,bidirectional,bias",
    [(1, False, True), (2, True, False)],
    ids=["plain", "2layer-bi-nobias"],
)
def test_cudnn_weight_layout_matches_lstm_ref(layers, bidirectional, bias):
    from jax.experimental import rnn

    F, H = 3, 5
    params = lstm_jax.init_lstm(jax.random.key(1), F, H, num_layers=layers,
                                bidirectional=bidirectional, bias=bias, init="pytorch")
    flat = to_cudnn_weights(params)
    assert flat.shape == (rnn.get_num_params_in_lstm(F, H, layers, bidirectional),)
    D = 2 if bidirectional else 1
    x = normal((2, 0), (B, 6, F))
    h0 = normal((2, 1), (layers * D, B, H))
    c0 = normal((2, 2), (layers * D, B, H))
    lengths = jnp.array([6, 4], jnp.int32)
    y, (h, c) = lstm_jax.lstm(params, x, LSTMState(h0, c0), seq_lengths=lengths,
                              precision="highest")
    with jax.default_matmul_precision("highest"):
        y_ref, h_ref, c_ref = rnn.lstm_ref(x, h0, c0, *cudnn_mod.unpack_reference(params),
                                           lengths, F, H, layers, 0.0, bidirectional)
    for a, b in ((y, y_ref), (h, h_ref), (c, c_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_cudnn_gate_order_is_ifgo():
    # Only the forget block of W_hh differs between the two parameter sets: if the layout
    # moved it, lstm_ref would see it elsewhere.
    params = lstm_jax.init_lstm(jax.random.key(0), 2, 4, init="pytorch")
    flat = to_cudnn_weights(params)
    w_hh_ref = cudnn_mod.unpack_reference(params)[1][0]  # (4H, H), gate blocks as rows
    np.testing.assert_array_equal(np.asarray(w_hh_ref[4:8]), np.asarray(params.layers[0][0].w_hh[:, 4:8].T))
    assert flat.dtype == jnp.float32


def test_cudnn_refuses_off_gpu_and_with_projection():
    params = lstm_jax.init_lstm(jax.random.key(0), 2, 4)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="NVIDIA"):
            cudnn_lstm(params, jnp.ones((1, 3, 2)))
    projected = lstm_jax.init_lstm(jax.random.key(0), 2, 4, proj_size=2)
    with pytest.raises(ValueError, match="projection"):
        to_cudnn_weights(projected)
    assert cudnn_mod.unsupported_reason(params, jnp.float32, platform="gpu") is None
    assert "float32" in cudnn_mod.unsupported_reason(params, jnp.bfloat16, platform="gpu")


# ----------------------------------------------------------------------------- selection


def test_auto_is_scan_on_tpu_and_where_nothing_else_applies():
    for batch, hidden in ((1, 64), (16, 128), (256, 1024)):
        assert choose_backend("auto", platform="tpu", batch=batch, hidden=hidden) == "scan"
    # On CPU shapes above the measured range stay on the scan, and the C++ kernel never
    # takes what it cannot run.
    assert choose_backend("auto", platform="cpu", batch=256, hidden=1024) == "scan"
    assert choose_backend("auto", platform="cpu", batch=1, hidden=64,
                          dtype=jnp.bfloat16) == "scan"


def test_auto_on_gpu_follows_the_measurements(monkeypatch):
    monkeypatch.setattr(select, "_cudnn_available", lambda: True)  # as on a CUDA build
    table = {
        (1, 500, 64, 64): {"scan": 2.9, "pallas": 0.8, "cudnn": 8.0},
        (16, 500, 128, 128): {"scan": 1.5, "pallas": 0.9, "cudnn": 1.0},
        (256, 100, 1024, 1024): {"scan": 1.28, "cudnn": 1.0},
        (64, 100, 256, 256): {"scan": 0.49, "cudnn": 1.0},
    }
    pick = lambda **kw: choose_backend("auto", platform="gpu", table=table, **kw)
    assert pick(batch=1, hidden=64) == "pallas"
    assert pick(batch=2, hidden=48) == "pallas"  # nearest measured shape
    # H=128 float32 does not stay on chip: auto never picks pallas there; bfloat16 does.
    assert pick(batch=16, hidden=128) == "cudnn"
    assert pick(batch=16, hidden=128, dtype=jnp.bfloat16) == "pallas"
    assert pick(batch=256, hidden=1024) == "cudnn"
    assert pick(batch=64, hidden=256) == "scan"
    # Where a backend cannot run, the next best measured one is taken.
    assert pick(batch=1, hidden=64, proj=32) == "scan"
    assert pick(batch=256, hidden=1024, dtype=jnp.bfloat16) == "scan"
    assert pick(batch=1, hidden=64, has_variants=True) == "scan"
    assert pick(batch=1, hidden=64, custom_grad=False) == "scan"
    assert choose_backend("auto", platform="gpu", table={}, batch=1, hidden=64) == "scan"


def test_pallas_product_follows_the_measurements():
    table = {(1, 500, 64, 64): {"scan": 2.9, "pallas": 1.8, "pallas-fma": 0.9},
             (16, 500, 128, 128): {"scan": 1.5, "pallas": 0.9, "pallas-fma": 0.5}}
    assert select.pallas_product(batch=1, hidden=64, table=table) == "fma"
    # fma keeps W_hh in registers only up to H=64; at H=128 the tensor-core kernel runs, and
    # auto does not credit the fma time to Pallas there.
    assert select.pallas_product(batch=16, hidden=128, table=table) == "mma"
    table[(16, 500, 128, 128)] = {"scan": 0.7, "pallas": 0.9, "pallas-fma": 0.5}
    assert choose_backend("auto", platform="gpu", batch=16, hidden=128, dtype=jnp.bfloat16,
                          table=table) == "scan"
    assert select.pallas_product(batch=1, hidden=64, table={}) == "mma"
    # auto counts the faster applicable Pallas variant as Pallas' time.
    table[(1, 500, 64, 64)] = {"scan": 1.2, "pallas": 1.8, "pallas-fma": 0.9}
    assert choose_backend("auto", platform="gpu", batch=1, hidden=64, table=table) == "pallas"
    # Until the fma kernel is measured on a GPU, the default table keeps the measured one.
    assert select.pallas_product(batch=1, hidden=64) == "mma"


def test_default_table_follows_the_h100_measurements():
    # Pallas won where it fits on chip (B=1, H=64); the scan won from H=256 up, cuDNN nowhere.
    assert choose_backend("auto", platform="gpu", batch=1, hidden=64) == "pallas"
    for batch, hidden in ((64, 256), (8, 256), (32, 512), (256, 1024)):
        assert choose_backend("auto", platform="gpu", batch=batch, hidden=hidden) == "scan"
    # float32 H=128 does not fit on chip, so the measured bfloat16 kernel is not taken for it.
    assert choose_backend("auto", platform="gpu", batch=16, hidden=128) != "pallas"


@pytest.mark.parametrize(
    "backend,kwargs,match",
    [
        ("pallas", dict(platform="cpu"), "NVIDIA"),
        ("pallas", dict(platform="gpu", proj=16), "projection"),
        ("pallas", dict(platform="gpu", has_variants=True), "variants"),
        ("pallas", dict(platform="gpu", hidden=128), "on-chip"),
        ("pallas", dict(platform="gpu", dtype=jnp.float64), "float32"),
        ("pallas", dict(platform="gpu", remat=True), "remat"),
        ("cudnn", dict(platform="tpu"), "NVIDIA"),
        ("cudnn", dict(platform="gpu", proj=16), "projection"),
        ("cudnn", dict(platform="gpu", dtype=jnp.bfloat16), "float32"),
        ("cudnn", dict(platform="gpu", dropout_active=True), "dropout"),
        ("nonsense", dict(platform="gpu"), "one of"),
    ],
)
def test_explicit_backend_that_cannot_run_says_why(backend, kwargs, match):
    args = dict(batch=4, hidden=64) | kwargs
    with pytest.raises(ValueError, match=match):
        choose_backend(backend, **args)


def test_explicit_backends_where_they_apply():
    assert choose_backend("scan", platform="gpu", batch=1, hidden=64, proj=8) == "scan"
    assert choose_backend("pallas", platform="gpu", batch=1, hidden=64) == "pallas"
    assert choose_backend("pallas", platform="cpu", batch=1, hidden=64, interpret=True) == "pallas"
