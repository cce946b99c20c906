"""Quantization-aware fine-tuning (QAT), taught by a teacher: float weights that survive int8.

Post-training int8 rounds every weight to a per-channel grid and every activation to a per-tensor
one, and some networks lose points to it. QAT fine-tunes the float weights for a few epochs while
the forward pass sees that rounding (fake quantization, straight-through gradients), so the
weights settle where rounding costs little. The loss is edgekd's distillation loss: the labels plus
the soft targets of a teacher (the run's own teacher when its file is at hand, else the float model
itself), at a low learning rate; the epoch kept is chosen on the validation split.

What is simulated is what the int8 converters do to the exported graph (``edgekd.quantize``):

- weights: symmetric int8 per output channel, range [-127, 127] ([-64, 64] for onnxruntime's
  reduced range, ``--target x86``). The converter quantizes the weight after batch norm is folded
  into it (``w * gamma / sigma``), a per-output-channel factor: a symmetric per-channel grid scales
  with it, so a weight on the grid stays on the grid and batch norm needs no simulation (it is
  frozen all the same: the statistics the file will carry are the ones QAT saw). What does move the
  grid is a per-*input*-channel factor: export folds the input normalization (``1 / std`` per colour
  channel) into the first convolution, so that layer is rounded with it applied.
- activations: the input of every convolution and linear layer, asymmetric 8-bit per tensor, its
  range a running min/max of the training batches (the converters calibrate min/max too).

The result is an ordinary checkpoint of the same architecture whose weights lie on the int8 grid
as the converter will see them (exactly for RGB models; a grayscale model's first layer becomes
three luma-weighted copies in the file, which no single grid fits). ``edgekd.quantize`` converts it like any other file (its calibration measures the activation
ranges again), so the int8 files, their proofs and the accuracy gate are the same code.

We write the fake quantization ourselves, on PyTorch's ``fake_quantize_*`` operators and
``torch.nn.utils.parametrize``: torch.ao's QAT flow swaps in its own quantized modules, which the
ONNX -> TFLite path does not take, and it is deprecated in favour of torchao.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from edgekd.data import ImageData, apply_augment, augment_params, to_unit
from edgekd.errors import EdgeKDError
from edgekd.distill import InputSpec, accuracy, predict_logits
from edgekd.losses import distillation_loss
from edgekd.native import retained_heap

WEIGHT_QMAX = 127  # symmetric int8 weights: [-127, 127], as onnxruntime and TFLite quantize them
ACT_LEVELS = 255  # 8-bit activations, asymmetric
ACT_MOMENTUM = 0.01  # running min/max: how fast the activation range follows the batches


@dataclass(frozen=True)
class QATSettings:
    epochs: int
    lr: float = 1e-4  # Adam, cosine to zero: a fine-tune, not a retrain
    batch_size: int = 128
    alpha: float = 0.5  # weight of the label cross-entropy; the rest is the teacher's KL term
    temperature: float = 2.0
    augment_pad: int = 4
    augment_flip: bool = True
    seed: int = 0
    # False: the same fine-tune without fake quantization, the control a QAT gain is measured against
    # (extra epochs with a teacher can lift a model whether or not it sees the int8 rounding)
    fake_quant: bool = True
    weight_qmax: int = WEIGHT_QMAX
    # 1 / std per input channel when export folds the normalization into the first convolution
    first_conv_in_scale: tuple[float, ...] | None = None


@dataclass(frozen=True)
class QATReport:
    epochs: int
    best_epoch: int  # 0: the fake-quantized model before any fine-tuning was best on validation
    val_acc_before: float  # fake-quantized, before fine-tuning
    val_acc_after: float  # fake-quantized, the epoch kept
    teacher: str
    weight_range: int  # symmetric weights in [-weight_range, weight_range]
    seconds: float
    history: tuple[dict, ...]

    def to_dict(self) -> dict:
        return {**self.__dict__, "history": list(self.history)}


class FakeQuantWeight(nn.Module):
    """Parametrization: the weight rounded as the int8 converter will store it, symmetric per output channel,
    after an optional per-input-channel factor (the folded input normalization) that is divided out again."""

    def __init__(self, qmax: int, in_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.qmax = qmax
        self.register_buffer("in_scale", in_scale if in_scale is not None else torch.ones(0))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scaled = w * self.in_scale.view(1, -1, *([1] * (w.dim() - 2))) if self.in_scale.numel() else w
        scale = (scaled.detach().abs().amax(dim=tuple(range(1, w.dim()))) / self.qmax).clamp_min(1e-12)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        q = torch.fake_quantize_per_channel_affine(scaled, scale.float(), zero, 0, -self.qmax, self.qmax)
        return q / self.in_scale.view(1, -1, *([1] * (w.dim() - 2))) if self.in_scale.numel() else q


class ActivationFakeQuant:
    """Forward pre-hook: the layer's input rounded to 8 bits over a running min/max (which includes 0)."""

    def __init__(self) -> None:
        self.low: float | None = None
        self.high: float | None = None

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if module.training:
            low, high = min(float(x.detach().min()), 0.0), max(float(x.detach().max()), 0.0)
            if self.low is None:
                self.low, self.high = low, high
            else:
                self.low += ACT_MOMENTUM * (low - self.low)
                self.high += ACT_MOMENTUM * (high - self.high)
        if self.low is None or self.high - self.low <= 0:
            return args
        scale = (self.high - self.low) / ACT_LEVELS
        zero = int(round(-self.low / scale))
        return (torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, ACT_LEVELS), *args[1:])


