"""edgekd: distill, export, quantize, benchmark and package image classifiers for the edge.

The public API re-exported here is what the CLI calls; Python users can call it directly.
"""

from edgekd.config import DataConfig, DistillConfig, KDConfig, ModelConfig, RecipeConfig
from edgekd.data import ImageData, load_data
from edgekd.distill import TrainResult, train
from edgekd.errors import EdgeKDError
from edgekd.losses import distillation_loss, kd_kl, soft_teacher_log_probs
from edgekd.teachers import load_teacher
from edgekd.zoo import build_model, list_architectures

__all__ = [
    "DataConfig", "DistillConfig", "EdgeKDError", "ImageData", "KDConfig", "ModelConfig", "RecipeConfig",
    "TrainResult", "build_model", "distillation_loss", "kd_kl", "list_architectures", "load_data",
    "load_teacher", "soft_teacher_log_probs", "train",
]
__version__ = "0.1.0"
