"""The old import path of the detection DataModule, kept because saved run configs and checkpoints name it."""
from grounding.data.detection import CocoDetectionDataModule  # noqa: F401
