"""Sequence tasks: data, loss and metrics, chosen by ``task.name``.

Every task makes its training batch as a pure, jittable function of the step number, so the data
order is fixed by the seed alone: a run resumed from a checkpoint at step ``s`` sees exactly the
batches an uninterrupted run sees. Evaluation data is fixed once, from the seed.

A batch is a dict of arrays:

- ``x``: ``(B, T)`` int32 tokens or ``(B, T, F)`` float32 features
- ``y``: targets; ``(B,)`` for one answer per sequence, ``(B, T)`` for one per step
- ``weight``: ``(B,)`` float32, 0 for padding rows of the last evaluation batch
- ``lengths``: ``(B,)`` int32 valid lengths (classify only)
- ``reset``: ``()`` bool, zero the carried state first (charlm only)

The batch-making functions take ``batch_size`` as the global batch and return plain arrays; a data-
parallel trainer can shard them over a mesh axis afterwards without the tasks knowing.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax.train.config import Config, ConfigError

__all__ = ["AddingTask", "CharLMTask", "ClassifyTask", "CopyTask", "Task", "make_task"]

Batch = dict[str, Any]


def _weighted_mean(values: jax.Array, weight: jax.Array) -> jax.Array:
    """Mean of per-row ``values: (B,)`` over rows with ``weight: (B,)`` > 0."""
    return jnp.sum(values * weight) / jnp.maximum(jnp.sum(weight), 1.0)


class Task:
    """What every task provides to the model and the loop.

    Attributes:
      name: the ``task.name``.
      vocab_size: number of input tokens, or None for float features.
      input_features: feature size F for float inputs (None for tokens).
      output_size: width of the readout.
      readout: ``"final"`` (one output per sequence from the final state) or ``"sequence"`` (one
        per step from the LSTM outputs).
      stateful: the hidden state carries from one training batch to the next (truncated BPTT).
      metrics: metric names, the first being the one to watch; ``loss`` is always among them or
        is the training objective itself.
      chance: what a model that ignores its input scores on each metric.
      chance_note: how the chance baseline is defined.
    """

    name: str
    vocab_size: int | None = None
    input_features: int | None = None
    output_size: int
    readout: str
    stateful: bool = False
    metrics: tuple[str, ...]
    chance: dict[str, float]
    chance_note: str = ""

    def train_batch(self, step: jax.Array, batch_size: int) -> Batch:
        """The training batch of ``step`` (a traced int32 scalar is fine)."""
        raise NotImplementedError

    def eval_batches(self, batch_size: int) -> list[Batch]:
        """The fixed evaluation set, in batches of ``batch_size`` (the last padded, weight 0)."""
        raise NotImplementedError

    def loss(self, out: jax.Array, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(objective, metrics)``: metrics are means over the batch's weighted rows."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """What the run dir records about the task (``task.json``)."""
        return {"name": self.name, "metrics": list(self.metrics), "chance": self.chance,
                "chance_note": self.chance_note}


def _pad_batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[Batch]:
    """Cut arrays with a common leading dim N into batches; pad the last with weight-0 rows."""
    n = len(next(iter(arrays.values())))
    out = []
    for start in range(0, n, batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in arrays.items()}
        rows = len(chunk["y"])
        weight = np.ones((batch_size,), np.float32)
        if rows < batch_size:
            weight[rows:] = 0.0
            chunk = {k: np.concatenate([v, np.repeat(v[:1], batch_size - rows, axis=0)])
                     for k, v in chunk.items()}
        chunk["weight"] = weight
        out.append({k: jnp.asarray(v) for k, v in chunk.items()})
    return out


# ----------------------------------------------------------------------------------------------
# Adding problem
# ----------------------------------------------------------------------------------------------

class _SyntheticTask(Task):
    """A task whose examples are drawn from a key: ``_examples(key, n) -> (x, y)``.

    Training batch ``step`` is drawn from ``fold_in(train_key, step)``, so the data of a step
    never depends on what ran before it (exact resume); the test set is one fixed draw.
    """

    def train_batch(self, step, batch_size):
        x, y = self._examples(jax.random.fold_in(self._train_key, step), batch_size)
        return {"x": x, "y": y, "weight": jnp.ones((batch_size,), jnp.float32)}

    def eval_batches(self, batch_size):
        x, y = jax.jit(self._examples, static_argnums=1)(self._eval_key, self.eval_size)
        return _pad_batches({"x": np.asarray(x), "y": np.asarray(y)}, batch_size)


class AddingTask(_SyntheticTask):
    """The adding problem (Hochreiter & Schmidhuber 1997).

    Each step carries a value in [0, 1) and a marker; exactly two steps are marked, one in each
    half of the sequence, and the target is the sum of their values. Inputs ``x: (B, T, 2)``,
    targets ``y: (B,)``. Predicting 1 (the mean) always scores mse 1/6 = 0.167.
    """

    name = "adding"
    input_features = 2
    output_size = 1
    readout = "final"
    metrics = ("mse",)
    chance_note = "always predicting the mean sum 1.0"

    def __init__(self, cfg: Config):
        self.seq_len = cfg.task.seq_len
        self.eval_size = cfg.task.eval_size
        root = jax.random.PRNGKey(cfg.seed)
        self._train_key = jax.random.fold_in(root, 101)
        self._eval_key = jax.random.fold_in(root, 202)
        self.chance = {"mse": 1.0 / 6.0}

    def _examples(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        t = self.seq_len
        kv, k1, k2 = jax.random.split(key, 3)
        values = jax.random.uniform(kv, (n, t))
        half = t // 2
        first = jax.random.randint(k1, (n,), 0, half)
        second = jax.random.randint(k2, (n,), half, t)
        steps = jnp.arange(t)
        marks = (steps[None, :] == first[:, None]) | (steps[None, :] == second[:, None])
        marks = marks.astype(jnp.float32)
        x = jnp.stack([values, marks], axis=-1)
        y = jnp.sum(values * marks, axis=1)
        return x, y

    def loss(self, out, batch):
        err = (out[:, 0] - batch["y"]) ** 2
        mse = _weighted_mean(err, batch["weight"])
        return mse, {"mse": mse}


# ----------------------------------------------------------------------------------------------
# Copy memory
# ----------------------------------------------------------------------------------------------

class CopyTask(_SyntheticTask):
    """The copy-memory task (Arjovsky, Shah & Bengio 2016).

    Input tokens: ``copy_length`` symbols from 1..K, ``delay - 1`` blanks (0), a recall marker
    (K + 1), then ``copy_length`` blanks; total ``T = delay + 2 * copy_length``. The model must
    output the symbols, in order, during the last ``copy_length`` steps. Loss and accuracy are
    taken on those recalled symbols only (predicting blanks elsewhere is trivial); chance is
    ``log K`` nats and accuracy ``1 / K``. ``y: (B, copy_length)`` holds symbol indices 0..K-1.
    """

    name = "copy"
    readout = "sequence"
    metrics = ("accuracy", "loss")
    chance_note = "uniform guess over the symbols"

    def __init__(self, cfg: Config):
        self.k = cfg.task.num_symbols
        self.n = cfg.task.copy_length
        self.delay = cfg.task.delay
        self.seq_len = self.delay + 2 * self.n
        self.vocab_size = self.k + 2
        self.output_size = self.k
        self.eval_size = cfg.task.eval_size
        root = jax.random.PRNGKey(cfg.seed)
        self._train_key = jax.random.fold_in(root, 101)
        self._eval_key = jax.random.fold_in(root, 202)
        self.chance = {"accuracy": 1.0 / self.k, "loss": math.log(self.k)}

    def _examples(self, key: jax.Array, n_examples: int) -> tuple[jax.Array, jax.Array]:
        symbols = jax.random.randint(key, (n_examples, self.n), 0, self.k)
        blanks = jnp.zeros((n_examples, self.delay - 1), jnp.int32)
        marker = jnp.full((n_examples, 1), self.k + 1, jnp.int32)
        tail = jnp.zeros((n_examples, self.n), jnp.int32)
        x = jnp.concatenate([symbols + 1, blanks, marker, tail], axis=1)
        return x, symbols

    def loss(self, out, batch):
        logits = out[:, -self.n:, :].astype(jnp.float32)  # (B, n, K): the recall window
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, batch["y"][..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
        loss = _weighted_mean(nll.mean(1), batch["weight"])
        acc = _weighted_mean(correct.mean(1), batch["weight"])
        return loss, {"loss": loss, "accuracy": acc}


# ----------------------------------------------------------------------------------------------
# Character language model
# ----------------------------------------------------------------------------------------------

def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"data.path: {path!r} is not UTF-8 text ({e.reason} at byte "
                          f"{e.start})") from None
    except OSError as e:
        raise ConfigError(f"data.path: cannot read {path!r}: {e.strerror or e}") from None


class CharLMTask(Task):
    """A character language model trained by truncated BPTT over a stream (Zaremba et al. 2014).

    The training text is cut into ``B`` equal rows, read side by side in windows of
    ``T = task.seq_len`` characters: window ``w`` of epoch ``e`` is
    ``rows[:, o_e + w*T : o_e + (w+1)*T]`` (targets shifted by one), so consecutive batches
    continue each row and the loop carries the LSTM state across them with gradients stopped.
    Each epoch starts at a random offset ``0 <= o_e < T`` (so the window boundaries move) and
    with a zero state. Everything is a function of the step: ``e, w = divmod(step, windows)``.

    The validation text (the last ``data.val_fraction`` of the file) is read the same way, once,
    from a zero state. Metrics: ``loss`` in nats per character and ``bpc = loss / ln 2``; chance is
    the unigram model of the training text scored on the validation text.
    """

    name = "charlm"
    readout = "sequence"
    stateful = True
    metrics = ("loss", "bpc")
    chance_note = "unigram character frequencies of the training text"

    def __init__(self, cfg: Config, text: str | None = None):
        if text is None:
            text = read_text(cfg.data.path)
        self.seq_len = cfg.task.seq_len
        self.batch_size = cfg.train.batch_size
        chars = sorted(set(text))
        if len(chars) < 2:
            raise ConfigError(f"data.path: {cfg.data.path!r} has fewer than 2 distinct characters")
        self.vocab = "".join(chars)
        self.vocab_size = self.output_size = len(chars)
        lookup = {ch: i for i, ch in enumerate(chars)}
        ids = np.fromiter((lookup[ch] for ch in text), dtype=np.int32, count=len(text))
        n_val = int(len(ids) * cfg.data.val_fraction)
        train_ids, val_ids = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
        b, t = self.batch_size, self.seq_len
        self.row_len = len(train_ids) // b
        # One window of slack for the per-epoch offset and one character for the last target.
        self.windows = self.row_len // t - 1
        if self.windows < 1:
            raise ConfigError(f"data.path: {len(train_ids)} training characters are too few for "
                              f"train.batch_size={b} rows of task.seq_len={t} (need at least "
                              f"{2 * b * t})")
        self.val_row_len = len(val_ids) // b
        self.val_windows = (self.val_row_len - 1) // t
        if self.val_windows < 1:
            raise ConfigError(f"data.val_fraction: {len(val_ids)} validation characters are too "
                              f"few for {b} rows of {t + 1}")
        self._train_rows = jnp.asarray(train_ids[: b * self.row_len].reshape(b, self.row_len))
        self._val_rows = val_ids[: b * self.val_row_len].reshape(b, self.val_row_len)
        self._offset_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 303)
        counts = np.bincount(train_ids, minlength=len(chars)).astype(np.float64) + 1.0
        logp = np.log(counts / counts.sum())
        unigram = float(-logp[val_ids].mean()) if len(val_ids) else float("nan")
        self.chance = {"loss": unigram, "bpc": unigram / math.log(2)}

    def position(self, step: int) -> dict[str, int]:
        """Where the stream is at ``step``: epoch, window and character offset (for the record)."""
        epoch, window = divmod(int(step), self.windows)
        return {"epoch": epoch, "window": window, "chars_seen": int(step) * self.batch_size
                * self.seq_len}

    def train_batch(self, step, batch_size):
        if batch_size != self.batch_size:
            raise ValueError("charlm rows are cut for train.batch_size; build a new task")
        t = self.seq_len
        epoch, window = jnp.divmod(step, self.windows)
        offset = jax.random.randint(jax.random.fold_in(self._offset_key, epoch), (), 0, t)
        start = offset + window * t
        chunk = jax.lax.dynamic_slice_in_dim(self._train_rows, start, t + 1, axis=1)
        return {"x": chunk[:, :t], "y": chunk[:, 1:], "reset": window == 0,
                "weight": jnp.ones((batch_size,), jnp.float32)}

    def eval_batches(self, batch_size):
        t = self.seq_len
        out = []
        for w in range(self.val_windows):
            chunk = self._val_rows[:, w * t: w * t + t + 1]
            out.append({"x": jnp.asarray(chunk[:, :t]), "y": jnp.asarray(chunk[:, 1:]),
                        "reset": jnp.asarray(w == 0),
                        "weight": jnp.ones((self.batch_size,), jnp.float32)})
        return out

    def loss(self, out, batch):
        logp = jax.nn.log_softmax(out.astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, batch["y"][..., None], axis=-1)[..., 0]  # (B, T)
        loss = _weighted_mean(nll.mean(1), batch["weight"])
        return loss, {"loss": loss, "bpc": loss / math.log(2)}

    def encode(self, text: str) -> np.ndarray:
        lookup = {ch: i for i, ch in enumerate(self.vocab)}
        return np.array([lookup[ch] for ch in text], np.int32)

    def info(self):
        return {**super().info(), "vocab": self.vocab, "train_windows": self.windows,
                "val_chars": self.batch_size * self.val_windows * self.seq_len}


# ----------------------------------------------------------------------------------------------
# Sequence classification from an .npz
# ----------------------------------------------------------------------------------------------

class ClassifyTask(Task):
    """Sequence classification from an ``.npz`` with ``x_train``, ``y_train``, ``x_test``,
    ``y_test`` and optional ``len_train``, ``len_test``.

    ``x`` is ``(N, T)`` integer tokens or ``(N, T, F)`` float features; ``y`` is ``(N,)`` class ids
    0..C-1; lengths in 1..T mark padded variable-length sequences (the model reads each
    sequence's last valid step). Training batches walk a fresh permutation of the training set
    each epoch (dropping the remainder); the test set is evaluated whole. Chance: the majority
    class's accuracy and the cross-entropy of the training class prior on the test set.
    """

    name = "classify"
    readout = "final"
    metrics = ("accuracy", "loss")
    chance_note = "majority class of the training set; class prior's cross-entropy"

    def __init__(self, cfg: Config):
        path = cfg.data.path
        if not zipfile.is_zipfile(path):  # np.load would call any other file pickled data
            raise ConfigError(f"data.path: {path!r} is not an .npz archive (np.savez writes one "
                              f"with x_train, y_train, x_test, y_test)")
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:
            raise ConfigError(f"data.path: cannot read {path!r} as .npz: {e}") from None
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
        if missing:
            raise ConfigError(f"data.path: {path!r} lacks array(s) {', '.join(missing)} "
                              f"(has {', '.join(sorted(arrays)) or 'none'})")
        xs, ys, ls = {}, {}, {}
        for split in ("train", "test"):
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
            if x.ndim not in (2, 3) or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
                raise ConfigError(f"data.path: x_{split} must be (N, T) or (N, T, F) and "
                                  f"y_{split} (N,), got {x.shape} and {y.shape}")
            if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
                raise ConfigError(f"data.path: y_{split} must hold class ids >= 0")
            lengths = arrays.get(f"len_{split}")
            if lengths is None:
                lengths = np.full((len(x),), x.shape[1], np.int32)
            if (lengths.shape != (len(x),) or not np.issubdtype(lengths.dtype, np.integer)
                    or lengths.min() < 1 or lengths.max() > x.shape[1]):
                raise ConfigError(f"data.path: len_{split} must be (N,) integers in 1..T")
            xs[split], ys[split], ls[split] = x, y.astype(np.int32), lengths.astype(np.int32)
        if xs["train"].shape[1:] != xs["test"].shape[1:]:
            raise ConfigError(f"data.path: x_train {xs['train'].shape} and x_test "
                              f"{xs['test'].shape} differ past the first axis")
        self.tokens = xs["train"].ndim == 2
        if self.tokens:
            if not all(np.issubdtype(x.dtype, np.integer) for x in xs.values()):
                raise ConfigError("data.path: 2-D x must hold integer tokens (use (N, T, 1) "
                                  "for one float feature)")
            if min(x.min() for x in xs.values()) < 0:
                raise ConfigError("data.path: tokens must be >= 0")
            self.vocab_size = int(max(x.max() for x in xs.values())) + 1
            xs = {k: v.astype(np.int32) for k, v in xs.items()}
        else:
            self.input_features = int(xs["train"].shape[2])
            xs = {k: v.astype(np.float32) for k, v in xs.items()}
        self.num_classes = self.output_size = int(max(ys["train"].max(), ys["test"].max())) + 1
        self.n_train = len(ys["train"])
        self.batch_size = cfg.train.batch_size
        if self.n_train < self.batch_size:
            raise ConfigError(f"train.batch_size: {self.batch_size} is more than the "
                              f"{self.n_train} training examples")
        self.steps_per_epoch = self.n_train // self.batch_size
        self._train = {"x": jnp.asarray(xs["train"]), "y": jnp.asarray(ys["train"]),
                       "lengths": jnp.asarray(ls["train"])}
        self._test = {"x": xs["test"], "y": ys["test"], "lengths": ls["test"]}
        self._perm_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 404)
        prior = np.bincount(ys["train"], minlength=self.num_classes).astype(np.float64)
        prior /= prior.sum()
        majority = int(prior.argmax())
        self.chance = {
            "accuracy": float(np.mean(ys["test"] == majority)),
            "loss": float(-np.log(np.maximum(prior[ys["test"]], 1e-12)).mean()),
        }

    def train_batch(self, step, batch_size):
        epoch, i = jnp.divmod(step, self.steps_per_epoch)
        perm = jax.random.permutation(jax.random.fold_in(self._perm_key, epoch), self.n_train)
        idx = jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)
        batch = {k: v[idx] for k, v in self._train.items()}
        batch["weight"] = jnp.ones((batch_size,), jnp.float32)
        return batch

    def eval_batches(self, batch_size):
        return _pad_batches(self._test, batch_size)

    def loss(self, out, batch):
        logp = jax.nn.log_softmax(out.astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, batch["y"][:, None], axis=-1)[:, 0]
        correct = (jnp.argmax(out, -1) == batch["y"]).astype(jnp.float32)
        loss = _weighted_mean(nll, batch["weight"])
        return loss, {"loss": loss, "accuracy": _weighted_mean(correct, batch["weight"])}

    def info(self):
        return {**super().info(), "num_classes": self.num_classes, "n_train": self.n_train,
                "n_test": len(self._test["y"])}


_TASKS = {"adding": AddingTask, "copy": CopyTask, "charlm": CharLMTask,
          "classify": ClassifyTask}


def make_task(cfg: Config) -> Task:
    """The task named by ``cfg.task.name``, with its data loaded and checked."""
    return _TASKS[cfg.task.name](cfg)
