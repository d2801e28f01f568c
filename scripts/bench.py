"""Benchmark lstm_jax against torch.nn.LSTM, Flax and jax.experimental.rnn: see lstm_jax/bench.py.

    PYTHONPATH=. python scripts/bench.py --help
"""

import sys

from lstm_jax.bench import main

if __name__ == "__main__":
    sys.exit(main())
