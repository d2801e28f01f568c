"""The Flax NNX and linen front doors: same numbers as lstm_jax.lstm, training, nn.RNN cells."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lstm_jax
import lstm_jax.linen
import lstm_jax.nn
from lstm_jax import LSTMState, lstm

B, T, F, H = 3, 5, 4, 6
LENGTHS = jnp.array([5, 3, 1])


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, F)).astype(np.float32)
    return jnp.asarray(x)


def _leaves_equal(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(u, v)


# ----------------------------------------------------------------------------- NNX


def test_nnx_matches_the_function_on_its_parameters():
    model = lstm_jax.nn.LSTM(F, H, bidirectional=True, proj_size=3, peephole=True,
                             zoneout_c=0.3, cell_clip=2.0, rngs=nnx.Rngs(0))
    params = model.lstm_params
    assert isinstance(params, lstm_jax.LSTMParams) and params.peephole
    assert params.layers[0][1].w_hh.shape == (3, 4 * H)
    x = _data()
    h0 = jnp.ones((2, B, 3)) * 0.1
    c0 = jnp.ones((2, B, H)) * -0.2
    kw = dict(seq_lengths=LENGTHS, zoneout_c=0.3, cell_clip=2.0)
    want = jax.jit(lambda p: lstm(p, x, LSTMState(h0, c0), **kw))(params)

    @nnx.jit
    def run(model):  # the module's own deterministic flag
        return model(x, LSTMState(h0, c0), seq_lengths=LENGTHS)

    y_train, _ = run(model)
    assert not np.allclose(y_train, want[0])  # zoneout masks are drawn in training
    model.eval()
    assert model.deterministic
    _leaves_equal(run(model), want)
    model.train()
    assert not model.deterministic
    eval_call = nnx.jit(lambda m: m(x, LSTMState(h0, c0), seq_lengths=LENGTHS, deterministic=True))
    _leaves_equal(eval_call(model), want)


def test_nnx_from_params_and_torch_layout():
    params = lstm_jax.init_lstm(jax.random.key(1), F, H, num_layers=2, proj_size=2)
    model = lstm_jax.nn.LSTM.from_params(params, batch_first=False)
    assert (model.input_size, model.hidden_size, model.num_layers, model.proj_size) == (F, H, 2, 2)
    x = jnp.swapaxes(_data(), 0, 1)
    _leaves_equal(nnx.jit(lambda m: m(x))(model), jax.jit(lstm, static_argnames="batch_first")(
        params, x, batch_first=False))
    _leaves_equal(model.lstm_params, params)
    with pytest.raises(ValueError, match="rngs"):
        lstm_jax.nn.LSTM.from_params(params, dropout=0.5)


def test_nnx_trains_under_jit_with_an_optimizer():
    model = lstm_jax.nn.LSTM(F, H, zoneout_h=0.1, layer_norm=True, rngs=nnx.Rngs(0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
    x = _data()
    target = jnp.sin(jnp.cumsum(x[..., :1], axis=1))

    @nnx.jit
    def step(model, optimizer, x):
        def loss_fn(model):
            y, _ = model(x, seq_lengths=LENGTHS)
            return jnp.mean((y[..., :1] - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, x)) for _ in range(6)]
    assert losses[-1] < losses[0]
    # the dropout stream advances: two training calls draw different masks
    run = nnx.jit(lambda m: m(x)[0])
    assert not np.allclose(run(model), run(model))
    # parameters are nnx.Params with readable paths
    paths = [p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert ("params", "layers", 0, 0, "w_hh") in paths
    assert ("params", "layers", 0, 0, "ln_c_scale") in paths


def test_nnx_dtypes():
    model = lstm_jax.nn.LSTM(F, H, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                             rngs=nnx.Rngs(0))
    assert model.lstm_params.layers[0][0].w_ih.dtype == jnp.bfloat16
    y, state = nnx.jit(lambda m: m(_data()))(model)
    assert y.dtype == state.h.dtype == jnp.bfloat16


def test_nnx_bad_arguments():
    with pytest.raises(ValueError, match="zoneout_h"):
        lstm_jax.nn.LSTM(F, H, zoneout_h=1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="proj_size"):
        lstm_jax.nn.LSTM(F, H, proj_size=H, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- linen


def test_linen_init_apply_matches_the_function():
    model = lstm_jax.linen.LSTM(F, H, bidirectional=True, cifg=True, candidate_dropout=0.2,
                                zoneout_h=0.1)
    x = _data()
    variables = jax.jit(functools.partial(model.init, deterministic=True))(jax.random.key(0), x)
    params = variables["params"]["lstm"]
    assert isinstance(params, lstm_jax.LSTMParams) and params.cifg
    apply = jax.jit(model.apply, static_argnames="deterministic")
    want = lstm(params, x, seq_lengths=LENGTHS, candidate_dropout=0.2, zoneout_h=0.1)
    _leaves_equal(apply(variables, x, seq_lengths=LENGTHS, deterministic=True), want)
    y1, _ = apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    y2, _ = apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(y1, y2)
    with pytest.raises(Exception, match="deterministic"):
        model.apply(variables, x)  # a random option on: training or not must be said


def test_linen_gradient_step_lowers_the_loss():
    model = lstm_jax.linen.LSTM(F, H, peephole=True, deterministic=True)
    x = _data()
    variables = model.init(jax.random.key(0), x)
    tx = optax.adam(3e-2)
    opt_state = tx.init(variables)

    @jax.jit
    def step(variables, opt_state):
        loss, grads = jax.value_and_grad(
            lambda v: jnp.mean((model.apply(v, x)[0] - 0.5) ** 2))(variables)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(variables, updates), opt_state, loss

    losses = []
    for _ in range(5):
        variables, opt_state, loss = step(variables, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_linen_cell_under_flax_rnn_matches_the_layer():
    """The cell in Flax's own nn.RNN gives lstm_jax.lstm's numbers; its carry is Flax's (c, h)."""
    x = _data()
    rnn = nn.RNN(lstm_jax.linen.LSTMCell(H, peephole=True, proj_size=2, zoneout_c=0.3),
                 return_carry=True)
    variables = rnn.init(jax.random.key(0), x)
    cell_params = variables["params"]["cell"]["lstm_cell"]
    assert isinstance(cell_params, lstm_jax.LSTMCellParams) and cell_params.peephole
    (c, h), y = jax.jit(rnn.apply)(variables, x, seq_lengths=LENGTHS)
    params = lstm_jax.LSTMParams(((cell_params,),))
    y_ref, state = lstm(params, x, seq_lengths=LENGTHS, zoneout_c=0.3)
    np.testing.assert_allclose(c, state.c[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h, state.h[0], rtol=1e-5, atol=1e-6)
    # nn.RNN leaves padded outputs as they are; compare the valid steps
    valid = np.arange(T)[None, :, None] < np.asarray(LENGTHS)[:, None, None]
    np.testing.assert_allclose(np.where(valid, y, 0), y_ref, rtol=1e-5, atol=1e-6)


def test_linen_cell_training_masks_under_flax_rnn():
    cell = lstm_jax.linen.LSTMCell(H, zoneout_h=0.3, recurrent_dropout=0.3, deterministic=False)
    rnn = nn.RNN(cell, split_rngs={"params": False, "dropout": True, "recurrent_dropout": False})
    x = _data()
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1),
            "recurrent_dropout": jax.random.key(2)}
    variables = rnn.init(rngs, x)
    apply = jax.jit(rnn.apply)
    k = rngs["recurrent_dropout"]
    y1 = apply(variables, x, rngs={"dropout": jax.random.key(1), "recurrent_dropout": k})
    y2 = apply(variables, x, rngs={"dropout": jax.random.key(3), "recurrent_dropout": k})
    assert y1.shape == (B, T, H) and not np.allclose(y1, y2)

    # What the docstring relies on: an rng collection nn.RNN does not split gives every step
    # the same key (one recurrent mask per sequence); a split one a new key per step.
    class KeyCell(nn.RNNCellBase):
        @nn.compact
        def __call__(self, carry, x):
            same = jax.random.key_data(self.make_rng("recurrent_dropout"))
            fresh = jax.random.key_data(self.make_rng("dropout"))
            return carry, jnp.concatenate([same, fresh]).astype(jnp.float32) + 0 * x[..., :1]

        def initialize_carry(self, rng, input_shape):
            return jnp.zeros(input_shape[:-1])

        @property
        def num_feature_axes(self):
            return 1

    keys = nn.RNN(KeyCell(), split_rngs={"params": False, "dropout": True,
                                         "recurrent_dropout": False}).apply(
        {}, x, rngs={"dropout": jax.random.key(1), "recurrent_dropout": jax.random.key(2)})
    assert np.all(keys[:, :, :2] == keys[:, :1, :2])  # same key at every step
    assert not np.all(keys[:, :, 2:] == keys[:, :1, 2:])  # a fresh key per step


