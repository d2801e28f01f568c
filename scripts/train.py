#!/usr/bin/env python
"""Same as ``lstm-jax train``: ``python scripts/train.py [CONFIG.yaml] [key=value ...] [--workdir]``."""

import sys

from lstm_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
