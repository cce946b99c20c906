"""Feature (hint) distillation, FitNets-style (Romero et al. 2015): the student's last spatial feature
map, through a learned 1x1 convolution (the adapter), is pulled towards the teacher's.

Which map: in both networks, the output of the last layer that still has a spatial map (more than
one position) in the order the forward pass runs them: the features just before global pooling,
found by probing the network once, for any architecture. The teacher must be an edgekd checkpoint
(its PyTorch modules are what can be tapped) and answer for every batch (``kd.cache_views = 0``):
feature maps are too large to cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgekd.checkpoint import load_model
from edgekd.zoo import fit_input
from edgekd.errors import EdgeKDError


def last_spatial_module(model: nn.Module, probe: torch.Tensor) -> tuple[nn.Module, torch.Size]:
    """The module that is the last to *finish* with a 4-D map of more than one position when ``model``
    runs on ``probe`` (the last 4-D map if none has more), and that output's shape. Containers count:
    a ResNet's last block applies its ReLU and adds its shortcut inside ``forward``, so its last leaf
    (the shortcut's batch norm) is not the block's output, while the block (or the stage holding it)
    finishes last with exactly the map global pooling reads."""
    seen: list[tuple[nn.Module, torch.Size]] = []

    def hook(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            seen.append((module, output.shape))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not seen:
        raise EdgeKDError("hint distillation needs a convolutional student and teacher: no layer gives a spatial map")
    spatial = [s for s in seen if s[1][2] * s[1][3] > 1]
    return (spatial or seen)[-1]


class FeatureTap:
    """Keeps the latest output of one module (a forward hook) for the loss to read. With
    ``training_only`` it records only forward passes that train (train mode, gradients on): the
    student's evaluation and batch-norm passes run the same modules and must neither keep a map
    alive nor stand in for a training step's."""

    def __init__(self, module: nn.Module, training_only: bool = False) -> None:
        self.value: torch.Tensor | None = None
        self.training_only = training_only
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module, _inputs, output) -> None:
        if not self.training_only or (module.training and torch.is_grad_enabled()):
            self.value = output

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("the tapped layer did not run in this forward pass")
        return value


@dataclass
class Hint:
    """What a hint-distillation step needs: the teacher's network with its tap, the student's tap and the adapter."""

    teacher: nn.Module
    teacher_tap: FeatureTap
    student_tap: FeatureTap
    adapter: nn.Conv2d
    mean: torch.Tensor  # the teacher's input normalization, (1, C, 1, 1)
    std: torch.Tensor
    channels: int
    size: tuple[int, int]

    @torch.no_grad()
    def teacher_outputs(self, x_unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's logits ``(1, B, K)`` (one teacher, as the KD loss takes them) and its feature map."""
        logits = self.teacher(_teacher_input(x_unit, self.channels, self.size, self.mean, self.std)).float()
        return logits.unsqueeze(0), self.teacher_tap.take().float()


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def _teacher_input(x_unit: torch.Tensor, channels: int, size: tuple[int, int], mean: torch.Tensor,
                   std: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels as the teacher takes them: its channels and size, its normalization."""
    return (fit_input(x_unit, channels, size) - mean) / std


def build_hint(teacher_path: str, student: nn.Module, probe_unit: torch.Tensor, student_input, device) -> Hint:
    """Load the teacher's network, find both feature maps on ``probe_unit`` pixels and make the adapter
    (student channels -> teacher channels). ``student_input`` turns [0, 1] pixels into the student's input."""
    teacher, meta = load_model(Path(teacher_path), device=device)
    teacher.eval().requires_grad_(False)
    channels, size = int(meta["in_channels"]), tuple(meta["input_size"])
    mean = torch.tensor(meta["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], device=device).view(1, -1, 1, 1)
    t_module, t_shape = last_spatial_module(teacher, _teacher_input(probe_unit, channels, size, mean, std))
    s_module, s_shape = last_spatial_module(student, student_input(probe_unit))
    adapter = nn.Conv2d(s_shape[1], t_shape[1], kernel_size=1, bias=False).to(device)
    return Hint(teacher, FeatureTap(t_module), FeatureTap(s_module, training_only=True), adapter, mean, std, channels, size)
