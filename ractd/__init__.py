"""ractd: Reward-Aware Consistency Trajectory Distillation for offline RL.

The library imports torch, numpy, gymnasium and h5py, never Ray (Ray lives in tune/, eval/ and
ractd/distributed.py).
"""

__version__ = "0.1.0"


class RactdError(Exception):
    """A user-facing error: its message is one line naming the problem; CLIs print it and exit 2."""
