"""The research variants against a NumPy float64 reference of their equations, and their gradients.

Peephole (Gers & Schmidhuber 2000), layer norm (Ba et al. 2016), CIFG (Greff et al. 2017), cell
clipping, zoneout (Krueger et al. 2017), variational recurrent dropout (Gal & Ghahramani 2016),
candidate dropout (Semeniuta et al. 2016) and chrono initialisation (Tallec & Ollivier 2018).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_jax import LSTMState, init_lstm, lstm, lstm_cell, to_torch
from lstm_jax._cell import VariantOptions
from lstm_jax._lstm import variant_masks

B, T, F, H = 3, 5, 4, 5
LENGTHS = np.array([5, 2, 0])


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


# ----------------------------------------------------------------------------- NumPy reference


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _ln(v, scale, bias=None, eps=1e-5):
    mean = v.mean(-1, keepdims=True)
    var = ((v - mean) ** 2).mean(-1, keepdims=True)
    out = (v - mean) / np.sqrt(var + eps) * scale
    return out if bias is None else out + bias


def reference_step(p, h, c, x, opts, rmask=None, g_mask=None, c_mask=None, h_mask=None):
    """One step written from the papers' equations, float64, masks given (None: evaluation)."""

    def f64(a):
        return None if a is None else np.asarray(a, np.float64)

    hidden = c.shape[-1]
    gates = p.w_hh.shape[1] // hidden
    xw = x @ f64(p.w_ih)
    if p.ln_x_scale is not None:
        xw = _ln(xw, f64(p.ln_x_scale))
    hw = (h if rmask is None else h * rmask) @ f64(p.w_hh)
    if p.ln_h_scale is not None:
        hw = _ln(hw, f64(p.ln_h_scale))
    z = xw + hw + (0.0 if p.b is None else f64(p.b))
    blocks = np.split(z, gates, axis=-1)
    zi, zf, zg, zo = blocks if gates == 4 else (None, *blocks)
    peep = f64(p.w_peep)
    if peep is not None:
        p_i, p_f, p_o = peep if gates == 4 else (None, *peep)
        zf = zf + p_f * c
        zi = None if zi is None else zi + p_i * c
    f = _sigmoid(zf)
    i = 1.0 - f if gates == 3 else _sigmoid(zi)
    g = np.tanh(zg)
    if g_mask is not None:
        g = g * g_mask / (1.0 - opts.candidate_dropout)
    c_new = f * c + i * g
    if opts.cell_clip is not None:
        c_new = np.clip(c_new, -opts.cell_clip, opts.cell_clip)
    o = _sigmoid(zo + (0.0 if peep is None else p_o * c_new))
    c_out = c_new if p.ln_c_scale is None else _ln(c_new, f64(p.ln_c_scale), f64(p.ln_c_bias))
    h_new = o * np.tanh(c_out)
    if p.w_hr is not None:
        h_new = h_new @ f64(p.w_hr)
    # Zoneout: h_t uses the un-zoned c~ (Krueger et al. 2017, eq. for LSTMs).
    zc, zh = opts.zoneout_c, opts.zoneout_h
    c_t = np.where(c_mask, c_new, c) if c_mask is not None else zc * c + (1 - zc) * c_new
    h_t = np.where(h_mask, h_new, h) if h_mask is not None else zh * h + (1 - zh) * h_new
    return h_t, c_t


def reference_lstm(params, x, opts, key=None, lengths=None):
    """Each sequence alone over its own length; outputs past it zero (torch's packed semantics)."""
    x = np.asarray(x, np.float64)
    batch, steps, _ = x.shape
    L, D = params.num_layers, params.num_directions
    hid, out = params.hidden_size, params.output_size
    lengths = np.full(batch, steps) if lengths is None else lengths
    h_n, c_n = np.zeros((L * D, batch, out)), np.zeros((L * D, batch, hid))
    inp = x
    for layer in range(L):
        rmask, masks = variant_masks(key, layer, opts, D, steps, batch, hid, out, jnp.float64)
        rmask, masks = jax.tree.map(np.asarray, (rmask, masks))
        y = np.zeros((batch, steps, D * out))
        for d in range(D):
            p = params.layers[layer][d]
            for b in range(batch):
                h, c = np.zeros((1, out)), np.zeros((1, hid))
                times = range(lengths[b]) if d == 0 else reversed(range(lengths[b]))
                for s, t in enumerate(times):  # masks are indexed by loop step s

                    def m(a, s=s, b=b, d=d):
                        return None if a is None else a[d, s, b : b + 1]

                    r = None if rmask is None else rmask[d, b : b + 1]
                    h, c = reference_step(
                        p, h, c, inp[b : b + 1, t], opts, r, m(masks.g), m(masks.c), m(masks.h)
                    )
                    y[b, t, d * out : (d + 1) * out] = h[0]
                h_n[layer * D + d, b], c_n[layer * D + d, b] = h[0], c[0]
        inp = y
    return inp, h_n, c_n


