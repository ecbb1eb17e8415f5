"""Multi-task learning: task specs, SynthFaces, UTKFace / CSV loaders, HydraNet, loss weighting, metrics."""
from .tasks import LabelDict, TaskSpec

__all__ = ["LabelDict", "TaskSpec"]
