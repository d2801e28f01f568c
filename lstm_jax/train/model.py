"""The trained model: embedding or input projection -> the core LSTM -> a linear readout.

Parameters are a plain dict pytree ``{"embed" | "in_proj": ..., "lstm": LSTMParams, "out": {"w",
"b"}}``. Every core option is reachable from ``model.*``: the fields the schema marks ``core`` and
every entry of ``model.lstm_kwargs`` go by name to whichever of :func:`lstm_jax.init_lstm` and
:func:`lstm_jax.lstm` accepts them.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import lstm_jax
from lstm_jax.train.config import ConfigError, ModelConfig
from lstm_jax.train.tasks import Task

__all__ = ["Model", "make_model", "split_core_kwargs"]

# Arguments the model itself supplies; a config may not set them.
_RESERVED = {"key", "input_size", "hidden_size", "params", "x", "initial_state", "seq_lengths",
             "batch_first"}


# Typed model keys the trainer itself reads (the state's and the readout's sizes): in
# lstm_kwargs they would reach the core without it.
_SIZED_BY_TRAINER = {"num_layers", "bidirectional", "proj_size"}


def split_core_kwargs(cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route ``cfg.core_kwargs()`` to ``(init_lstm kwargs, lstm kwargs)`` by the signatures.

    A name both accept goes to both. String values of ``*dtype`` keys become numpy dtypes, so YAML
    can say ``compute_dtype: bfloat16``.
    """
    init_params = set(inspect.signature(lstm_jax.init_lstm).parameters) - _RESERVED
    call_params = set(inspect.signature(lstm_jax.lstm).parameters) - _RESERVED
    for name in cfg.lstm_kwargs:
        if name in _SIZED_BY_TRAINER:
            raise ConfigError(f"model.lstm_kwargs.{name}: the trainer sizes the model from "
                              f"model.{name}; set that instead")
    init_kw, call_kw = {}, {}
    for name, value in cfg.core_kwargs().items():
        where = f"model.{name}" if name in ModelConfig.__dataclass_fields__ else \
            f"model.lstm_kwargs.{name}"
        if name in _RESERVED:
            raise ConfigError(f"{where}: set by the trainer, not by the config")
        if name.endswith("dtype") and isinstance(value, str):
            try:
                value = jnp.dtype(value)
            except TypeError:
                raise ConfigError(f"{where}: unknown dtype {value!r}") from None
        if name not in init_params and name not in call_params:
            match = difflib.get_close_matches(name, sorted(init_params | call_params), n=1)
            hint = f" (did you mean '{match[0]}'?)" if match else ""
            raise ConfigError(f"{where}: not an option of lstm_jax.init_lstm or lstm_jax.lstm"
                              f"{hint}")
        if name in init_params:
            init_kw[name] = value
        if name in call_params:
            call_kw[name] = value
    return init_kw, call_kw


def _dense(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    """``x @ w + b`` over the last axis, broadcasting spelled out (rank promotion may be strict)."""
    return x @ p["w"] + p["b"].reshape((1,) * (x.ndim - 1) + p["b"].shape)


class Model(NamedTuple):
    """``init(key) -> params`` and ``apply(params, x, ...) -> (out, state)``, closed over config."""

    init: Any
    apply: Any
    zero_state: Any
    num_directions: int


def make_model(cfg: ModelConfig, task: Task) -> Model:
    """Build the model for ``task`` from ``model.*``.

    ``apply(params, x, initial_state=None, *, seq_lengths=None, key=None)``:
      x: ``(B, T)`` int tokens or ``(B, T, F)`` floats.
      initial_state: ``LSTMState`` with ``h: (L*D, B, H_out)``, ``c: (L*D, B, H)`` or None.
      seq_lengths: ``(B,)`` valid lengths or None.
      key: a PRNG key to turn dropout on (training), or None (evaluation).
    Returns ``out`` and the final ``LSTMState``: ``out: (B, T, output_size)`` for a per-step
    readout, ``(B, output_size)`` for a final-state readout (each sequence's last valid step; with
    two directions, the forward state there and the reverse state after reading back to step 0).
    """
    init_kw, call_kw = split_core_kwargs(cfg)
    num_dirs = 2 if cfg.bidirectional else 1
    h_out = cfg.proj_size or cfg.hidden_size
    tokens = task.vocab_size is not None
    if tokens:
        lstm_in = cfg.embed_dim or task.vocab_size
    else:
        lstm_in = cfg.embed_dim or task.input_features
    feat = num_dirs * h_out
    dropout_in, dropout_out = cfg.embed_dropout, cfg.output_dropout

    def init(key: jax.Array) -> dict[str, Any]:
        k_emb, k_lstm, k_out = jax.random.split(key, 3)
        params: dict[str, Any] = {}
        if tokens and cfg.embed_dim:
            params["embed"] = jax.random.normal(k_emb, (task.vocab_size, cfg.embed_dim))
        elif not tokens and cfg.embed_dim:
            bound = 1.0 / task.input_features ** 0.5
            params["in_proj"] = {
                "w": jax.random.uniform(k_emb, (task.input_features, cfg.embed_dim),
                                        minval=-bound, maxval=bound),
                "b": jnp.zeros((cfg.embed_dim,))}
        params["lstm"] = lstm_jax.init_lstm(k_lstm, lstm_in, cfg.hidden_size, **init_kw)
        bound = 1.0 / feat ** 0.5  # torch.nn.Linear's fan-in scale
        params["out"] = {"w": jax.random.uniform(k_out, (feat, task.output_size),
                                                 minval=-bound, maxval=bound),
                         "b": jnp.zeros((task.output_size,))}
        return params

    def dropout(key, rate, x):
        if key is None or rate == 0.0:
            return x
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)

    def apply(params, x, initial_state=None, *, seq_lengths=None, key=None):
        k_in, k_lstm, k_out = jax.random.split(key, 3) if key is not None else (None,) * 3
        if tokens:
            if "embed" in params:
                x = params["embed"][x]
            else:
                x = jax.nn.one_hot(x, task.vocab_size, dtype=jnp.float32)
        elif "in_proj" in params:
            x = _dense(x, params["in_proj"])
        x = dropout(k_in, dropout_in, x)
        y, state = lstm_jax.lstm(params["lstm"], x, initial_state, seq_lengths=seq_lengths,
                                 key=k_lstm, **call_kw)
        if task.readout == "final":
            last = state.h[-num_dirs:]  # (D, B, H_out): the top layer's final h per direction
            feats = jnp.concatenate(list(last), axis=-1)  # (B, D*H_out)
        else:
            feats = y  # (B, T, D*H_out)
        feats = dropout(k_out, dropout_out, feats)
        out = _dense(feats, params["out"])
        return out, state

    def zero_state(batch_size: int) -> lstm_jax.LSTMState:
        n = cfg.num_layers * num_dirs
        return lstm_jax.LSTMState(h=jnp.zeros((n, batch_size, h_out)),
                                  c=jnp.zeros((n, batch_size, cfg.hidden_size)))

    return Model(init=init, apply=apply, zero_state=zero_state, num_directions=num_dirs)