# ----------------------------------------------------------------------------- inputs

VARIANTS = {
    # name: (init_lstm keywords, lstm keywords, train mode: lstm draws masks from a key)
    "peephole": (dict(peephole=True), dict(), False),
    "layer_norm": (dict(layer_norm=True, proj_size=3), dict(), False),
    "cifg_peephole": (dict(cifg=True, peephole=True), dict(), False),
    "clip_zoneout_eval": (dict(), dict(zoneout_h=0.3, zoneout_c=0.4, cell_clip=0.4), False),
    "eval_mix": (dict(cifg=True, peephole=True),
                 dict(zoneout_h=0.3, zoneout_c=0.4, cell_clip=0.5), False),
    "zoneout_train": (dict(proj_size=3), dict(zoneout_h=0.3, zoneout_c=0.4), True),
    "dropouts": (dict(), dict(recurrent_dropout=0.4, candidate_dropout=0.3), True),
    "all": (
        dict(peephole=True, layer_norm=True, cifg=True, proj_size=3, num_layers=2),
        dict(cell_clip=0.8, zoneout_h=0.2, zoneout_c=0.3, recurrent_dropout=0.3,
             candidate_dropout=0.2),
        True,
    ),
}


def _setup(name, dtype=np.float32, seed=0, bidirectional=True, num_layers=None):
    init_kw, call_kw, train = VARIANTS[name]
    if num_layers is not None:
        init_kw = dict(init_kw, num_layers=num_layers)
    rng = np.random.default_rng(seed)
    params = init_lstm(jax.random.key(seed), F, H, bidirectional=bidirectional, init="pytorch",
                       **init_kw)
    # Perturb everything (peepholes start at 0, layer-norm gains at 1) so no term can hide.
    params = jax.tree.map(
        lambda a: jnp.asarray(a + 0.3 * rng.standard_normal(a.shape), dtype), params
    )
    x = rng.standard_normal((B, T, F)).astype(dtype) * 2.0
    if train:
        call_kw = dict(call_kw, key=jax.random.key(seed + 7))
    return params, x, call_kw


def _opts(call_kw):
    names = ("cell_clip", "zoneout_h", "zoneout_c", "recurrent_dropout", "candidate_dropout")
    return VariantOptions.create(**{k: v for k, v in call_kw.items() if k in names})


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("name", VARIANTS)
def test_matches_numpy_reference_of_the_equations(x64, name):
    params, x, call_kw = _setup(name, np.float64)
    y, state = jax.jit(lambda p, x: lstm(p, x, seq_lengths=LENGTHS, **call_kw))(params, x)
    y_ref, h_ref, c_ref = reference_lstm(params, x, _opts(call_kw), call_kw.get("key"), LENGTHS)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(state.h, h_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(state.c, c_ref, rtol=1e-12, atol=1e-13)


def test_cell_clip_actually_clips():
    params, x, _ = _setup("peephole")
    final_c = jax.jit(lambda p, x, clip: lstm(p, x * 5, cell_clip=clip)[1].c, static_argnums=2)
    assert float(jnp.max(jnp.abs(final_c(params, x, 0.4)))) == pytest.approx(0.4)
    assert float(jnp.max(jnp.abs(final_c(params, x, None)))) > 0.4


def test_zero_extra_weights_and_zero_rates_equal_the_plain_lstm():
    """Peepholes of 0, rates of 0 and a clip no value reaches give the plain LSTM, bit for bit."""
    rng = np.random.default_rng(0)
    plain = init_lstm(jax.random.key(0), F, H, bidirectional=True, proj_size=3)
    plain = jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape).astype(a.dtype), plain)
    peep = init_lstm(jax.random.key(0), F, H, bidirectional=True, proj_size=3, peephole=True)
    peep = jax.tree.map(lambda p, q: q if p is None else p, plain, peep,
                        is_leaf=lambda v: v is None)
    assert peep.peephole and float(jnp.abs(peep.layers[0][0].w_peep).max()) == 0.0
    x = rng.standard_normal((B, T, F)).astype(np.float32)
    run = jax.jit(lambda p, k, kw: lstm(p, x, seq_lengths=LENGTHS, key=k, **dict(kw)),
                  static_argnums=2)
    # The plain LSTM on the scan (on CPU auto would take the C++ kernel, whose sums run in
    # another order): the variants' loop must equal it bit for bit.
    want = run(plain, None, (("backend", "scan"),))
    zero_rates = (("zoneout_h", 0.0), ("zoneout_c", 0.0), ("recurrent_dropout", 0.0),
                  ("candidate_dropout", 0.0), ("cell_clip", 1e30))
    for p, key, kw in [(peep, None, ()), (peep, jax.random.key(3), zero_rates)]:
        got = run(p, key, kw)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(a, b)


