"""Sampling text from a trained character language model."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lstm_jax.train.config import ConfigError
from lstm_jax.train.loop import restore_run

__all__ = ["sample_run", "sample_text"]


def sample_text(model, params, vocab: str, prompt: str, length: int, *, temperature: float = 1.0,
                seed: int = 0) -> str:
    """Continue ``prompt`` by ``length`` characters drawn one at a time.

    The prompt is read in one call of the LSTM; then a ``lax.scan`` feeds each drawn character
    back. ``temperature`` divides the logits (lower: more conservative); 0 takes the most likely
    character every time.
    """
    lookup = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted({ch for ch in prompt if ch not in lookup})
    if unknown:
        raise ConfigError(f"--prompt: character(s) {''.join(unknown)!r} never occur in the "
                          f"training text")
    if not prompt:
        raise ConfigError("--prompt: must not be empty")
    ids = jnp.asarray([[lookup[ch] for ch in prompt]], jnp.int32)  # (1, P)

    @jax.jit
    def generate(params, ids, key):
        logits, state = model.apply(params, ids)  # (1, P, V)
        last = logits[:, -1]

        def draw(carry, k):
            logits, state = carry
            if temperature > 0:
                nxt = jax.random.categorical(k, logits / temperature, axis=-1)
            else:
                nxt = jnp.argmax(logits, axis=-1)
            out, state = model.apply(params, nxt[:, None].astype(jnp.int32), state)
            return (out[:, -1], state), nxt[0]

        _, drawn = jax.lax.scan(draw, (last, state), jax.random.split(key, length))
        return drawn

    drawn = np.asarray(generate(params, ids, jax.random.PRNGKey(seed)))
    return prompt + "".join(vocab[i] for i in drawn)


def sample_run(workdir: str | Path, prompt: str, length: int, *, temperature: float = 1.0,
               seed: int = 0) -> str:
    """Text from the newest checkpoint of a charlm run dir."""
    if length < 1:
        raise ConfigError(f"--length: must be >= 1, got {length}")
    if not (0 <= temperature < float("inf")):  # also rejects nan
        raise ConfigError(f"--temperature: must be a finite number >= 0, got {temperature}")
    cfg, trainer, state, _ = restore_run(workdir)
    if cfg.task.name != "charlm":
        raise ConfigError(f"{workdir}: sample needs a charlm run, this one is {cfg.task.name}")
    return sample_text(trainer.model, state.params, trainer.task.vocab, prompt, length,
                       temperature=temperature, seed=seed)
