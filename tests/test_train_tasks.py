"""Each task's data pipeline: shapes, determinism, masks and lengths, and the charlm stream."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_jax.train.config import ConfigError, load_config
from lstm_jax.train.loop import Trainer
from lstm_jax.train.make_data import majority_dataset
from lstm_jax.train.model import make_model
from lstm_jax.train.tasks import AddingTask, CharLMTask, ClassifyTask, CopyTask

TEXT = "".join(f"line {i}: the cat sat on mat {i * 7 % 13}.\n" for i in range(400))


def test_adding_batches():
    cfg = load_config(None, ["task.seq_len=12", "seed=1"])
    task = AddingTask(cfg)
    b = task.train_batch(jnp.int32(5), 8)
    x, y = np.asarray(b["x"]), np.asarray(b["y"])
    assert x.shape == (8, 12, 2) and y.shape == (8,)
    marks = x[..., 1]
    assert (marks.sum(1) == 2).all()
    assert (marks[:, :6].sum(1) == 1).all() and (marks[:, 6:].sum(1) == 1).all()
    np.testing.assert_allclose(y, (x[..., 0] * marks).sum(1), rtol=1e-6)
    again = task.train_batch(jnp.int32(5), 8)
    other = task.train_batch(jnp.int32(6), 8)
    np.testing.assert_array_equal(x, again["x"])
    assert not np.array_equal(x, other["x"])
    assert task.chance["mse"] == pytest.approx(1 / 6)


def test_adding_eval_set_is_padded_with_zero_weight_and_chance_holds():
    task = AddingTask(load_config(None, ["task.eval_size=1000", "task.seq_len=10"]))
    batches = task.eval_batches(300)
    assert len(batches) == 4 and all(b["x"].shape == (300, 10, 2) for b in batches)
    w = np.concatenate([b["weight"] for b in batches])
    assert w.sum() == 1000 and (w[1000:] == 0).all()
    y = np.concatenate([b["y"] for b in batches])[:1000]
    assert np.mean((y - 1.0) ** 2) == pytest.approx(1 / 6, abs=0.02)


def test_copy_layout():
    cfg = load_config(None, ["task.name=copy", "task.delay=5", "task.copy_length=3",
                             "task.num_symbols=4"])
    task = CopyTask(cfg)
    b = task.train_batch(jnp.int32(0), 6)
    x, y = np.asarray(b["x"]), np.asarray(b["y"])
    assert x.shape == (6, 5 + 2 * 3) and y.shape == (6, 3)
    np.testing.assert_array_equal(x[:, :3], y + 1)  # the symbols, shifted past the blank
    assert (x[:, 3:7] == 0).all() and (x[:, 7] == 5).all() and (x[:, 8:] == 0).all()
    assert task.vocab_size == 6 and task.output_size == 4
    # The loss reads only the last copy_length steps: perfect logits there score accuracy 1.
    logits = jnp.zeros((6, 11, 4)).at[:, -3:, :].set(jax.nn.one_hot(y, 4) * 50)
    loss, m = task.loss(logits, b)
    assert float(m["accuracy"]) == 1.0 and float(loss) < 1e-6
    assert task.chance == {"accuracy": 0.25, "loss": pytest.approx(math.log(4))}



def _charlm_cfg_with_path(*extra, path=None):
    import tempfile
    from pathlib import Path

    if path is None:
        path = Path(tempfile.mkdtemp()) / "text.txt"
        path.write_text(TEXT, encoding="utf-8")
    return load_config(None, ["task.name=charlm", f"data.path={path}", "task.seq_len=5",
                              "train.batch_size=3", "data.val_fraction=0.2", *extra])


def test_charlm_stream_continues_rows_and_resets_per_epoch():
    cfg = _charlm_cfg_with_path()
    task = CharLMTask(cfg)
    assert task.vocab == "".join(sorted(set(TEXT)))
    windows = task.windows
    b0, b1 = task.train_batch(jnp.int32(0), 3), task.train_batch(jnp.int32(1), 3)
    # Targets are inputs shifted by one; the next window starts where this one's targets end.
    np.testing.assert_array_equal(b0["x"][:, 1:], b0["y"][:, :-1])
    np.testing.assert_array_equal(b1["x"][:, 0], b0["y"][:, -1])
    assert bool(b0["reset"]) and not bool(b1["reset"])
    # Rows are consecutive pieces of the training text.
    text = "".join(task.vocab[i] for i in np.asarray(b0["x"][0]))
    assert text in TEXT
    last = task.train_batch(jnp.int32(windows - 1), 3)
    nxt = task.train_batch(jnp.int32(windows), 3)
    assert bool(nxt["reset"]) and not bool(last["reset"])
    assert task.position(windows + 2) == {"epoch": 1, "window": 2,
                                          "chars_seen": (windows + 2) * 15}
    # The validation stream is read once, in order, from a reset state.
    val = task.eval_batches(3)
    assert bool(val[0]["reset"]) and not any(bool(v["reset"]) for v in val[1:])
    np.testing.assert_array_equal(val[1]["x"][:, 0], val[0]["y"][:, -1])
    assert 0 < task.chance["loss"] < math.log(task.vocab_size)
    assert task.chance["bpc"] == pytest.approx(task.chance["loss"] / math.log(2))


def test_charlm_carry_is_the_final_state_of_the_previous_batch():
    cfg = _charlm_cfg_with_path("model.hidden_size=8", "model.embed_dim=4")
    trainer = Trainer(cfg)
    state = trainer.init_state()
    params0 = jax.tree.map(jnp.copy, state.params)
    batch0 = trainer.make_batch(np.int32(0))
    apply = jax.jit(trainer.model.apply)
    _, expected = apply(params0, batch0["x"], trainer.model.zero_state(3))
    state, _ = trainer.train_step(state, batch0)
    np.testing.assert_allclose(state.carry.h, expected.h, rtol=1e-6)
    np.testing.assert_allclose(state.carry.c, expected.c, rtol=1e-6)
    # and the next step starts from it: its loss is that of params1 on batch1 from the carry.
    params1 = jax.tree.map(jnp.copy, state.params)
    carry1 = jax.tree.map(jnp.copy, state.carry)
    batch1 = trainer.make_batch(np.int32(1))
    out, _ = apply(params1, batch1["x"], carry1)
    want, _ = trainer.task.loss(out, batch1)
    state, metrics = trainer.train_step(state, batch1)
    assert float(metrics["loss"]) == pytest.approx(float(want), rel=1e-5)


def test_charlm_text_errors(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("abcabc", encoding="utf-8")
    with pytest.raises(ConfigError, match="too few"):
        CharLMTask(_charlm_cfg_with_path(path=small))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc" * 100)
    with pytest.raises(ConfigError, match="not UTF-8"):
        CharLMTask(_charlm_cfg_with_path(path=binary))


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_classify_tokens_lengths_and_epochs(tmp_path):
    x, y, lengths = majority_dataset(20, max_len=9, min_len=3, seed=0)
    xt, yt, lt = majority_dataset(7, max_len=9, min_len=3, seed=1)
    path = _write_npz(tmp_path / "d.npz", x_train=x, y_train=y, len_train=lengths, x_test=xt,
                      y_test=yt, len_test=lt)
    cfg = load_config(None, ["task.name=classify", f"data.path={path}", "train.batch_size=6"])
    task = ClassifyTask(cfg)
    assert task.vocab_size == 5 and task.output_size == int(max(y.max(), yt.max())) + 1
    assert task.steps_per_epoch == 3
    # One epoch visits distinct examples (the remainder of 2 is dropped).
    seen = [np.asarray(task.train_batch(jnp.int32(s), 6)["lengths"]) for s in range(3)]
    rows = np.concatenate([task.train_batch(jnp.int32(s), 6)["x"] for s in range(3)])
    assert len({r.tobytes() for r in np.asarray(rows)}) == 18
    assert all(((s >= 3) & (s <= 9)).all() for s in seen)
    ev = task.eval_batches(6)
    assert [float(b["weight"].sum()) for b in ev] == [6.0, 1.0]
    majority = np.bincount(y).argmax()
    assert task.chance["accuracy"] == pytest.approx(np.mean(yt == majority))


def test_classify_reads_each_sequences_last_valid_step(tmp_path):
    """Padding after a sequence's length must not change its prediction."""
    x, y, lengths = majority_dataset(8, max_len=9, min_len=3, seed=0)
    path = _write_npz(tmp_path / "d.npz", x_train=x, y_train=y, len_train=lengths, x_test=x,
                      y_test=y, len_test=lengths)
    for extra in ([], ["model.bidirectional=true", "model.num_layers=2"]):
        cfg = load_config(None, ["task.name=classify", f"data.path={path}",
                                 "model.hidden_size=6", "model.embed_dim=3",
                                 "train.batch_size=4", *extra])
        task = ClassifyTask(cfg)
        model = make_model(cfg.model, task)
        params = model.init(jax.random.PRNGKey(0))
        xs = jnp.asarray(x)
        garbage = jnp.where(jnp.arange(9)[None, :] >= jnp.asarray(lengths)[:, None], 3, xs)
        apply = jax.jit(model.apply)
        out, _ = apply(params, xs, seq_lengths=jnp.asarray(lengths))
        out2, _ = apply(params, garbage, seq_lengths=jnp.asarray(lengths))
        np.testing.assert_allclose(out, out2, rtol=1e-5, atol=1e-6)
        i = 0
        short, _ = apply(params, xs[i:i + 1, :lengths[i]])
        np.testing.assert_allclose(out[i:i + 1], short, rtol=1e-5, atol=1e-5)


