"""ractd: Reward-Aware Consistency Trajectory Distillation for offline RL.

The library imports torch, numpy, gymnasium and h5py, never Ray: the Ray glue (distributed
training, hyperparameter search, the evaluation pool) is the separate package ractd_ray/, with thin
command-line scripts over it in tune/ and eval/.
"""

__version__ = "0.1.0"


class RactdError(Exception):
    """A user-facing error: its message is one line naming the problem; CLIs print it and exit 2."""