def test_linen_cell_in_nn_rnn_takes_bfloat16_input_as_flax_cells_do():
    x = jax.random.normal(jax.random.key(1), (4, 10, 8))
    rnn = nn.RNN(lstm_jax.linen.LSTMCell(6))
    variables = rnn.init(jax.random.key(0), x)
    y32 = rnn.apply(variables, x)
    y16 = rnn.apply(variables, x.astype(jnp.bfloat16))  # the carry stays float32 across steps
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=3e-2)
    reference = nn.RNN(nn.OptimizedLSTMCell(6))  # flax's own cell runs the same input
    reference.apply(reference.init(jax.random.key(0), x), x.astype(jnp.bfloat16))


def test_nnx_module_without_a_dropout_stream():
    # Evaluation needs no random stream; training asks for one, naming how to pass it.
    x = jnp.ones((2, 3, 8))
    model = lstm_jax.nn.LSTM(8, 16, zoneout_c=0.3, deterministic=True, rngs=nnx.Rngs(params=0))
    plain = lstm_jax.lstm(model.lstm_params, x, zoneout_c=0.3)
    np.testing.assert_array_equal(model(x)[0], plain[0])
    with pytest.raises(ValueError, match="training with random options needs rngs"):
        model(x, deterministic=False)
    with pytest.raises(ValueError, match="rngs needs a 'dropout' stream"):
        lstm_jax.nn.LSTM(8, 16, zoneout_c=0.3, rngs=nnx.Rngs(params=0))
