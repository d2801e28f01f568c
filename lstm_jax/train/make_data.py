"""Write a small demo dataset for the classify task.

    python -m lstm_jax.train.make_data runs/majority.npz

The task: variable-length sequences of tokens 1..4 (0 pads the end); the label is the token that
occurs most often (sequences with a tie are redrawn). A model has to count over the whole
sequence and read it at each sequence's own last step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

__all__ = ["main", "majority_dataset"]


def majority_dataset(n: int, *, max_len: int = 40, min_len: int = 8, symbols: int = 4,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``x: (n, max_len)`` int32 (0-padded), ``y: (n,)`` the most frequent token - 1,
    ``lengths: (n,)``."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, max_len), np.int32)
    y = np.zeros((n,), np.int32)
    lengths = np.zeros((n,), np.int32)
    i = 0
    while i < n:
        length = int(rng.integers(min_len, max_len + 1))
        tokens = rng.integers(1, symbols + 1, size=length)
        counts = np.bincount(tokens, minlength=symbols + 1)[1:]
        if (counts == counts.max()).sum() > 1:
            continue  # a tie has no single answer
        x[i, :length] = tokens
        y[i] = int(counts.argmax())
        lengths[i] = length
        i += 1
    return x, y, lengths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the .npz to write")
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    x_tr, y_tr, l_tr = majority_dataset(args.train, seed=args.seed)
    x_te, y_te, l_te = majority_dataset(args.test, seed=args.seed + 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, x_train=x_tr, y_train=y_tr, len_train=l_tr, x_test=x_te, y_test=y_te,
             len_test=l_te)
    print(f"wrote {out}: {args.train} train, {args.test} test sequences")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
