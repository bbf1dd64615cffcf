"""checkpoint_hooks: one checkpoint policy for PyTorch Lightning, Keras and PaddlePaddle.

Framework adapters live in `checkpoint_hooks.lightning`, `checkpoint_hooks.keras`
and `checkpoint_hooks.paddle`; importing this package imports none of them.
"""

from checkpoint_hooks._version import __version__
from checkpoint_hooks.policy import CheckpointPolicy, PolicyError, SnapshotPolicy, load_policy

__all__ = ["CheckpointPolicy", "PolicyError", "SnapshotPolicy", "__version__", "load_policy"]