def test_lstm_cell_loop_equals_lstm(x64):
    """lstm_cell, looped in Python, is the same step as the scanned layer (evaluation mode)."""
    params, x, _ = _setup("all", np.float64, bidirectional=False)
    p = params.layers[0][0]
    kw = dict(cell_clip=0.8, zoneout_h=0.2, zoneout_c=0.3, recurrent_dropout=0.3,
              candidate_dropout=0.2)
    single = params._replace(layers=params.layers[:1])

    @jax.jit
    def both(p, single, x):
        state = LSTMState(jnp.zeros((B, p.output_size)), jnp.zeros((B, H)))
        ys = []
        for t in range(T):
            state, h = lstm_cell(p, state, x[:, t], **kw)
            ys.append(h)
        return (jnp.stack(ys, 1), state), lstm(single, x, **kw)

    (y_loop, state), (y, final) = both(p, single, x)
    np.testing.assert_allclose(y_loop, y, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(state.c, final.c[0], rtol=1e-13, atol=1e-14)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", ["eval_mix", "all"])
def test_custom_vjp_equals_autodiff(x64, name):
    """Bidirectional, with lengths and an initial state; one layer (stacking is plain autodiff).

    "all" is every variant at once with training masks (layer norm, projection, peepholes,
    CIFG, clipping, zoneout and both dropouts); it also checks the rematerialised backward pass.
    """
    params, x, call_kw = _setup(name, np.float64, num_layers=1)
    h0 = 0.5 * np.random.default_rng(1).standard_normal((2, B, params.output_size))
    c0 = np.random.default_rng(2).standard_normal((2, B, H))

    def loss(how, p, x, h0, c0):
        y, s = lstm(p, x, LSTMState(h0, c0), seq_lengths=LENGTHS, custom_grad=how != "autodiff",
                    remat=how == "remat", **call_kw)
        return jnp.sum(jnp.sin(3 * y)) + jnp.sum(s.h ** 2) + jnp.sum(jnp.cos(s.c))

    grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4)), static_argnums=0)
    want = grad("autodiff", params, x, h0, c0)
    for how in ("custom", "remat") if name == "all" else ("custom",):
        got = grad(how, params, x, h0, c0)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            scale = max(1.0, float(np.max(np.abs(b))))
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * scale)
    # every variant weight receives a gradient
    for leaf in jax.tree.leaves(got[0]):
        assert float(jnp.max(jnp.abs(leaf))) > 0.0


# ----------------------------------------------------------------------------- randomness


