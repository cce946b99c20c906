"""edgekd: distill, export, quantize, benchmark and package image classifiers for the edge.

The public API re-exported here is what the CLI calls; Python users can call it directly. The
six verbs follow the data: ``distill -> export -> quantize -> bench -> package``, and ``run``
does all of them from one config. Each verb's docstring has an example that the tests run.

Note that ``edgekd.distill`` (and ``export``, ``quantize``, ``bench``, ``package``) name the verbs;
their modules stay importable as ``from edgekd.distill import ...`` or ``importlib.import_module``.
"""

from edgekd.config import DataConfig, DistillConfig, KDConfig, ModelConfig, RecipeConfig
from edgekd.data import ImageData, load_data
from edgekd.bench import BenchReport, bench
from edgekd.distill import TrainResult, distill, train
from edgekd.export import ExportResult, export
from edgekd.package import PackageResult, package
from edgekd.pipeline import PipelineConfig, PipelineResult, run
from edgekd.quantize import QuantizeResult, quantize
from edgekd.errors import EdgeKDError
from edgekd.losses import distillation_loss, kd_kl, soft_teacher_log_probs
from edgekd.teachers import load_teacher
from edgekd.version import __version__
from edgekd.zoo import build_model, list_architectures

__all__ = [
    "distill", "export", "quantize", "bench", "package", "run",
    "BenchReport", "DataConfig", "DistillConfig", "EdgeKDError", "ExportResult", "ImageData", "KDConfig",
    "ModelConfig", "PackageResult", "PipelineConfig", "PipelineResult", "QuantizeResult", "RecipeConfig",
    "TrainResult", "build_model", "distillation_loss", "kd_kl", "list_architectures", "load_data",
    "load_teacher", "soft_teacher_log_probs", "train",
]
