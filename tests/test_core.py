"""The functional core against a NumPy float64 reference, a loop of lstm_cell and itself."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from reference import lstm_reference

import lstm_jax
from lstm_jax import LSTMState, init_lstm, lstm, lstm_cell

B, T, F, H = 3, 6, 4, 5

CONFIGS = {
    "plain": dict(),
    "no_bias": dict(bias=False),
    "two_layers": dict(num_layers=2),
    "bidirectional": dict(bidirectional=True),
    "projected": dict(proj_size=3),
    "all": dict(num_layers=2, bidirectional=True, proj_size=2),
}


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _inputs(config, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    params = init_lstm(jax.random.key(seed), F, H, init="pytorch", **config)
    # Non-zero biases everywhere so that a wrong gate order cannot hide.
    params = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(a.dtype), params)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    L, D = params.num_layers, params.num_directions
    x = rng.standard_normal((B, T, F)).astype(dtype)
    h0 = rng.standard_normal((L * D, B, params.output_size)).astype(dtype)
    c0 = rng.standard_normal((L * D, B, H)).astype(dtype)
    return params, x, h0, c0


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_matches_numpy_reference(name, with_lengths):
    params, x, h0, c0 = _inputs(CONFIGS[name])
    lengths = np.array([6, 2, 4]) if with_lengths else None
    run = jax.jit(lambda p, x, s, n: lstm(p, x, s, seq_lengths=n))
    y, state = run(params, x, LSTMState(h0, c0), lengths)
    y_ref, h_ref, c_ref = lstm_reference(params, x, h0, c0, lengths)
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(state.h, h_ref, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(state.c, c_ref, rtol=2e-5, atol=2e-6)


def test_float64_matches_reference_to_rounding(x64):
    params, x, h0, c0 = _inputs(CONFIGS["all"], np.float64)
    lengths = np.array([6, 1, 3])
    y, state = lstm(params, x, LSTMState(h0, c0), seq_lengths=lengths)
    assert y.dtype == jnp.float64 and state.c.dtype == jnp.float64
    y_ref, h_ref, c_ref = lstm_reference(params, x, h0, c0, lengths)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(state.h, h_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(state.c, c_ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", ["plain", "projected"])
def test_scan_equals_python_loop_of_lstm_cell(name):
    params, x, h0, c0 = _inputs(CONFIGS[name])
    cell = params.layers[0][0]
    state = LSTMState(jnp.asarray(h0[0]), jnp.asarray(c0[0]))
    outputs = []
    for t in range(T):
        state, h = lstm_cell(cell, state, x[:, t])
        outputs.append(h)
    y, final = lstm(params, x, LSTMState(h0, c0))
    np.testing.assert_allclose(y, jnp.stack(outputs, axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(final.h[0], state.h, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(final.c[0], state.c, rtol=1e-6, atol=1e-6)


def test_padded_batch_equals_sequences_run_alone():
    params, x, h0, c0 = _inputs(CONFIGS["all"])
    lengths = np.array([6, 2, 4])
    y, state = lstm(params, x, LSTMState(h0, c0), seq_lengths=lengths)
    for b, n in enumerate(lengths):
        y_b, s_b = lstm(params, x[b : b + 1, :n], LSTMState(h0[:, b : b + 1], c0[:, b : b + 1]))
        np.testing.assert_allclose(y[b, :n], y_b[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(y[b, n:], 0.0)
        np.testing.assert_allclose(state.h[:, b], s_b.h[:, 0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.c[:, b], s_b.c[:, 0], rtol=1e-5, atol=1e-6)


def test_layouts_and_unbatched_input():
    params, x, h0, c0 = _inputs(CONFIGS["bidirectional"])
    y, state = lstm(params, x, LSTMState(h0, c0))
    y_tm, state_tm = lstm(params, np.swapaxes(x, 0, 1), LSTMState(h0, c0), batch_first=False)
    np.testing.assert_allclose(np.swapaxes(y_tm, 0, 1), y, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state_tm.h, state.h, rtol=1e-6, atol=1e-7)
    y_1, state_1 = lstm(params, x[1], LSTMState(h0[:, 1], c0[:, 1]))
    assert y_1.shape == (T, 2 * H) and state_1.h.shape == (2, H)
    np.testing.assert_allclose(y_1, y[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state_1.c, state.c[:, 1], rtol=1e-6, atol=1e-7)


def test_shapes_follow_torch():
    params = init_lstm(jax.random.key(0), F, H, num_layers=3, bidirectional=True, proj_size=2)
    y, state = lstm(params, jnp.ones((B, T, F)))
    assert y.shape == (B, T, 2 * 2)
    assert state.h.shape == (3 * 2, B, 2) and state.c.shape == (3 * 2, B, H)


@pytest.mark.parametrize("name", ["plain", "all"])
@pytest.mark.parametrize("remat", [False, True], ids=["saved", "remat"])
@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "stacked"])
def test_custom_vjp_equals_autodiff(name, remat, in_place, monkeypatch):
    # Both ways of keeping the activations: over xw in place (CPU) and the scan's stacked output.
    monkeypatch.setattr(lstm_jax._recurrence, "in_place_residuals", lambda: in_place)
    params, x, h0, c0 = _inputs(CONFIGS[name])
    lengths = np.array([6, 2, 5])
    weights = np.random.default_rng(1).standard_normal((B, T, 1)).astype(np.float32)

    def loss(params, x, h0, c0, custom_grad):
        y, s = lstm(params, x, LSTMState(h0, c0), seq_lengths=lengths,
                    custom_grad=custom_grad, remat=remat and custom_grad)
        return jnp.sum(weights * y**2) + jnp.sum(jnp.sin(s.h)) + jnp.sum(s.c**2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)
    expected = grads(params, x, h0, c0, False)
    got = grads(params, x, h0, c0, True)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["plain", "no_bias", "all"])
def test_remat_gradients_equal_saved_to_rounding(name, x64):
    """remat=True (input product inside sqrt(T) chunks, T=11: the last chunk padded) gives the
    gradients of the saved-activation pass, with lengths and a projection, in float64."""
    rng = np.random.default_rng(2)
    params = init_lstm(jax.random.key(2), F, H, init="pytorch", **CONFIGS[name])
    params = jax.tree.map(lambda a: jnp.asarray(a + 0.1 * rng.standard_normal(a.shape)), params)
    x = jnp.asarray(rng.standard_normal((B, 11, F)))
    lengths = np.array([11, 4, 9])

    def loss(params, x, remat):
        # 11 steps: chunks of 3, the last one padded; unroll 2 does not divide a chunk.
        y, s = lstm(params, x, seq_lengths=lengths, remat=remat, unroll=2 if remat else 1)
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(s.h)) + jnp.sum(s.c**2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    for g, e in zip(jax.tree.leaves(grads(params, x, True)), jax.tree.leaves(grads(params, x, False)),
                    strict=True):
        assert g.dtype == jnp.float64
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)


def test_check_grads_numerically(x64):
    params, x, h0, c0 = _inputs(CONFIGS["all"], np.float64)
    lengths = np.array([6, 3, 1])

    def f(params, x, h0, c0):
        y, s = lstm(params, x, LSTMState(h0, c0), seq_lengths=lengths)
        return jnp.sum(y * jnp.cos(y)) + jnp.sum(s.h**2) + jnp.sum(jnp.tanh(s.c))

    # Jitted: check_grads evaluates f many times, and eagerly each call re-dispatched the stack
    # op by op (4x slower; the custom backward pass is the same either way).
    check_grads(jax.jit(f), (params, jnp.asarray(x), jnp.asarray(h0), jnp.asarray(c0)), order=1,
                modes=["rev"], atol=1e-6, rtol=1e-6)


def test_gate_and_state_order_are_pinned():
    """Gate blocks are i, f, g, o; the state is (h, c)."""
    hidden = 1
    w_ih = jnp.zeros((1, 4))
    w_hh = jnp.zeros((1, 4))
    big = 30.0  # saturates a sigmoid to 1 and tanh to 1
    # i open, f closed, g = tanh(0.5), o open: c' = tanh(0.5), h' = tanh(tanh(0.5)).
    b = jnp.array([big, -big, 0.5, big])
    params = lstm_jax.LSTMParams(((lstm_jax.LSTMCellParams(w_ih, w_hh, b),),))
    state0 = LSTMState(jnp.zeros((1, 1, hidden)), jnp.full((1, 1, hidden), 7.0))
    _, state = lstm(params, jnp.zeros((1, 1, 1)), state0)
    assert state._fields == ("h", "c")
    np.testing.assert_allclose(state.c[0, 0, 0], np.tanh(0.5), rtol=1e-6)
    np.testing.assert_allclose(state.h[0, 0, 0], np.tanh(np.tanh(0.5)), rtol=1e-6)
    # Forget gate open and input gate closed keeps the old cell: the second block is f.
    b = jnp.array([-big, big, 0.5, big])
    params = lstm_jax.LSTMParams(((lstm_jax.LSTMCellParams(w_ih, w_hh, b),),))
    _, state = lstm(params, jnp.zeros((1, 1, 1)), state0)
    np.testing.assert_allclose(state.c[0, 0, 0], 7.0, rtol=1e-6)


def test_fused_gate_activations_equal_sigmoid_and_tanh_and_their_derivatives():
    """One scaled tanh over the (B, 4H) row is sigmoid on i, f, o and tanh on g; its
    derivative from the activations is a(1-a) and 1-a^2 (compared in float64 with NumPy)."""
    from lstm_jax._cell import activate_gates, activated_gates_grad, cell_update_grad

    with jax.enable_x64(True):
        hidden = 3
        z = np.random.default_rng(0).normal(0.0, 4.0, (2, 4 * hidden))
        z[0, :4] = [-40.0, 40.0, -0.0, 1e-8]  # saturated and tiny
        acts = np.asarray(activate_gates(jnp.asarray(z)))
        sig = 1.0 / (1.0 + np.exp(-z))
        expected = np.concatenate(
            [sig[:, :2 * hidden], np.tanh(z[:, 2 * hidden:3 * hidden]), sig[:, 3 * hidden:]], -1
        )
        np.testing.assert_allclose(acts, expected, rtol=1e-14, atol=1e-16)
        d_expected = np.concatenate(
            [(sig * (1 - sig))[:, :2 * hidden], 1 - np.tanh(z[:, 2 * hidden:3 * hidden]) ** 2,
             (sig * (1 - sig))[:, 3 * hidden:]], -1,
        )
        # Computed from the activation, the derivative is exact to an ulp of 1 (absolute): where a
        # gate saturates, a itself has lost the tail that z still knows.
        gates = tuple(jnp.split(jnp.asarray(acts), 4, axis=-1))
        np.testing.assert_allclose(np.concatenate(activated_gates_grad(gates), axis=-1),
                                   d_expected, rtol=1e-12, atol=1e-15)

        # cell_update_grad is the vector-Jacobian product of cell_update.
        rng = np.random.default_rng(1)
        c_prev, dr, dc = (jnp.asarray(rng.normal(size=(2, hidden))) for _ in range(3))

        def update(z, c):
            c_new, r, _ = lstm_jax._cell.cell_update(z, c)
            return r, c_new

        _, vjp = jax.vjp(update, jnp.asarray(z), c_prev)
        dz_ad, dc_prev_ad = vjp((dr, dc))
        dz, dc_prev = cell_update_grad(gates, c_prev, dr, dc)
        np.testing.assert_allclose(dz, dz_ad, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(dc_prev, dc_prev_ad, rtol=1e-12, atol=1e-15)


def test_init_default_forget_bias_and_orthogonal_recurrence():
    params = init_lstm(jax.random.key(3), 6, 8, num_layers=2, bidirectional=True, forget_bias=2.0)
    for layer in params.layers:
        for p in layer:
            np.testing.assert_array_equal(p.b[8:16], 2.0)
            np.testing.assert_array_equal(p.b[:8], 0.0)
            np.testing.assert_array_equal(p.b[16:], 0.0)
            for g in range(4):
                block = np.asarray(p.w_hh[:, g * 8 : (g + 1) * 8])
                np.testing.assert_allclose(block.T @ block, np.eye(8), atol=1e-5)
    # LeCun normal: variance 1 / fan_in (0.1 is about 5 standard errors of 128 draws' variance).
    w = np.asarray(init_lstm(jax.random.key(4), 64, 32).layers[0][0].w_ih)
    assert abs(w.var() * 64 - 1.0) < 0.1


def test_init_pytorch_bounds():
    H_ = 16
    params = init_lstm(jax.random.key(0), 4, H_, init="pytorch", forget_bias=0.0, proj_size=3)
    p = params.layers[0][0]
    k = 1 / np.sqrt(H_)
    for w in (p.w_ih, p.w_hh, p.w_hr):
        assert np.abs(w).max() <= k and np.abs(w).max() > 0.8 * k
    assert np.abs(p.b).max() <= 2 * k


def test_dropout_between_layers_only_with_key():
    params, x, _, _ = _inputs(CONFIGS["two_layers"])
    key = jax.random.key(7)
    y_eval, _ = lstm(params, x)
    np.testing.assert_array_equal(lstm(params, x, dropout=0.5)[0], y_eval)
    np.testing.assert_array_equal(lstm(params, x, dropout=0.0, key=key)[0], y_eval)
    y_a, _ = lstm(params, x, dropout=0.5, key=key)
    y_b, _ = lstm(params, x, dropout=0.5, key=key)
    np.testing.assert_array_equal(y_a, y_b)
    assert not np.allclose(y_a, y_eval)
    # The last layer's output is never dropped: a one-layer LSTM is unaffected.
    single, x1, _, _ = _inputs(CONFIGS["plain"])
    np.testing.assert_array_equal(lstm(single, x1, dropout=0.5, key=key)[0], lstm(single, x1)[0])


def test_mixed_precision_close_to_float32():
    params, x, h0, c0 = _inputs(CONFIGS["all"])
    state = LSTMState(h0, c0)
    # Jitted, as training runs it (and 3x faster here than op by op).
    run = jax.jit(lambda p, x, compute_dtype=None: lstm(p, x, state, compute_dtype=compute_dtype),
                  static_argnames="compute_dtype")
    y32, s32 = run(params, x)
    y16, s16 = run(params, x, compute_dtype=jnp.bfloat16)
    assert y16.dtype == jnp.float32
    rel = np.linalg.norm(y16 - y32) / np.linalg.norm(y32)
    assert 0 < rel < 2e-2
    params_bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    y_bf, s_bf = run(params_bf16, x.astype(jnp.bfloat16))
    assert y_bf.dtype == jnp.bfloat16 and s_bf.h.dtype == jnp.bfloat16
    rel = np.linalg.norm(np.asarray(y_bf, np.float32) - y32) / np.linalg.norm(y32)
    assert rel < 3e-2
    grads = jax.jit(jax.grad(lambda p: jnp.sum(lstm(p, x, compute_dtype=jnp.bfloat16)[0] ** 2)))(
        params)
    ref = jax.jit(jax.grad(lambda p: jnp.sum(lstm(p, x)[0] ** 2)))(params)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        assert g.dtype == jnp.float32
        assert np.linalg.norm(g - r) <= 5e-2 * np.linalg.norm(r)


def _hlo_without_shapes(steps):
    params = init_lstm(jax.random.key(0), F, H, num_layers=2, bidirectional=True)

    def loss(p, x):
        return jnp.sum(lstm(p, x)[0])

    text = jax.jit(jax.grad(loss)).lower(params, jnp.ones((B, steps, F))).as_text()
    return re.sub(r"\d+", "N", text)


def test_compiled_program_does_not_grow_with_sequence_length():
    # The time loop is a scan: T only changes shapes, never the program (so compile time is flat).
    assert _hlo_without_shapes(10) == _hlo_without_shapes(5000)


ERRORS = [
    (lambda p: lstm(p, jnp.ones((2, 3, F + 1))), "features"),
    (lambda p: lstm(p, jnp.ones((2, 3, 4, F))), "rank"),
    (lambda p: lstm(p, jnp.ones((2, 3, F)), LSTMState(jnp.zeros((1, 2, H)), jnp.zeros((1, 3, H)))),
     r"initial_state.c has shape \(1, 3, 5\), expected \(1, 2, 5\)"),
    (lambda p: lstm(p, jnp.ones((2, 3, F)), LSTMState(jnp.zeros((2, H)), jnp.zeros((1, 2, H)))),
     "initial_state.h"),
    (lambda p: lstm(p, jnp.ones((2, 3, F)), seq_lengths=jnp.array([1, 2, 3])), "seq_lengths has shape"),
    (lambda p: lstm(p, jnp.ones((2, 3, F)), seq_lengths=jnp.array([1.0, 2.0])), "integers"),
    (lambda p: lstm(p, jnp.ones((2, 3, F)), dropout=1.0), r"dropout must be a number in \[0, 1\)"),
    (lambda p: lstm(p, jnp.ones((2, 3, F), jnp.int32)), "floating"),
    (lambda p: lstm(p.layers, jnp.ones((2, 3, F))), "LSTMParams"),
    (lambda p: init_lstm(jax.random.key(0), F, H, proj_size=H), "proj_size must be smaller"),
    (lambda p: init_lstm(jax.random.key(0), 0, H), "input_size must be an integer >= 1"),
    (lambda p: init_lstm(jax.random.key(0), F, -2), "hidden_size"),
    (lambda p: init_lstm(jax.random.key(0), F, H, num_layers=0), "num_layers"),
    (lambda p: init_lstm(jax.random.key(0), F, H, init="xavier"), "init must be"),
    (lambda p: lstm(p, jnp.ones((2, 3, F)), backend="fast"), "backend must be one of"),
    (lambda p: lstm(p, jnp.ones((2, 3, F)), backend="cudnn"), 'backend="cudnn" cannot run'),
    (lambda p: lstm(p, jnp.ones((2, 3, F)), backend="pallas"), 'backend="pallas" cannot run'),
    (lambda p: lstm(p, jnp.ones((2, 3, F)), seq_lengths=jnp.array([4, 3])),
     r"seq_lengths must lie in \[0, T=3\] .*got \[4\]"),
    (lambda p: lstm(p, jnp.ones((2, 3, F)), seq_lengths=jnp.array([-1, 3])), r"got \[-1\]"),
    (lambda p: lstm(p, jnp.ones((2, 3, F)), compute_dtype=jnp.int32),
     "compute_dtype must be a floating-point dtype, got int32"),
    (lambda p: lstm(p, jnp.ones((2, 3, F)), batch_first="no"), "batch_first must be True or False"),
    (lambda p: init_lstm(jax.random.key(0), F, H, dtype=jnp.int32),
     "dtype must be a floating-point dtype, got int32"),
    (lambda p: init_lstm(jax.random.key(0), F, H, bidirectional="yes"),
     "bidirectional must be True or False, got 'yes'"),
    (lambda p: init_lstm(jax.random.key(0), F, H, forget_bias="1"), "forget_bias must be a number"),
    (lambda p: lstm_cell(init_lstm(jax.random.key(0), F, H), LSTMState(jnp.zeros((2, H)),
                         jnp.zeros((2, H))), jnp.ones((2, F))),
     r"cell_params must be an LSTMCellParams, got LSTMParams \(pass one layer"),
    (lambda p: lstm_cell(p.layers[0][0], LSTMState(jnp.zeros((2, H)), jnp.zeros((2, H))),
                         jnp.ones((2, F + 1))), rf"x must have shape \(B, {F}\) or \({F},\)"),
    (lambda p: lstm_cell(p.layers[0][0], LSTMState(jnp.zeros((2, H - 1)), jnp.zeros((2, H))),
                         jnp.ones((2, F))), rf"state.h must have shape \(B, {H}\)"),
    (lambda p: lstm_cell(p.layers[0][0], LSTMState(jnp.zeros((3, H)), jnp.zeros((3, H))),
                         jnp.ones((2, F))), "must share their batch shape"),
    (lambda p: lstm_cell(p.layers[0][0], jnp.zeros((2, H)), jnp.ones((2, F))),
     "state must be an LSTMState"),
]


@pytest.mark.parametrize("call,message", ERRORS)
def test_bad_input_raises_clear_error(call, message):
    params = init_lstm(jax.random.key(0), F, H)
    with pytest.raises(ValueError, match=message):
        call(params)


def test_errors_are_raised_at_trace_time_under_jit():
    params = init_lstm(jax.random.key(0), F, H)
    with pytest.raises(ValueError, match="features"):
        jax.jit(lambda x: lstm(params, x))(jnp.ones((2, 3, F + 2)))


def test_out_of_range_lengths_are_clipped_under_jit():
    # Traced lengths cannot raise: a length past T runs as T (no NaN from reading past the end
    # in the reverse direction), a negative one as 0.
    params = init_lstm(jax.random.key(0), F, H, bidirectional=True)
    x = jax.random.normal(jax.random.key(1), (3, 6, F))
    run = jax.jit(lambda n: lstm(params, x, seq_lengths=n))
    y, state = run(jnp.array([9, -2, 4]))
    y_ref, state_ref = run(jnp.array([6, 0, 4]))  # same program: bit-equal
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(state.h, state_ref.h)
    assert np.isfinite(np.asarray(y)).all()


def test_lstm_cell_takes_a_plain_pair_as_state():
    p = init_lstm(jax.random.key(0), F, H).layers[0][0]
    h, c = jnp.full((2, H), 0.3), jnp.full((2, H), -0.2)
    x = jnp.ones((2, F))
    (state_a, y_a), (state_b, y_b) = lstm_cell(p, (h, c), x), lstm_cell(p, LSTMState(h, c), x)
    np.testing.assert_array_equal(y_a, y_b)
    np.testing.assert_array_equal(state_a.c, state_b.c)


def test_checkpoint_around_remat_under_vmap_and_both_directions():
    # jax.checkpoint (flax's remat) around lstm(remat=True): bidirectional layers run through
    # vmap, as does an ensemble; the gradients equal those without any rematerialisation.
    x = jax.random.normal(jax.random.key(1), (2, 5, F))  # chunks of 2 steps, one padded
    params = init_lstm(jax.random.key(0), F, H, bidirectional=True)
    got = jax.jit(jax.grad(jax.checkpoint(lambda p: jnp.sum(lstm(p, x, remat=True)[0] ** 2))))(
        params)
    want = jax.jit(jax.grad(lambda p: jnp.sum(lstm(p, x)[0] ** 2)))(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
    ensemble = jax.vmap(lambda k: init_lstm(k, F, H))(jax.random.split(jax.random.key(2), 2))

    def ensemble_grad(remat):
        one = jax.checkpoint(lambda p: jnp.sum(lstm(p, x, remat=remat)[0][:, -1]))
        return jax.jit(jax.grad(lambda e: jnp.sum(jax.vmap(one)(e))))(ensemble)

    for g, w in zip(jax.tree.leaves(ensemble_grad(True)), jax.tree.leaves(ensemble_grad(False)),
                    strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)


def test_forward_mode_with_custom_grad_false_equals_reverse_mode():
    params = init_lstm(jax.random.key(0), F, H, num_layers=2)
    x = jax.random.normal(jax.random.key(1), (2, 7, F))
    loss = lambda x, custom: jnp.sum(jnp.tanh(lstm(params, x, custom_grad=custom)[0]))
    forward = jax.jit(jax.jacfwd(lambda x: loss(x, False)))(x)
    reverse = jax.jit(jax.grad(lambda x: loss(x, True)))(x)
    np.testing.assert_allclose(forward, reverse, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda x: loss(x, True), (x,), (x,))


@pytest.mark.parametrize("shape", [(2, 0, F), (0, 5, F)])
@pytest.mark.parametrize("options", [{}, {"remat": True}, {"peephole": True}])
def test_empty_time_or_batch_axes_run_and_differentiate(shape, options):
    peephole = options.pop("peephole", False)
    params = init_lstm(jax.random.key(0), F, H, bidirectional=True, peephole=peephole)
    B = shape[0]
    h0 = jnp.full((2, B, H), 0.5)
    state0 = LSTMState(h0, jnp.zeros((2, B, H)))

    def loss(p, h):
        y, state = lstm(p, jnp.ones(shape), LSTMState(h, state0.c), **options)
        return jnp.sum(y) + jnp.sum(state.h)

    y, state = lstm(params, jnp.ones(shape), state0, **options)
    assert y.shape == (B, shape[1], 2 * H)
    np.testing.assert_array_equal(state.h, h0)  # no step: the initial state
    dp, dh = jax.grad(loss, argnums=(0, 1))(params, h0)
    assert all(float(jnp.max(jnp.abs(g), initial=0.0)) == 0.0 for g in jax.tree.leaves(dp))
    np.testing.assert_array_equal(dh, jnp.ones_like(h0))  # d h_T / d h_0 = identity at T=0


def test_cell_state_comes_back_in_float32_for_bfloat16_input():
    params = init_lstm(jax.random.key(0), F, H)
    x = jax.random.normal(jax.random.key(1), (2, 7, F)).astype(jnp.bfloat16)
    y, state = lstm(params, x)
    assert (y.dtype, state.h.dtype, state.c.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
    # The same c as lstm_cell's (float32) at the last step of a loop of cells.
    cell_state = LSTMState(jnp.zeros((2, H), jnp.bfloat16), jnp.zeros((2, H), jnp.float32))
    for t in range(7):
        cell_state, _ = lstm_cell(params.layers[0][0], cell_state, x[:, t])
        cell_state = LSTMState(cell_state.h.astype(jnp.bfloat16), cell_state.c)
    np.testing.assert_allclose(state.c[0], cell_state.c, rtol=2e-2, atol=2e-2)


def test_remat_chunks_divide_t_where_a_divisor_is_near_sqrt_t():
    import math

    from lstm_jax._recurrence import remat_chunk

    # Padding T to whole chunks copies every T-long array: a divisor within a factor of two
    # of scale * isqrt(T) is taken instead, the one nearest to it.
    assert [remat_chunk(t) for t in (100, 1000, 2000, 9973, 10000)] == [10, 25, 40, 99, 100]
    assert [remat_chunk(t, scale=2) for t in (100, 1000, 9973, 10000)] == [20, 50, 198, 200]
    for t in range(1, 2500):
        target = min(t, math.isqrt(t))
        near = [c for c in range(max(1, target // 2), min(t, 2 * target) + 1) if t % c == 0]
        c = remat_chunk(t)
        if near:
            assert t % c == 0 and abs(c - target) == min(abs(d - target) for d in near)
        else:
            assert c == target
