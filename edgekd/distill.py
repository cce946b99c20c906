"""Stage 1: train a model from labels (scratch/teacher) or distill a student from teachers.

The loop is built for a CPU first: in-memory uint8 batches augmented with tensor ops, teacher
outputs computed once per image and view (then replayed with the same augmentation), channels
last, large batches. On CUDA it adds mixed precision; under ``torchrun`` it shards batches over
processes with DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from edgekd import losses
from edgekd.checkpoint import load_checkpoint, load_model, save_atomic, save_checkpoint, unwrap
from edgekd.config import DistillConfig, KDConfig, RecipeConfig, distill_config_from_dict
from edgekd.data import ImageData, apply_augment, augment_params, load_data, to_unit
from edgekd.errors import EdgeKDError
from edgekd.files import atomic_write_json, atomic_write_text, clean_stale_temps
from edgekd.hints import CHECKPOINT_SUFFIXES, Hint, build_hint
from edgekd.native import retained_heap
from edgekd.teachers import FunctionTeacher, load_teacher
from edgekd.zoo import (EXTERNAL_PREFIXES, build_model, count_params, fit_input, grouped_convolutions,
                        pool_before_activation)
import edgekd.rundir as rundir

OnStep = Callable[[str, int, int, dict], None]
# Fused kernels (CPU and CUDA): one pass over all parameters instead of a Python loop over tensors,
# 2.5-3.5x faster optimizer steps on edgekd's students (benchmarks/results/step_profile.md).
OPTIMIZERS = {
    "sgd": lambda params, r: torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, nesterov=True, fused=True),
    "adam": lambda params, r: torch.optim.Adam(params, lr=r.lr, fused=True),
    "adamw": lambda params, r: torch.optim.AdamW(params, lr=r.lr, fused=True),
}


@dataclass(frozen=True)
class TeacherReport:
    name: str
    kind: str
    val_acc: float
    outputs_probabilities: bool
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced; all files live in ``out_dir``."""

    out_dir: Path
    arch: str
    params: int
    best_val_acc: float
    test_acc: float
    epochs: int
    best_epoch: int
    train_s: float  # wall time of the whole run, teacher caching included
    teacher_cache_s: float
    images_per_s: float  # training images seen / train_s
    device: str
    teachers: tuple[TeacherReport, ...] = ()
    history: tuple[dict, ...] = field(default=(), repr=False)
    data_summary: dict = field(default_factory=dict, repr=False)  # what was read (edgekd.data.summarize)
    # slow batch-norm statistics were re-estimated on training images before each evaluation
    # (recalibrate_batch_norm): the saved weights' statistics match them
    bn_recalibrated: bool = False
    warnings: tuple[str, ...] = ()  # what the user should know about the run (divergence_warning)
    precision: str = "fp32"  # what the training forward passes ran in (resolve_precision)
    # Runs trained on mirrored images: test top-1 of the mean logits over each test image and its mirror
    # (flip test-time augmentation, what fast-training reports such as airbench's quote); test_acc is without
    test_acc_flip_tta: float | None = None

    def summary(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "history"}
        d["out_dir"] = str(self.out_dir)
        d["teachers"] = [t.__dict__ for t in self.teachers]
        return d


