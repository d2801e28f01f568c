"""Parity with torch.nn.LSTM: same weights, same numbers, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lstm_jax
from lstm_jax import LSTMState, from_torch, init_lstm, lstm, to_torch

torch = pytest.importorskip("torch")

B, T, F, H = 3, 7, 4, 6

GRID = [
    dict(num_layers=1, bidirectional=False, proj_size=0, bias=True),
    dict(num_layers=2, bidirectional=False, proj_size=0, bias=False),
    dict(num_layers=1, bidirectional=True, proj_size=0, bias=True),
    dict(num_layers=2, bidirectional=True, proj_size=3, bias=True),
    dict(num_layers=3, bidirectional=False, proj_size=2, bias=False),
]


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _torch_run(module, x, h0, c0, lengths, batch_first):
    xt = torch.tensor(x, requires_grad=True)
    ht = torch.tensor(h0, requires_grad=True)
    ct = torch.tensor(c0, requires_grad=True)
    if lengths is None:
        y, (h, c) = module(xt, (ht, ct))
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            xt, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False
        )
        y, (h, c) = module(packed, (ht, ct))
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(y, batch_first=batch_first, total_length=T)
    return xt, ht, ct, y, h, c


def _loss_weights(shape_y, shape_h, shape_c, dtype):
    rng = np.random.default_rng(5)
    return tuple(rng.standard_normal(s).astype(dtype) for s in (shape_y, shape_h, shape_c))


@pytest.mark.parametrize("config", GRID, ids=lambda c: "L{num_layers}-bi{bidirectional:d}-p{proj_size}-b{bias:d}".format(**c))
@pytest.mark.parametrize("lengths", [None, [7, 3, 5]], ids=["full", "packed"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tm"])
def test_forward_and_gradients_match_torch_float64(x64, config, lengths, batch_first):
    torch.manual_seed(0)
    module = torch.nn.LSTM(F, H, batch_first=batch_first, **config).double()
    rng = np.random.default_rng(0)
    D = 2 if config["bidirectional"] else 1
    H_out = config["proj_size"] or H
    x = rng.standard_normal((B, T, F) if batch_first else (T, B, F))
    h0 = rng.standard_normal((config["num_layers"] * D, B, H_out))
    c0 = rng.standard_normal((config["num_layers"] * D, B, H))

    xt, ht, ct, y_t, h_t, c_t = _torch_run(module, x, h0, c0, lengths, batch_first)
    wy, wh, wc = _loss_weights(y_t.shape, h_t.shape, c_t.shape, np.float64)
    loss_t = (y_t * torch.tensor(wy)).sum() + (h_t * torch.tensor(wh)).sum() + (c_t * torch.tensor(wc)).sum()
    loss_t.backward()

    params = from_torch(module.state_dict())
    seq_lengths = None if lengths is None else jnp.asarray(lengths)

    def loss(params, x, h0, c0):
        y, s = lstm(params, x, LSTMState(h0, c0), seq_lengths=seq_lengths, batch_first=batch_first)
        return jnp.sum(y * wy) + jnp.sum(s.h * wh) + jnp.sum(s.c * wc), (y, s)

    (value, (y, s)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
        params, x, h0, c0
    )
    tol = dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(y, y_t.detach().numpy(), **tol)
    np.testing.assert_allclose(s.h, h_t.detach().numpy(), **tol)
    np.testing.assert_allclose(s.c, c_t.detach().numpy(), **tol)
    np.testing.assert_allclose(value, loss_t.item(), **tol)

    g_params, g_x, g_h0, g_c0 = grads
    np.testing.assert_allclose(g_x, xt.grad.numpy(), **tol)
    np.testing.assert_allclose(g_h0, ht.grad.numpy(), **tol)
    np.testing.assert_allclose(g_c0, ct.grad.numpy(), **tol)
    torch_grads = {name: p.grad.numpy() for name, p in module.named_parameters()}
    ours = to_torch(g_params)
    for name, g in ours.items():
        if name.startswith("bias_hh"):
            continue  # the combined bias's gradient is reported under bias_ih
        np.testing.assert_allclose(g, torch_grads[name], err_msg=name, **tol)


def test_float32_matches_torch():
    torch.manual_seed(1)
    module = torch.nn.LSTM(F, H, num_layers=2, bidirectional=True, batch_first=True)
    x = np.random.default_rng(1).standard_normal((B, T, F)).astype(np.float32)
    y_t, (h_t, c_t) = module(torch.tensor(x))
    y, s = lstm(from_torch(module.state_dict()), x)
    np.testing.assert_allclose(y, y_t.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.c, c_t.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_to_torch_round_trip_loads_into_torch():
    params = init_lstm(jax.random.key(2), F, H, num_layers=2, bidirectional=True, proj_size=3)
    module = torch.nn.LSTM(F, H, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in to_torch(params).items()})
    x = np.random.default_rng(2).standard_normal((B, T, F)).astype(np.float32)
    y_t, (h_t, _) = module(torch.tensor(x))
    y, s = lstm(params, x)
    np.testing.assert_allclose(y, y_t.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.h, h_t.detach().numpy(), rtol=1e-5, atol=1e-6)
    back = from_torch(module.state_dict())
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_from_torch_accepts_numpy_and_prefixed_keys():
    module = torch.nn.LSTM(F, H)
    state = {f"encoder.lstm.{k}": v.numpy() for k, v in module.state_dict().items()}
    params = from_torch(state)
    np.testing.assert_allclose(params.layers[0][0].w_ih, module.weight_ih_l0.detach().numpy().T)
    np.testing.assert_allclose(
        params.layers[0][0].b, (module.bias_ih_l0 + module.bias_hh_l0).detach().numpy(), rtol=1e-6
    )


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: s.pop("weight_hh_l1"), r"missing keys \['weight_hh_l1'\]"),
        (lambda s: s.pop("bias_hh_l0"), "missing keys"),
        (lambda s: s.__setitem__("weight_ih_l1", np.zeros((4 * H, 3), np.float32)), r"weight_ih_l1 has shape \(24, 3\), expected \(24, 6\)"),
        (lambda s: s.__setitem__("running_mean", np.zeros(3)), "unexpected key 'running_mean'"),
    ],
)
def test_from_torch_rejects_bad_state_dicts(edit, message):
    state = {k: v.numpy() for k, v in torch.nn.LSTM(F, H, num_layers=2).state_dict().items()}
    edit(state)
    with pytest.raises(ValueError, match=message):
        from_torch(state)


def test_init_pytorch_matches_torch_distribution():
    # torch draws every weight and both biases from U(-1/sqrt(H), 1/sqrt(H)).
    Hb = 64
    ours = init_lstm(jax.random.key(0), 32, Hb, init="pytorch", forget_bias=0.0).layers[0][0]
    theirs = torch.nn.LSTM(32, Hb)
    np.testing.assert_allclose(np.std(ours.w_hh), theirs.weight_hh_l0.detach().std().item(), rtol=0.05)
    combined = (theirs.bias_ih_l0 + theirs.bias_hh_l0).detach().numpy()
    np.testing.assert_allclose(np.std(ours.b), np.std(combined), rtol=0.15)
    assert lstm_jax.LSTMState._fields == ("h", "c")


def test_bfloat16_weights_cross_both_ways_exactly():
    # NumPy has no bfloat16 that torch reads: from_torch goes through float32 (exact), to_torch
    # hands float32 back, and load_state_dict rounds it into the bf16 module unchanged.
    module = torch.nn.LSTM(3, 5, num_layers=2).bfloat16()
    params = from_torch(module.state_dict())
    cell = params.layers[1][0]
    assert cell.w_ih.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(cell.w_hh, np.float32),
                                  module.weight_hh_l1.detach().float().numpy().T)
    exported = to_torch(params)
    assert exported["weight_ih_l0"].dtype == np.float32
    back = torch.nn.LSTM(3, 5, num_layers=2).bfloat16()
    back.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()})
    for name in ("weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"):
        assert torch.equal(getattr(back, name), getattr(module, name)), name
    summed = (module.bias_ih_l0.float() + module.bias_hh_l0.float()).bfloat16()
    assert torch.equal(back.bias_ih_l0 + back.bias_hh_l0, summed)