def test_classify_features_and_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    feats = _write_npz(tmp_path / "f.npz", x_train=rng.normal(size=(10, 4, 3)),
                       y_train=np.arange(10) % 2, x_test=rng.normal(size=(5, 4, 3)),
                       y_test=np.arange(5) % 2)
    task = ClassifyTask(load_config(None, ["task.name=classify", f"data.path={feats}",
                                           "train.batch_size=4"]))
    assert task.vocab_size is None and task.input_features == 3
    b = task.train_batch(jnp.int32(0), 4)
    assert b["x"].dtype == jnp.float32 and (np.asarray(b["lengths"]) == 4).all()
    cases = {
        r"lacks array\(s\) y_test": {"x_train": np.zeros((4, 3), int), "y_train": np.zeros(4, int),
                                      "x_test": np.zeros((4, 3), int)},
        "len_train must be": {"x_train": np.zeros((4, 3), int), "y_train": np.zeros(4, int),
                                  "x_test": np.zeros((4, 3), int), "y_test": np.zeros(4, int),
                                  "len_train": np.array([1, 2, 3, 4])},
        "2-D x must hold integer tokens": {
            "x_train": np.zeros((4, 3)), "y_train": np.zeros(4, int),
            "x_test": np.zeros((4, 3)), "y_test": np.zeros(4, int)},
    }
    for message, arrays in cases.items():
        path = _write_npz(tmp_path / "bad.npz", **arrays)
        with pytest.raises(ConfigError, match=message):
            ClassifyTask(load_config(None, ["task.name=classify", f"data.path={path}",
                                            "train.batch_size=2"]))
    not_npz = tmp_path / "x.npz"
    not_npz.write_text("hello")
    with pytest.raises(ConfigError, match=r"x.npz' is not an .npz archive \(np.savez"):
        ClassifyTask(load_config(None, ["task.name=classify", f"data.path={not_npz}"]))
    with pytest.raises(ConfigError, match="make_data runs/none.npz"):
        load_config(None, ["task.name=classify", "data.path=runs/none.npz"])