def prepare(model: nn.Module, weight_qmax: int = WEIGHT_QMAX,
            first_conv_in_scale: tuple[float, ...] | None = None) -> tuple[nn.Module, list]:
    """A copy of ``model`` with fake-quantized weights and layer inputs, and its hook handles.

    ``first_conv_in_scale`` applies to the first convolution taking that many channels (the one
    ``edgekd.deployable`` folds the input normalization into)."""
    model = copy.deepcopy(model)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    handles = []
    for m in list(model.modules()):
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        in_scale = None
        if m is first and first_conv_in_scale is not None and m.groups == 1 and m.in_channels == len(first_conv_in_scale):
            in_scale = torch.tensor(first_conv_in_scale, dtype=m.weight.dtype)
        parametrize.register_parametrization(m, "weight", FakeQuantWeight(weight_qmax, in_scale))
        handles.append(m.register_forward_pre_hook(ActivationFakeQuant()))
    return model, handles


def _freeze_batch_norm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            m.requires_grad_(False)


def bake(model: nn.Module, handles: list) -> nn.Module:
    """The fine-tuned model with its weights on the int8 grid and no fake-quantization left."""
    for h in handles:
        h.remove()
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model.eval()


@retained_heap()  # no page faults on every step's large tensors (see native.retained_heap)
def finetune(model: nn.Module, meta: dict, data: ImageData, teacher: Callable[[torch.Tensor], torch.Tensor],
             teacher_name: str, settings: QATSettings,
             on_step: Callable[[str, int, int, dict], None] | None = None) -> tuple[nn.Module, QATReport]:
    """QAT-fine-tune ``model`` (a float edgekd model, CPU) on ``data``'s training split.

    ``teacher`` maps [0, 1] images ``(B, C, H, W)`` to logits. Returns the baked model (same
    architecture, weights on the int8 grid once batch norm is folded) and what happened.
    """
    if settings.epochs < 1:
        raise EdgeKDError("--qat needs at least 1 epoch")
    t0 = time.perf_counter()
    model_input = InputSpec(int(meta["in_channels"]), tuple(meta["input_size"]), tuple(meta["mean"]), tuple(meta["std"]))
    if settings.fake_quant:
        qmodel, handles = prepare(model.cpu().eval(), settings.weight_qmax, settings.first_conv_in_scale)
    else:
        qmodel, handles = copy.deepcopy(model).cpu().eval(), []
    has_val = len(data.val_y) > 0  # without a validation split the last epoch is kept
    gen = torch.Generator().manual_seed(settings.seed)
    _observe(qmodel, data, model_input, settings.batch_size)  # activation ranges before the first step
    before = _val_acc(qmodel, data, model_input)
    params = [p for p in qmodel.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    steps = settings.epochs * math.ceil(len(data.train_y) / settings.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    best_state, best_acc, best_epoch = copy.deepcopy(qmodel.state_dict()), before, 0
    history = []
    for epoch in range(1, settings.epochs + 1):
        loss = _epoch(qmodel, data, model_input, teacher, optimizer, scheduler, settings, gen)
        acc = _val_acc(qmodel, data, model_input)
        history.append({"epoch": epoch, "loss": loss, "val_acc": acc})
        if on_step:
            on_step("qat_epoch", epoch, settings.epochs, {"loss": loss, "val_acc": acc})
        if acc > best_acc or not has_val:
            best_state, best_acc, best_epoch = copy.deepcopy(qmodel.state_dict()), acc, epoch
    qmodel.load_state_dict(best_state)
    baked = bake(qmodel, handles)
    report = QATReport(settings.epochs, best_epoch, before, best_acc, teacher_name, settings.weight_qmax,
                       round(time.perf_counter() - t0, 1), tuple(history))
    return baked, report


def _epoch(qmodel, data, model_input, teacher, optimizer, scheduler, s: QATSettings, gen) -> float:
    qmodel.train()
    _freeze_batch_norm(qmodel)
    order = torch.randperm(len(data.train_y), generator=gen)
    total, count = 0.0, 0
    for i in range(0, len(order), s.batch_size):
        idx = order[i:i + s.batch_size]
        aug = augment_params(len(idx), s.augment_pad, s.augment_flip, gen) if s.augment_pad or s.augment_flip else None
        x_unit = apply_augment(to_unit(data.train_x[idx]), aug, s.augment_pad)
        with torch.no_grad():
            t_logits = teacher(x_unit).float()
        logits = qmodel(model_input(x_unit))
        loss = distillation_loss(logits, data.train_y[idx], t_logits, alpha=s.alpha, temperature=s.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += float(loss.detach()) * len(idx)
        count += len(idx)
    return total / max(1, count)


@torch.no_grad()
def _observe(qmodel, data, model_input, batch_size: int) -> None:
    """One pass over up to 2,000 training images in train mode (batch norm frozen): activation ranges only."""
    qmodel.train()
    _freeze_batch_norm(qmodel)
    for i in range(0, min(2000, len(data.train_y)), batch_size):
        qmodel(model_input(to_unit(data.train_x[i:i + batch_size])))


def _val_acc(qmodel, data, model_input: InputSpec) -> float:
    """Validation top-1 in percent, fake quantization on (0 without a validation split)."""
    if len(data.val_y) == 0:
        return 0.0
    return accuracy(predict_logits(qmodel, data.val_x, model_input, "cpu", batch_size=512), data.val_y)