def test_training_is_stochastic_with_a_key_and_evaluation_deterministic():
    params, x, _ = _setup("peephole", bidirectional=False)
    kw = dict(zoneout_h=0.2, zoneout_c=0.3, recurrent_dropout=0.3, candidate_dropout=0.2)
    run = jax.jit(lambda p, x, k: lstm(p, x, key=k, **kw)[0])
    a, b = run(params, x, jax.random.key(1)), run(params, x, jax.random.key(1))
    c = run(params, x, jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    evaluate = jax.jit(lambda p, x: lstm(p, x, **kw)[0])
    e1, e2 = evaluate(params, x), evaluate(params, x)
    np.testing.assert_array_equal(e1, e2)
    assert not np.allclose(a, e1)


def test_evaluation_is_the_expectation_over_masks(x64):
    """One step from a given state: E[zoneout(h), zoneout(c), candidate dropout] = evaluation."""
    params, x, _ = _setup("peephole", np.float64, bidirectional=False)
    p = params.layers[0][0]
    rng = np.random.default_rng(5)
    state = LSTMState(rng.standard_normal((B, H)), rng.standard_normal((B, H)))
    xt = x[:, 0]
    for kw in [dict(zoneout_h=0.3), dict(zoneout_c=0.4), dict(candidate_dropout=0.3)]:
        keys = jax.random.split(jax.random.key(0), 20000)
        draws = jax.jit(jax.vmap(lambda k, kw=kw: lstm_cell(p, state, xt, key=k, **kw)[0]))(keys)
        want = lstm_cell(p, state, xt, **kw)[0]
        # zoneout of h is linear in its mask; so are c under zoneout and candidate dropout.
        field = "h" if "zoneout_h" in kw else "c"
        mean, expect = getattr(draws, field).mean(0), getattr(want, field)
        std = getattr(draws, field).std(0) / np.sqrt(len(keys))
        assert np.all(np.abs(mean - expect) < 5 * std + 1e-12), kw


def test_recurrent_dropout_mask_is_one_per_sequence():
    """Gal & Ghahramani: the same units of h_{t-1} are dropped at every step of a sequence."""
    opts = VariantOptions.create(recurrent_dropout=0.5)
    rmask, masks = variant_masks(jax.random.key(0), 0, opts, 2, 50, 64, 8, 8, jnp.float32)
    assert rmask.shape == (2, 64, 8) and masks == type(masks)()  # no per-step masks
    assert set(np.unique(np.asarray(rmask))) <= {0.0, 2.0}
    assert abs(float((rmask == 0).mean()) - 0.5) < 0.05
    opts = VariantOptions.create(zoneout_h=0.25, zoneout_c=0.25, candidate_dropout=0.25)
    _, masks = variant_masks(jax.random.key(0), 0, opts, 2, 50, 64, 8, 6, jnp.float32)
    assert masks.h.shape == (2, 50, 64, 6) and masks.c.shape == masks.g.shape == (2, 50, 64, 8)
    for m in masks:
        assert abs(float(m.mean()) - 0.75) < 0.02
    assert not np.array_equal(masks.c, masks.g)


def test_lstm_cell_recurrent_dropout_needs_a_sequence_key():
    p = init_lstm(jax.random.key(0), F, H).layers[0][0]
    state = LSTMState(jnp.ones((B, H)), jnp.ones((B, H)))
    with pytest.raises(ValueError, match="recurrent_key"):
        lstm_cell(p, state, jnp.ones((B, F)), recurrent_dropout=0.5, key=jax.random.key(0))
    rk = jax.random.key(1)
    s1, _ = lstm_cell(p, state, jnp.ones((B, F)), recurrent_dropout=0.5, recurrent_key=rk)
    s2, _ = lstm_cell(p, state, jnp.ones((B, F)), recurrent_dropout=0.5, recurrent_key=rk)
    np.testing.assert_array_equal(s1.h, s2.h)


# ----------------------------------------------------------------------------- parameters


def test_structure_says_which_variant_is_on():
    p = init_lstm(jax.random.key(0), F, H, peephole=True, layer_norm=True, cifg=True, proj_size=2)
    cell = p.layers[0][0]
    assert (p.peephole, p.layer_norm, p.cifg, p.is_plain) == (True, True, True, False)
    assert cell.w_ih.shape == (F, 3 * H) and cell.w_hh.shape == (2, 3 * H)
    assert cell.b.shape == (3 * H,) and cell.w_peep.shape == (2, H)
    assert cell.ln_x_scale.shape == cell.ln_h_scale.shape == (3 * H,)
    assert cell.ln_c_scale.shape == cell.ln_c_bias.shape == (H,)
    assert (cell.hidden_size, cell.num_gates, cell.output_size) == (H, 3, 2)
    assert init_lstm(jax.random.key(0), F, H, peephole=True).layers[0][0].w_peep.shape == (3, H)
    assert init_lstm(jax.random.key(0), F, H, proj_size=2).is_plain


def test_cifg_is_the_plain_init_without_the_input_block():
    plain = init_lstm(jax.random.key(3), F, H, num_layers=2, init="pytorch").layers[1][0]
    cifg = init_lstm(jax.random.key(3), F, H, num_layers=2, init="pytorch", cifg=True).layers[1][0]
    np.testing.assert_array_equal(cifg.w_ih, plain.w_ih[:, H:])
    np.testing.assert_array_equal(cifg.w_hh, plain.w_hh[:, H:])
    np.testing.assert_array_equal(cifg.b, plain.b[H:])


def test_chrono_init():
    t_max = 50
    p = init_lstm(jax.random.key(0), F, 64, bidirectional=True, chrono_t_max=t_max)
    for cell in p.layers[0]:
        b_i, b_f, b_g, b_o = np.split(np.asarray(cell.b), 4)
        assert np.all(b_f >= 0.0) and np.all(b_f <= np.log(t_max - 1) + 1e-6)
        assert b_f.std() > 0.5  # spread over the time scales, not one value
        np.testing.assert_array_equal(b_i, -b_f)
        assert not b_g.any() and not b_o.any()
    assert not np.array_equal(p.layers[0][0].b, p.layers[0][1].b)
    cifg = init_lstm(jax.random.key(0), F, 64, cifg=True, chrono_t_max=t_max).layers[0][0]
    b_f, b_g, b_o = np.split(np.asarray(cifg.b), 3)
    assert np.all(b_f >= 0.0) and not b_g.any() and not b_o.any()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(chrono_t_max=2), "chrono_t_max"),
        (dict(chrono_t_max=10, bias=False), "bias=True"),
    ],
)
def test_bad_init_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        init_lstm(jax.random.key(0), F, H, **kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(cell_clip=0.0), "cell_clip"),
        (dict(cell_clip=-1.0), "cell_clip"),
        (dict(zoneout_h=1.0), "zoneout_h"),
        (dict(zoneout_c=-0.1), "zoneout_c"),
        (dict(recurrent_dropout=1.5), "recurrent_dropout"),
        (dict(candidate_dropout="0.1"), "candidate_dropout"),
    ],
)
def test_bad_call_arguments(kwargs, message):
    params = init_lstm(jax.random.key(0), F, H)
    with pytest.raises(ValueError, match=message):
        lstm(params, jnp.ones((B, T, F)), **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(peephole=True), "w_peep"),
    (dict(layer_norm=True), "ln_x_scale"),
    (dict(cifg=True), "CIFG"),
])
def test_to_torch_refuses_variant_parameters(kwargs, message):
    params = init_lstm(jax.random.key(0), F, H, **kwargs)
    with pytest.raises(ValueError, match=message):
        to_torch(params)


