"""A run's directory and checkpoints: the on-disk schema, save, load (with resharding onto
another layout) and consolidation into one portable file."""

from smoe.launcher.checkpoints.load import DamagedCheckpoint, load, loadable_tag
from smoe.launcher.checkpoints.save import CheckpointWriteError, save
from smoe.launcher.checkpoints.schema import latest_tag

__all__ = ["CheckpointWriteError", "DamagedCheckpoint", "latest_tag", "load", "loadable_tag", "save"]