# ---------------------------------------------------------------------------------------------
# Device and distributed set-up.


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_runtime(device: str) -> Runtime:
    """CUDA when present (or asked), CPU otherwise; one process per GPU under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EdgeKDError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if world > 1:
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return Runtime(torch.device(device), dist.get_rank(), world)
    return Runtime(torch.device(device))


def _barrier(rt: Runtime) -> None:
    if rt.world > 1:
        import torch.distributed as dist

        dist.barrier()


# On CUDA the host checks the loss every this many steps, not every step: each check waits for the
# GPU to finish. A NaN is still caught within that stretch and stops the run before its epoch is saved.
FINITE_CHECK_EVERY_CUDA = 50


def _check_finite(loss: torch.Tensor, rt: Runtime, epoch: int, step: int) -> None:
    """Raise the same error on every process when any process's loss is NaN or infinite: one rank
    raising alone would leave the others waiting in the next gradient all-reduce. The check is one
    scalar all-reduce per step (a sum is non-finite when any term is)."""
    total = loss.detach().float().reshape(1).clone()
    if rt.world > 1:
        import torch.distributed as dist

        dist.all_reduce(total)
    if not torch.isfinite(total).all():
        where = f" (summed over {rt.world} processes)" if rt.world > 1 else ""
        raise EdgeKDError(f"loss became {float(total)}{where} at epoch {epoch}, step {step}; "
                          "lower the learning rate (--lr)")


@dataclass(frozen=True)
class Precision:
    """How the student's forward pass runs: the autocast dtype (None: fp32) and whether a GradScaler
    guards fp16 gradients against underflow (bf16 has fp32's exponent range and needs none)."""

    autocast: torch.dtype | None
    scaled: bool
    name: str = "fp32"  # as recorded in result.json: fp32, bf16 or fp16

    def context(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()


def resolve_precision(precision: str, amp: bool, device: torch.device, model: nn.Module | None = None) -> Precision:
    """``recipe.precision`` on ``device``: auto is fp16 with a GradScaler on CUDA and bf16 on a CPU with AMX
    tiles (fp32 on other CPUs, for a ``model`` with grouped convolutions, whose bf16 kernels were slower, and
    everywhere when ``amp`` is off); bf16 works on both; fp16 needs CUDA.
    On a CPU with AMX, bf16 autocast trained seed 002's teacher 3.1x, fastcnn 3.0x, edge_resnet_s 1.9x and
    seed 002's student 1.3x faster per step than fp32 (benchmarks/results/step_profile_amx.md); without AMX
    (AVX512-BF16 only) it was slower than fp32 (step_profile_teachers.md)."""
    if precision == "auto":
        cpu_bf16 = cpu_has_amx() and not (model is not None and grouped_convolutions(model))
        precision = ("fp16" if device.type == "cuda" else "bf16" if cpu_bf16 else "fp32") if amp else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise EdgeKDError(f"precision fp16 needs a CUDA GPU, the run is on {device}; use bf16 or fp32 on the CPU")
    return Precision({"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision], precision == "fp16",
                     precision)


def _resumed_precision(last: Path, amp: bool, device: torch.device) -> Precision:
    """The precision ``auto`` resolved to when the run in ``last`` started: recorded in ``last.pt``; a run
    saved before it was recorded trained in fp32 on the CPU (fp16 on CUDA with ``amp``)."""
    saved = load_checkpoint(last).get("precision") if last.exists() else None
    if saved is None:
        saved = "fp16" if device.type == "cuda" and amp else "fp32"
    return resolve_precision(saved, amp, device)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon since Sapphire Rapids), where oneDNN runs bf16 convolutions on
    them. PyTorch's own probes (cpuinfo, then the kernel's permission); a PyTorch without them counts as no
    AMX, so fp32 stays the default."""
    probe, grant = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_init_amx"))
    try:  # the CPU has the tiles, and the kernel lets this process use them (some VMs do not)
        return bool(probe()) and bool(grant()) if probe is not None and grant is not None else False
    except Exception:  # noqa: BLE001 - a failing probe means no AMX, not a failed run
        return False


# ---------------------------------------------------------------------------------------------
# Input pipeline shared by training, evaluation and the teacher cache.


@dataclass(frozen=True)
class InputSpec:
    """How uint8 data becomes model input: channels, size, normalization, memory format."""

    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels_last: bool = False

    def __call__(self, x_unit: torch.Tensor) -> torch.Tensor:
        x = fit_input(x_unit, self.channels, self.size)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@torch.no_grad()
def predict_logits(model: nn.Module, x_u8: torch.Tensor, spec: InputSpec, device, batch_size: int = 1024,
                   mirrored: bool = False) -> torch.Tensor:
    """Logits for uint8 images ``(N, C, H, W)``, in eval mode, batched; returned on the CPU. ``mirrored``: of
    the images flipped left to right."""
    model.eval()
    outs = [model(spec(to_unit(_mirror(x_u8[i:i + batch_size], mirrored).to(device)))).float().cpu()
            for i in range(0, len(x_u8), batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0)


def _mirror(x: torch.Tensor, mirrored: bool) -> torch.Tensor:
    return x.flip(-1) if mirrored else x


SLOW_BN_MOMENTUM = 0.05  # torchvision's MobileNetV3 and EfficientNet use 0.01; PyTorch's default is 0.1


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, x_u8: torch.Tensor, spec: InputSpec, device,
                           batch_size: int = 1024, max_images: int = 4096) -> bool:
    """Re-estimate the running statistics of batch norms whose momentum is too slow to track their weights.

    With momentum 0.01, a short run's running statistics stay near their initial values while the weights
    move on, so the eval-mode network (and every file exported from it) is at chance while training
    accuracy is high. Such layers get exact averages over up to ``max_images`` unaugmented training
    images, spread over the split (a forward pass in train mode, no gradient; batches weigh equally); nothing
    else changes. Returns whether it ran."""
    slow = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.momentum is not None and m.momentum < SLOW_BN_MOMENTUM]
    if not slow:
        return False
    others = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in slow]
    saved = [(m, m.momentum) for m in slow + others]
    for m in slow:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    for m in others:
        m.momentum = 0.0  # running = 1 * running + 0 * batch: left as they are
    was_training = model.training
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()  # no random draws: the pass neither changes the RNG nor sees dropped units
    # evenly spaced over the split: ImageFolder splits are sorted by class, so the first images would be a few classes
    idx = torch.linspace(0, len(x_u8) - 1, min(len(x_u8), max_images)).round().long()
    for i in range(0, len(idx), batch_size):
        model(spec(to_unit(x_u8[idx[i:i + batch_size]].to(device))))
    for m, momentum in saved:
        m.momentum = momentum
    model.train(was_training)
    return True


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean()) * 100.0


# ---------------------------------------------------------------------------------------------
# Teachers: compatibility checks and the output cache.


def check_teachers(teachers: list[FunctionTeacher], data: ImageData, batch_size: int = 256) -> list[TeacherReport]:
    """Fail before training when a teacher's classes do not fit the data.

    edgekd checkpoints carry class names, compared by name and order. Other formats carry only
    an output width; their order is checked on the validation split: a teacher whose best
    class-to-class matching differs from the identity is in another order.
    """
    reports = []
    for t in teachers:
        if t.classes is not None and tuple(t.classes) != tuple(data.classes):
            if sorted(t.classes) == sorted(data.classes):
                raise EdgeKDError(f"teacher {t.name} has the data's classes in another order: {list(t.classes)} vs {list(data.classes)}")
            raise EdgeKDError(f"teacher {t.name} was trained on classes {list(t.classes)}, the data has {list(data.classes)}")
        logits = torch.cat([t(to_unit(data.val_x[i:i + batch_size])) for i in range(0, len(data.val_x), batch_size)])
        if logits.shape[1] != data.num_classes:
            raise EdgeKDError(f"teacher {t.name} outputs {logits.shape[1]} classes, the data has {data.num_classes}")
        if not torch.isfinite(logits).all():
            raise EdgeKDError(f"teacher {t.name} produced NaN or infinite outputs on the validation images")
        acc = accuracy(logits, data.val_y)
        if t.classes is None:
            _check_order(t.name, logits.argmax(1), data)
        reports.append(TeacherReport(t.name, t.kind, acc, bool(t.outputs_probabilities), _size_warnings(t, data, acc)))
    return reports


def _size_warnings(t: FunctionTeacher, data: ImageData, acc: float) -> tuple[str, ...]:
    """A warning when a teacher resizes the data to another size than its run chose (``input_size`` None)."""
    if t.input_size is None or tuple(t.input_size) == tuple(data.image_size):
        return ()
    (h, w), (dh, dw) = t.input_size, data.image_size
    return (f"teacher {t.name} was built for {h}x{w} inputs and the data is {dh}x{dw}: every image is resized "
            f"for it (validation accuracy {acc:.2f}%); if that is low, decode the data at its size (--image-size {h}) "
            "or use a teacher trained at the data's size",)


def _check_order(name: str, pred: torch.Tensor, data: ImageData) -> None:
    from scipy.optimize import linear_sum_assignment

    k = data.num_classes
    conf = torch.zeros(k, k)
    conf.index_put_((data.val_y, pred), torch.ones(len(pred)), accumulate=True)
    rows, cols = linear_sum_assignment(-conf.numpy())
    best = float(conf[rows, cols].sum())
    identity = float(conf.diag().sum())
    if best > 2 * identity and best > 0.5 * len(pred):
        moved = [(data.classes[r], int(c)) for r, c in zip(rows, cols) if r != c][:3]
        raise EdgeKDError(
            f"teacher {name}'s class order differs from the data's (e.g. data class {moved[0][0]!r} "
            f"is its output {moved[0][1]}); retrain it or reorder the dataset's class folders"
        )


@dataclass(frozen=True)
class TeacherCache:
    """Teacher logits for ``V`` augmented views of every training image, with the views' parameters."""

    params: torch.Tensor  # (V, N, 3) int16: dy, dx, flip
    logits: torch.Tensor  # (M, V, N, K) float16: M teachers


def build_teacher_cache(teachers, x_u8, views: int, pad: int, flip: bool, seed: int,
                        batch_size: int = 512, on_step: OnStep | None = None) -> TeacherCache:
    gen = torch.Generator().manual_seed(seed + 7919)
    n = len(x_u8)
    params = torch.stack([augment_params(n, pad, flip, gen) for _ in range(views)])
    if not (pad or flip):
        params.zero_()
    logits = None
    total, done = views * n, 0
    for v in range(views):
        for i in range(0, n, batch_size):
            x = to_unit(apply_augment(x_u8[i:i + batch_size], params[v, i:i + batch_size], pad))
            outs = torch.stack([t(x) for t in teachers])  # (M, B, K)
            if logits is None:
                logits = torch.empty(len(teachers), views, n, outs.shape[-1], dtype=torch.float16)
            logits[:, v, i:i + len(x)] = outs.to(torch.float16)
            done += len(x)
            if on_step:
                on_step("teacher cache", done, total, {})
    return TeacherCache(params, logits)


def teacher_cache_key(cfg: DistillConfig, data: ImageData, teacher: str, pad: int, flip: bool,
                      teacher_kind: str = "") -> str:
    """What one teacher's cached outputs depend on: the data, the teacher file, the views and their seed, and
    how the teacher runs where that changes its numbers (``edgekd (bf16)``; fp32 in PyTorch or onnxruntime alike)."""
    h = hashlib.sha256()
    if teacher_kind.endswith("(bf16)"):
        h.update(b"bf16")
    h.update(data.fingerprint().encode())
    st = Path(teacher).stat()
    h.update(f"{Path(teacher).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps([cfg.kd.cache_views, pad, flip, cfg.recipe.seed, cfg.kd.teacher_mean, cfg.kd.teacher_std]).encode())
    return h.hexdigest()[:16]


def _load_or_build_cache(cache_dir: Path, keys: list[str], teachers, data, views, pad, flip, seed, rt, on_step):
    """One file per teacher (``teacher-KEY.pt``), so students of a pipeline that share a teacher
    share its outputs: rank 0 reads those made with the same key and builds the others; other
    ranks wait for rank 0's files (``_wait_for_cache``) and read them."""
    paths = [cache_dir / f"teacher-{k}.pt" for k in keys]
    if rt.main:
        clean_stale_temps(cache_dir)
    if not rt.main:
        parts = _wait_for_cache(paths, keys)
        return TeacherCache(parts[0].params, torch.cat([c.logits for c in parts]))
    saved = {p: _read_cache(p, k) for p, k in zip(paths, keys)}
    todo = list(dict.fromkeys(p for p in paths if saved[p] is None))  # a teacher given twice is built once
    if todo:
        built = build_teacher_cache([teachers[paths.index(p)] for p in todo], data.train_x, views, pad, flip, seed,
                                    on_step=on_step)
        for j, p in enumerate(todo):
            one = TeacherCache(built.params, built.logits[j:j + 1])
            save_atomic(p, {"key": keys[paths.index(p)], "params": one.params, "logits": one.logits})
            saved[p] = one
    parts = [saved[p] for p in paths]
    return TeacherCache(parts[0].params, torch.cat([c.logits for c in parts]))


# Ranks other than 0 poll for the cache files instead of waiting in a barrier: a collective gives up
# after the process group's timeout (10-30 min by default), less than a large teacher cache takes to
# build on a CPU. If rank 0 fails, torchrun ends every worker; this bound only ends a wait for a rank
# 0 that hangs, or whose files land where this rank cannot see them.
CACHE_WAIT_S = 24 * 3600.0
CACHE_POLL_S = 1.0


def _wait_for_cache(paths: list[Path], keys: list[str], wait_s: float = CACHE_WAIT_S,
                    poll_s: float = CACHE_POLL_S) -> list[TeacherCache]:
    """The caches at ``paths`` once each holds its ``key``. Files are written atomically (complete or
    absent); one left by an earlier run with another key is read again only after it changed."""
    deadline = time.monotonic() + wait_s
    found: dict[Path, TeacherCache] = {}
    stamps: dict[Path, tuple[int, int]] = {}
    while True:
        for p, k in zip(paths, keys):
            stamp = _stamp(p)
            if p not in found and stamp is not None and stamps.get(p) != stamp:
                stamps[p] = stamp
                cache = _read_cache(p, k)
                if cache is not None:
                    found[p] = cache
        if all(p in found for p in paths):
            return [found[p] for p in paths]
        if time.monotonic() > deadline:
            missing = next(p for p in paths if p not in found)
            raise EdgeKDError(f"waited {wait_s / 3600:.1f} h for rank 0's teacher cache {missing}; "
                              "check rank 0 and that every rank sees the same cache directory (a shared disk)")
        time.sleep(poll_s)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _read_cache(path: Path, key: str) -> TeacherCache | None:
    """The saved cache when it exists, is readable and was made with ``key``; None otherwise."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable cache is simply rebuilt
        return None
    return TeacherCache(saved["params"], saved["logits"]) if saved.get("key") == key else None


# ---------------------------------------------------------------------------------------------
# The run.


@retained_heap()  # no page faults on every step's large tensors (see native.retained_heap)
def train(cfg: DistillConfig, out_dir: str | Path, *, resume: bool = False,
          data: ImageData | None = None, on_step: OnStep | None = None,
          cache_dir: str | Path | None = None) -> TrainResult:
    """Train ``cfg.model.arch`` on ``cfg.data``, distilling from ``cfg.kd.teachers`` if any.

    Writes ``best.pt``, ``last.pt``, ``config.json``, ``history.json``/``.csv`` and
    ``result.json`` to ``out_dir``. ``resume=True`` continues from ``last.pt``. Cached teacher
    outputs go to ``cache_dir`` (default ``out_dir/teacher_cache``), one file per teacher.

    Example:
        >>> from edgekd.config import DistillConfig, RecipeConfig
        >>> cfg = DistillConfig(recipe=RecipeConfig(epochs=2))
        >>> result = train(cfg, "runs/scratch")  # doctest: +SKIP
        >>> result.test_acc > 50  # doctest: +SKIP
        True
    """
    t_start = time.perf_counter()
    _validate(cfg)
    out, rt = Path(out_dir), resolve_runtime(cfg.recipe.device)
    if cfg.kd.hint_weight and rt.world > 1:  # the adapter sits outside DistributedDataParallel: unaveraged gradients
        raise EdgeKDError("kd.hint_weight runs in a single process; launch without torchrun or set it to 0")
    precision = resolve_precision(cfg.recipe.precision, cfg.recipe.amp, rt.device)
    _check_out_dir(out, resume)
    if resume and cfg.recipe.precision == "auto":  # a resumed run goes on in what it started in, wherever it resumes
        precision = _resumed_precision(rundir.last(out), cfg.recipe.amp, rt.device)
    data = data if data is not None else _load_data(cfg, on_step)
    teachers = [load_teacher(p, device=rt.device, input_mean=cfg.kd.teacher_mean, input_std=cfg.kd.teacher_std,
                             bf16=precision.autocast is torch.bfloat16 and cpu_has_amx()) for p in cfg.kd.teachers]
    if cfg.kd.hint_weight and not teachers[0].kind.startswith("edgekd"):
        raise EdgeKDError(f"kd.hint_weight needs an edgekd checkpoint teacher, and {teachers[0].name} is {teachers[0].kind}: "
                          "its layers are what the student's feature map is matched to")
    teacher_reports = check_teachers(teachers, data) if teachers else []
    for warning in (w for report in teacher_reports for w in report.warnings):
        if on_step:
            on_step("warning", 0, 0, {"message": warning})
    torch.manual_seed(cfg.recipe.seed)
    model, meta, spec = _build_on(cfg, data, rt.device)
    if not resume:  # the student's own layers decide too, now that it exists (a resumed run keeps its precision)
        precision = resolve_precision(cfg.recipe.precision, cfg.recipe.amp, rt.device, model)
    out.mkdir(parents=True, exist_ok=True)
    if rt.main:
        clean_stale_temps(out)
    cache_t0 = time.perf_counter()
    loop, state = _make_loop(cfg, out, model, data, spec, precision, rt, teachers, resume,
                             Path(cache_dir) if cache_dir else rundir.teacher_cache(out), on_step)
    cache_s = time.perf_counter() - cache_t0 if loop.cache is not None else 0.0
    resumed_s = state["elapsed_s"]
    for epoch in range(state["epoch"] + 1, cfg.recipe.epochs + 1):
        record = _epoch(loop, model, epoch, on_step)
        _check_collapse(state["history"], record, data.num_classes, cfg.recipe.lr, out)
        state["history"].append(record)
        state["epoch"], state["elapsed_s"] = epoch, resumed_s + (time.perf_counter() - t_start)
        if rt.main:
            _save_epoch(out, model, meta, cfg, loop, state)
        if on_step:
            on_step("epoch", epoch, cfg.recipe.epochs, record)
    _barrier(rt)
    train_s = resumed_s + (time.perf_counter() - t_start) if state["history"] else 0.0
    return _finish(cfg, out, loop, meta, state, train_s, cache_s, teacher_reports)


def _check_out_dir(out: Path, resume: bool) -> None:
    if rundir.last(out).exists() and not resume:
        raise EdgeKDError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume and not rundir.last(out).exists():
        raise EdgeKDError(f"nothing to resume in {out}: no epoch finished there (no last.pt); "
                          "run the same command without --resume to start it")


def _load_data(cfg: DistillConfig, on_step: OnStep | None) -> ImageData:
    d = cfg.data
    data = load_data(d.dataset, data_dir=d.data_dir, download=d.download, val_fraction=d.val_fraction,
                     test_fraction=d.test_fraction, image_size=d.image_size, seed=d.split_seed)
    if on_step:
        on_step("data", 0, 0, {"name": data.name, "summary": data.summary})
    return data


def _build_on(cfg: DistillConfig, data: ImageData, device: torch.device):
    """The model on ``device`` (channels-last on the CPU), its checkpoint meta and its input spec."""
    model, meta = _build(cfg, data)
    model.to(device)
    spec = InputSpec(meta["in_channels"], tuple(meta["input_size"]), tuple(meta["mean"]), tuple(meta["std"]),
                     cfg.recipe.channels_last and device.type == "cpu")
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, meta, spec


def _make_loop(cfg, out, model, data, spec, precision, rt, teachers, resume, cache_dir, on_step) -> tuple[Loop, dict]:
    """Everything a training step reads (teacher cache, optimizer, schedule, scaler, clipper), and the
    run's state: fresh, or restored from ``last.pt`` when resuming."""
    r, kd = cfg.recipe, cfg.kd
    pad = r.augment_pad if r.augment_pad is not None else data.image_size[0] // 8
    flip = r.augment_flip if r.augment_flip is not None else data.channels == 3
    cache = None
    if teachers and kd.cache_views > 0:
        views = kd.cache_views if (pad or flip) else 1
        keys = [teacher_cache_key(cfg, data, path, pad, flip, t.kind) for path, t in zip(kd.teachers, teachers)]
        cache = _load_or_build_cache(cache_dir, keys, teachers, data, views, pad, flip, r.seed, rt, on_step)
    steps_per_epoch = math.ceil((len(data.train_x) // rt.world) / max(1, r.batch_size // rt.world))
    trained = pool_before_activation(model)  # the same parameters, a faster order for training
    hint = _hint(kd, trained, data, spec, rt)
    extra = list(hint.adapter.parameters()) if hint else []
    optimizer = _optimizer(model, r, extra)
    scheduler = _scheduler(optimizer, r, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=precision.scaled)
    clip = GradClipper([*model.parameters(), *extra], r.clip_grad, rt.device)
    state = {"epoch": 0, "best_val_acc": -1.0, "best_epoch": 0, "history": [], "elapsed_s": 0.0}
    if resume:
        state = _restore(rundir.last(out), cfg, model, optimizer, scheduler, scaler, rt.device, clip, hint)
        if on_step:
            on_step("resumed", state["epoch"], r.epochs, {"best_val_acc": state["best_val_acc"]})
    if rt.world > 1:
        trained = nn.parallel.DistributedDataParallel(trained, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if rt.main:
        atomic_write_json(rundir.config_file(out), cfg.to_dict())
    weights = torch.tensor(kd.teacher_weights, device=rt.device) if kd.teacher_weights else None
    loop = Loop(trained, data, spec, optimizer, scheduler, scaler, precision, rt, r, kd, pad, flip, teachers, cache,
                weights, clip, hint)
    return loop, state


def _hint(kd: KDConfig, trained: nn.Module, data: ImageData, spec: InputSpec, rt: Runtime) -> Hint | None:
    """Hint distillation's teacher network, feature taps and adapter (None when ``kd.hint_weight`` is 0)."""
    if not kd.hint_weight:
        return None
    probe = to_unit(data.train_x[:2].to(rt.device))
    return build_hint(kd.teachers[0], trained, probe, spec, rt.device)


def _epoch(loop: Loop, model: nn.Module, epoch: int, on_step: OnStep | None) -> dict:
    """Train one epoch, then evaluate on the validation split: the epoch's history record."""
    t0 = time.perf_counter()
    r, rt, data, spec = loop.recipe, loop.rt, loop.data, loop.spec
    train_loss, train_acc, passes = _train_epoch(loop, epoch, on_step)
    recalibrated = recalibrate_batch_norm(unwrap(model), data.train_x, spec, rt.device, r.eval_batch_size)
    val_logits = predict_logits(unwrap(model), data.val_x, spec, rt.device, r.eval_batch_size)
    return {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "student_passes": passes,
            "bn_recalibrated": recalibrated, "val_loss": float(nn.functional.cross_entropy(val_logits, data.val_y)),
            "val_acc": accuracy(val_logits, data.val_y), "lr": loop.optimizer.param_groups[0]["lr"],
            "epoch_s": time.perf_counter() - t0}


def _save_epoch(out: Path, model: nn.Module, meta: dict, cfg: DistillConfig, loop: Loop, state: dict) -> None:
    """``best.pt`` when validation improved, then ``last.pt`` (everything a resume needs) and the history."""
    record = state["history"][-1]
    if record["val_acc"] > state["best_val_acc"]:
        state["best_val_acc"], state["best_epoch"] = record["val_acc"], record["epoch"]
        save_checkpoint(rundir.best(out), model, meta, epoch=record["epoch"], val_acc=record["val_acc"])
    save_checkpoint(rundir.last(out), model, meta, config=cfg.to_dict(), precision=loop.precision.name,
                    **_resume_state(loop.optimizer, loop.scheduler, loop.scaler, loop.rt.device, loop.clip, loop.hint),
                    **state)
    _write_history(out, state["history"])


def _finish(cfg, out, loop, meta, state, train_s, cache_s, teacher_reports) -> TrainResult:
    """Test the best checkpoint once and write ``result.json``."""
    rt, data, r = loop.rt, loop.data, cfg.recipe
    best, _ = _load_best(out, rt.device)
    test_logits = predict_logits(best, data.test_x, loop.spec, rt.device, r.eval_batch_size)
    test_acc = accuracy(test_logits, data.test_y)
    flip_tta = None  # a run trained on mirrored images: also the test accuracy of the mean over each image and its mirror
    if loop.flip and len(data.test_y):
        mirrored = predict_logits(best, data.test_x, loop.spec, rt.device, r.eval_batch_size, mirrored=True)
        flip_tta = accuracy(test_logits + mirrored, data.test_y)
    images = len(data.train_x) * r.epochs
    result = TrainResult(out, meta["arch"], count_params(best), state["best_val_acc"], test_acc, r.epochs,
                         state["best_epoch"], train_s, cache_s, images / train_s if train_s else 0.0,
                         str(rt.device), tuple(teacher_reports), tuple(state["history"]), data.summary,
                         any(h.get("bn_recalibrated", False) for h in state["history"]),
                         divergence_warning(state["history"], data.num_classes, bool(cfg.kd.teachers)),
                         loop.precision.name, flip_tta)
    if rt.main:
        atomic_write_json(rundir.result_file(out), result.summary())
    if rt.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


def divergence_warning(history, num_classes: int, distilled: bool) -> tuple[str, ...]:
    """A run whose validation accuracy fell to less than half its earlier best (from well above chance)
    diverged for a while, even if it recovered: say so, with what to try.

    Example:
        >>> divergence_warning([{"epoch": 1, "val_acc": 42.0}, {"epoch": 2, "val_acc": 10.3}], 10, True)[0][:46]
        'validation accuracy fell from 42.0% (epoch 1) '
    """
    best, best_epoch = 0.0, 0
    for h in history:
        if best > 2 * 100.0 / num_classes and h["val_acc"] < best / 2:
            hint = ("a lower kd.temperature (1 or 2: the KD term's gradient grows with T) or a lower learning rate"
                    if distilled else "a lower learning rate or clip_grad")
            return (f"validation accuracy fell from {best:.1f}% (epoch {best_epoch}) to {h['val_acc']:.1f}% "
                    f"(epoch {h['epoch']}): the run diverged; try {hint}",)
        if h["val_acc"] > best:
            best, best_epoch = h["val_acc"], h["epoch"]
    return ()


def distill(cfg: DistillConfig, out_dir: str | Path, **kwargs) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``, distilling from ``cfg.kd.teachers`` (from scratch when there
    are none): the public name of ``train``, which takes the same keyword arguments.

    Example:
        >>> from edgekd import DistillConfig, ModelConfig, RecipeConfig, distill
        >>> cfg = DistillConfig(model=ModelConfig(arch="seed003_student"), recipe=RecipeConfig(epochs=20))
        >>> result = distill(cfg, "runs/student")  # the built-in digits; a folder path reads an ImageFolder
        >>> result.test_acc > 90, sorted(p.name for p in result.out_dir.glob("*.pt"))
        (True, ['best.pt', 'last.pt'])
    """
    return train(cfg, out_dir, **kwargs)


def _check_collapse(history: list[dict], record: dict, num_classes: int, lr: float, out: Path) -> None:
    """Stop a run whose training accuracy collapsed: below half its best so far, after that best was
    well above chance. Its checkpoints are no result, so ``best.pt`` is removed (``last.pt`` and the
    history stay for a look)."""
    chance = 100.0 / num_classes
    best = max((h["train_acc"] for h in history), default=0.0)
    if best >= 2 * chance and record["train_acc"] < 0.5 * best:
        rundir.best(out).unlink(missing_ok=True)
        raise EdgeKDError(
            f"training collapsed at epoch {record['epoch']}: training accuracy fell from {best:.1f}% to "
            f"{record['train_acc']:.1f}% (chance {chance:.1f}%, loss {record['train_loss']:.3f}); the run stopped "
            f"without a best model. Lower the learning rate (--lr, now {lr:g}) and start it in a new --out")


def _validate(cfg: DistillConfig) -> None:
    """What the per-field checks of the config cannot see: fields that must agree."""
    kd = cfg.kd
    if kd.teacher_weights and len(kd.teacher_weights) != len(kd.teachers):
        raise EdgeKDError(f"{len(kd.teacher_weights)} teacher weights for {len(kd.teachers)} teachers; give one per teacher")
    if kd.hint_weight and (len(kd.teachers) != 1 or kd.cache_views > 0):
        raise EdgeKDError("kd.hint_weight (--hint-weight) needs exactly one teacher answering every batch "
                          "(kd.cache_views = 0, --cache-views 0): feature maps are not cached")
    if kd.hint_weight and Path(kd.teachers[0]).suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise EdgeKDError(f"kd.hint_weight needs an edgekd checkpoint teacher (.pt), not {Path(kd.teachers[0]).name}: "
                          "its layers are what the student's feature map is matched to")
    if kd.teachers:
        check_mixing(cfg.recipe, kd)


def check_mixing(recipe: RecipeConfig, kd: KDConfig, where: str = "recipe") -> None:
    """Mixup and CutMix blend images after augmentation, so a distilled run needs the teacher on every batch."""
    mixing = [name for name in ("mixup_alpha", "cutmix_alpha") if getattr(recipe, name)]
    if mixing and kd.cache_views > 0:
        raise EdgeKDError(f"{where}.{mixing[0]} needs the teacher on every batch (kd.cache_views = 0, --cache-views 0): "
                          "cached teacher outputs are for unmixed images")


def _build(cfg: DistillConfig, data: ImageData):
    m = cfg.model
    size = (m.input_size, m.input_size) if m.input_size else data.image_size
    torchvision_arch = m.arch.startswith(EXTERNAL_PREFIXES)  # torchvision or timm: 3-channel ImageNet backbones
    channels = 3 if torchvision_arch else data.channels
    kwargs = {"pretrained": m.pretrained, "weights_path": m.weights_path, "trainable_layers": m.trainable_layers,
              "head_hidden": m.head_hidden}
    kwargs = {k: v for k, v in kwargs.items() if v}
    model = build_model(m.arch, data.num_classes, channels, size, **kwargs)
    imagenet = torchvision_arch and (m.pretrained or m.weights_path)
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if imagenet else (data.mean, data.std)
    if len(mean) != channels:  # 1-channel data statistics fed to a 3-channel model
        mean, std = tuple(mean) * channels, tuple(std) * channels
    meta = {"arch": m.arch, "arch_kwargs": {k: v for k, v in kwargs.items() if k in ("trainable_layers", "head_hidden")},
            "classes": list(data.classes), "in_channels": channels, "input_size": list(size),
            "mean": list(mean), "std": list(std)}
    return model, meta


def _optimizer(model: nn.Module, r, extra: list[nn.Parameter] = ()) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in [*model.parameters(), *extra]:
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return OPTIMIZERS[r.optimizer](groups, r)


def _scheduler(optimizer, r, steps_per_epoch: int):
    total = r.epochs * steps_per_epoch
    if r.schedule == "onecycle" and total >= 3:
        # A quarter of the steps warm up; at least 2 so that both phases of a short run have length
        # (OneCycleLR divides by each phase's length: 4 steps at 0.25 would divide by zero).
        pct = min(0.5, max(0.25, 2.0 / total))
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=r.lr, total_steps=total, pct_start=pct,
                                                   div_factor=10.0, final_div_factor=100.0)
    if r.schedule == "cosine" or r.schedule == "onecycle":  # onecycle of 1-2 steps: nothing to warm up
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


class GradClipper:
    """Clips each step's gradient norm to ``factor`` times its running average, without a host sync.

    Our own rather than ``torch.nn.utils.clip_grad_norm_``: that takes a fixed bound, and what a
    fixed bound means depends on the model's scale; a bound relative to the run's own recent norms
    catches the one-step spikes that kill a network without batch norm (a KD student's norm jumped
    from about 1.5 to 23.5 in the step before it collapsed) and leaves ordinary steps alone."""

    def __init__(self, params, factor: float | None, device: torch.device, warmup_steps: int = 20,
                 decay: float = 0.98) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.factor, self.warmup_steps, self.decay = factor, warmup_steps, decay
        self.avg = torch.zeros((), device=device)  # running average of the (clipped) norms
        self.steps = torch.zeros((), device=device)  # finite steps seen

    def __call__(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.factor is None or not grads:
            return
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        bound = torch.where(self.steps >= self.warmup_steps, self.factor * self.avg, torch.full_like(total, math.inf))
        torch._foreach_mul_(grads, torch.clamp(bound / (total + 1e-6), max=1.0))
        seen = torch.minimum(total, bound)
        ok = torch.isfinite(total)  # an fp16 overflow step is skipped by the GradScaler: not counted
        self.avg = torch.where(ok, torch.where(self.steps == 0, seen, self.decay * self.avg + (1 - self.decay) * seen),
                               self.avg)
        self.steps = self.steps + ok.float()

    def state_dict(self) -> dict:
        return {"avg": self.avg.cpu(), "steps": self.steps.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.avg, self.steps = state["avg"].to(self.avg.device), state["steps"].to(self.steps.device)


@dataclass(frozen=True)
class Loop:
    """What every training step reads, fixed for the run."""

    model: nn.Module  # DistributedDataParallel-wrapped under torchrun
    data: ImageData
    spec: InputSpec
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    precision: Precision
    rt: Runtime
    recipe: RecipeConfig
    kd: KDConfig
    pad: int
    flip: bool
    teachers: list[FunctionTeacher]
    cache: TeacherCache | None
    weights: torch.Tensor | None  # (M,) on the training device
    clip: GradClipper
    hint: Hint | None = None  # feature distillation (kd.hint_weight)


@dataclass(frozen=True)
class EpochOrder:
    """One epoch's draws, made in this order from a generator seeded by (seed, epoch)."""

    perm: torch.Tensor  # (N / world,) this process's share of the shuffled image indices
    view: torch.Tensor | None  # (N,) cached view per image
    fresh: torch.Tensor  # (N, 3) fresh augmentation per image
    again: torch.Tensor | None = None  # (N, 3) a second augmentation per image, for a run's own repeat_share


def _epoch_order(loop: Loop, epoch: int) -> EpochOrder:
    n, rt = len(loop.data.train_x), loop.rt
    gen = torch.Generator().manual_seed(loop.recipe.seed * 100003 + epoch)
    perm = torch.randperm(n, generator=gen)
    per_rank = n // rt.world
    perm = perm[rt.rank * per_rank:(rt.rank + 1) * per_rank] if rt.world > 1 else perm
    view = torch.randint(0, loop.cache.params.shape[0], (n,), generator=gen) if loop.cache is not None else None
    fresh = augment_params(n, loop.pad, loop.flip, gen)
    # Drawn last and only when used, so runs without a repeat draw exactly what they drew before.
    again = augment_params(n, loop.pad, loop.flip, gen) if loop.cache is None and loop.recipe.repeat_share else None
    return EpochOrder(perm, view, fresh, again)


def _train_epoch(loop: Loop, epoch: int, on_step: OnStep | None) -> tuple[float, float]:
    """One pass over this process's share of the training images: (mean loss, accuracy %, student passes)."""
    loop.model.train()
    order = _epoch_order(loop, epoch)
    batch = max(1, loop.recipe.batch_size // loop.rt.world)
    steps = math.ceil(len(order.perm) / batch)
    loss_sum = torch.zeros((), device=loop.rt.device)
    correct = torch.zeros((), device=loop.rt.device)
    seen = passes = 0  # images scored for the metrics; images the student forwarded and learned from
    watch = torch.zeros((), device=loop.rt.device)  # this stretch's summed loss: non-finite once any loss is
    every = FINITE_CHECK_EVERY_CUDA if loop.rt.device.type == "cuda" else 1
    for step in range(steps):
        idx = order.perm[step * batch:(step + 1) * batch]
        loss, logits, y, forwarded = _forward(loop, order, idx, progress=epoch - 1 + step / steps, key=(epoch, step))
        watch = watch + loss.detach().float()
        if (step + 1) % every == 0 or step + 1 == steps:
            _check_finite(watch, loop.rt, epoch, step + 1)
            watch = torch.zeros((), device=loop.rt.device)
        loop.optimizer.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()
        loop.scaler.unscale_(loop.optimizer)  # a no-op unless fp16 scales the loss
        loop.clip()
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
        loop.scheduler.step()
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(1) == y).sum()
        seen += len(idx)
        passes += forwarded
        if on_step:
            on_step("step", step + 1, steps, {"epoch": epoch})
    totals = torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=loop.rt.device),
                          torch.tensor(float(passes), device=loop.rt.device)])
    if loop.rt.world > 1:  # every rank reports (and judges a collapse on) the same numbers
        import torch.distributed as dist

        dist.all_reduce(totals)
    return float(totals[0] / totals[2]), float(totals[1] / totals[2]) * 100.0, int(totals[3])


def _forward(loop: Loop, order: EpochOrder, idx: torch.Tensor, progress: float, key: tuple[int, int] = (0, 0)):
    """The loss of one batch (``progress``: epochs done; ``key``: epoch and step, which seed its mixup),
    with the student's logits for its images and their labels."""
    rt, kd, pad = loop.rt, loop.kd, loop.pad
    x_u8 = loop.data.train_x[idx].to(rt.device, non_blocking=True)
    y = loop.data.train_y[idx].to(rt.device, non_blocking=True)
    params, t_logits = _batch_views(loop.cache, order, idx, rt.device, augment=bool(pad or loop.flip))
    x_unit = to_unit(apply_augment(x_u8, params, pad))
    mix = _mix(loop, key, len(idx), tuple(x_unit.shape[-2:]))
    if mix is not None:  # before the teacher runs: it answers for the very images the student sees
        x_unit = mix.apply(x_unit)
    t_features = None
    if loop.hint is not None:  # the teacher's own network: its logits and its feature map in one pass
        t_logits, t_features = loop.hint.teacher_outputs(x_unit)
    elif loop.teachers and loop.cache is None:
        t_logits = _teacher_logits(loop.teachers, x_unit, rt.device)
    n_fresh = round(len(idx) * _repeat_share(loop)) if pad or loop.flip else 0
    if n_fresh:  # the same images again, freshly augmented, in the same forward pass
        second = order.fresh if loop.cache is not None else order.again  # without a cache, fresh is the first view
        x_unit = torch.cat([x_unit, to_unit(apply_augment(x_u8[:n_fresh], second[idx[:n_fresh]], pad))])
    with loop.precision.context(rt.device):
        logits = loop.model(loop.spec(x_unit))
    logits, fresh_logits = logits[:len(idx)], logits[len(idx):]
    alpha = losses.warmed_up_alpha(kd.alpha, progress, kd.warmup_epochs)
    loss = losses.distillation_loss(logits, y, t_logits, alpha=alpha, temperature=kd.temperature,
                                    weights=loop.weights, label_smoothing=loop.recipe.label_smoothing)
    if mix is not None:  # the labels mix as the images did; the teacher's term is the same in both
        other = losses.distillation_loss(logits, y[mix.partner], t_logits, alpha=alpha, temperature=kd.temperature,
                                         weights=loop.weights, label_smoothing=loop.recipe.label_smoothing)
        loss = mix.lam * loss + (1.0 - mix.lam) * other
    if t_features is not None:
        s_features = loop.hint.student_tap.take()[:len(idx)].float()
        ramp = losses.warmup_ramp(progress, kd.warmup_epochs)
        loss = loss + kd.hint_weight * ramp * losses.hint_loss(loop.hint.adapter(s_features), t_features)
    if n_fresh:
        loss = losses.with_fresh_views(loss, len(idx), fresh_logits, y[:n_fresh], loop.recipe.label_smoothing)
    scored = y if mix is None or mix.lam >= 0.5 else y[mix.partner]  # training accuracy: the dominant image's label
    return loss, logits, scored, len(x_unit)


@dataclass(frozen=True)
class Mix:
    """One batch's mixup or CutMix: each image is blended with ``partner`` (indices into the batch) and its
    label weighs ``lam``; CutMix pastes the partner's pixels in ``box`` (rows y0:y1, columns x0:x1)."""

    lam: float
    partner: torch.Tensor
    box: tuple[int, int, int, int] | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.box is None:
            return self.lam * x + (1.0 - self.lam) * x[self.partner]
        y0, y1, x0, x1 = self.box
        out = x.clone()
        out[:, :, y0:y1, x0:x1] = x[self.partner, :, y0:y1, x0:x1]
        return out


def _mix(loop: Loop, key: tuple[int, int], n: int, size: tuple[int, int]) -> Mix | None:
    """The batch's mixup or CutMix (None without either), drawn from a generator of its own keyed by (seed, epoch,
    step, rank), so a resumed run mixes exactly as an uninterrupted one.

    Our own rather than torchvision's ``v2.MixUp``/``v2.CutMix``: those draw from torch's global generator
    and return soft labels, and the teacher's term needs each image's partner and a resumable draw."""
    r = loop.recipe
    if not (r.mixup_alpha or r.cutmix_alpha):
        return None
    rng = np.random.default_rng((r.seed, key[0], key[1], loop.rt.rank))
    cut = bool(r.cutmix_alpha) and (not r.mixup_alpha or rng.random() < 0.5)  # drawn only when both are on
    a = r.cutmix_alpha if cut else r.mixup_alpha
    lam = float(rng.beta(a, a))
    partner = torch.from_numpy(rng.permutation(n)).to(loop.rt.device)
    if not cut:
        return Mix(lam, partner)
    (h, w), side = size, math.sqrt(1.0 - lam)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))  # the box's centre; it is clipped at the borders
    bh, bw = round(h * side), round(w * side)
    y0, y1 = max(0, cy - bh // 2), min(h, cy + bh - bh // 2)
    x0, x1 = max(0, cx - bw // 2), min(w, cx + bw - bw // 2)
    return Mix(1.0 - (y1 - y0) * (x1 - x0) / (h * w), partner, (y0, y1, x0, x1))  # the area actually kept


def _repeat_share(loop: Loop) -> float:
    """The share of a batch shown again freshly augmented: a teacher cache's fresh views, or a run's own
    ``repeat_share`` (the matched scratch twin of a KD run with a cache)."""
    return loop.kd.fresh_share if loop.cache is not None else loop.recipe.repeat_share


def matched_scratch(cfg: DistillConfig) -> DistillConfig:
    """The scratch twin of a distillation config: no teachers, and the same number of student passes
    on the same augmentation (a KD run with a cache also shows ``fresh_share`` of every batch freshly
    augmented, so the twin does too). Everything else (model, seed, epochs, optimizer) is the same."""
    extra = cfg.kd.fresh_share if cfg.kd.teachers and cfg.kd.cache_views > 0 else cfg.recipe.repeat_share
    return dataclasses.replace(cfg, recipe=dataclasses.replace(cfg.recipe, repeat_share=extra), kd=KDConfig())


def _batch_views(cache: TeacherCache | None, order: EpochOrder, idx: torch.Tensor, device: torch.device,
                 augment: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Each image's augmentation ``(B, 3)`` (None: none) and, from the cache, its view's teacher
    logits ``(M, B, K)`` in float32 on ``device`` (None without a cache). The cache stays on the CPU."""
    if cache is None:
        return (order.fresh[idx] if augment else None), None
    v = order.view[idx]
    return cache.params[v, idx], cache.logits[:, v, idx].to(device).float()


def _teacher_logits(teachers: list[FunctionTeacher], x_unit: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Teacher logits ``(M, B, K)`` on ``device``; teachers answer on the CPU (numpy runtimes) or their own device."""
    return torch.stack([t(x_unit).to(device).float() for t in teachers])


def _resume_state(optimizer, scheduler, scaler: torch.amp.GradScaler, device: torch.device,
                  clip: GradClipper | None = None, hint: Hint | None = None) -> dict:
    """What ``last.pt`` holds besides the weights so that a resumed run continues as an uninterrupted
    one: optimizer, schedule, GradScaler, and the RNGs that dropout and random layers draw from
    (torch's CPU generator; on CUDA this process's device: every rank seeds and draws alike, and
    ``get_rng_state_all`` would open a context on every visible GPU). Batch order and augmentation
    come from per-epoch seeded generators; numpy and Python's ``random`` are not used in training."""
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    if clip is not None:
        state["clip"] = clip.state_dict()
    if hint is not None:
        state["hint_adapter"] = hint.adapter.state_dict()
    return state


def _load_resume_state(ckpt: dict, optimizer, scheduler, scaler: torch.amp.GradScaler, device: torch.device,
                       clip: GradClipper | None = None, hint: Hint | None = None) -> None:
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):  # {} when saved without fp16 (a disabled scaler): a fresh scaler is what it had
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in ckpt:
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
    if clip is not None and "clip" in ckpt:
        clip.load_state_dict(ckpt["clip"])
    if hint is not None:
        hint.adapter.load_state_dict(ckpt["hint_adapter"])


def _restore(path: Path, cfg: DistillConfig, model, optimizer, scheduler, scaler, device, clip=None, hint=None) -> dict:
    ckpt = load_checkpoint(path)
    if not same_config(ckpt.get("config", {}), cfg):
        raise EdgeKDError(f"{path.parent} was started with a different config; resume with the same options or use a new --out")
    unwrap(model).load_state_dict(ckpt["state_dict"])
    _load_resume_state(ckpt, optimizer, scheduler, scaler, device, clip, hint)
    return {k: ckpt[k] for k in ("epoch", "best_val_acc", "best_epoch", "history", "elapsed_s")}


# What a run saved before a field existed did: resuming it under today's default would change its recipe.
LEGACY = {"recipe": {"precision": "auto", "clip_grad": None, "repeat_share": 0.0}, "kd": {"warmup_epochs": 0.0}}


def same_config(saved: dict, cfg: DistillConfig) -> bool:
    """Whether a run's saved config is ``cfg``; a field added since it was saved counts as what the run did then."""
    saved = {k: {**LEGACY.get(k, {}), **v} if isinstance(v, dict) else v for k, v in saved.items()}
    try:
        return distill_config_from_dict(saved).to_dict() == cfg.to_dict()
    except EdgeKDError:  # a key this version does not know
        return False


def _load_best(out: Path, device):

    return load_model(rundir.best(out), device=device)


def _write_history(out: Path, history: list[dict]) -> None:
    atomic_write_json(rundir.history_file(out), history)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(rundir.history_csv(out), buf.getvalue())