def test_variants_keep_dtypes_in_mixed_precision():
    params, x, _ = _setup("layer_norm", bidirectional=False)
    run = jax.jit(lambda p, x: lstm(p, x, zoneout_h=0.2, cell_clip=1.0))
    y, state = run(params, jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == state.h.dtype == jnp.bfloat16
    ref, _ = run(params, x)
    # layer norm of near-constant vectors amplifies bfloat16 rounding: a loose bound
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=0.05)
    # unbatched input runs through the variant path too
    y1, s1 = run(params, x[0])
    np.testing.assert_allclose(y1, ref[0], rtol=1e-6, atol=1e-6)
    assert s1.c.shape == (1, H)


def test_variant_config_reaches_the_core():
    """configs/copy_variant.yaml: model.lstm_kwargs go to init_lstm and lstm by name."""
    from pathlib import Path

    from lstm_jax.train.config import load_config
    from lstm_jax.train.model import split_core_kwargs

    path = Path(__file__).resolve().parents[1] / "configs" / "copy_variant.yaml"
    assert path.read_text().startswith("# lstm-jax train configs/copy_variant.yaml")
    cfg = load_config(path, ["model.lstm_kwargs.layer_norm=true"])
    init_kw, call_kw = split_core_kwargs(cfg.model)
    assert init_kw["chrono_t_max"] == 120 and init_kw["peephole"] and init_kw["layer_norm"]
    assert call_kw["zoneout_c"] == 0.1
    params = init_lstm(jax.random.key(0), 9, 8, **init_kw)
    assert params.peephole and params.layer_norm
