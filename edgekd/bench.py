"""Stage 4: size, latency and accuracy of every variant against the teacher, on the CPU target.

Every model runs through its own runtime (PyTorch, onnxruntime, LiteRT) on the full test split,
so the accuracy is what a device would see, not the PyTorch number. Timing follows LiteRT's
benchmark_model and onnxruntime_perf_test: warm-up runs first, then at least ``min_runs`` timed
single-image runs and at least ``min_seconds`` of them, with the runtime's thread count fixed
and reported. A model that cannot be benchmarked (unknown format, wrong input or class count,
missing runtime) becomes a row with ``status: "failed"`` and the reason; the others still run.

The JSON written by :func:`BenchReport.to_dict` follows ``edgekd/schemas/bench-1.json``.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgekd.checkpoint import chosen_input_size, load_model
from edgekd.data import ImageData, load_data
from edgekd.deployable import app_pixels
from edgekd.errors import EdgeKDError, first_line
from edgekd.export import resolve_data
import edgekd.rundir as rundir
from edgekd.runtime import Loaded, load_runtime, read_sidecar, source_checkpoint, SUFFIX_FORMAT
from edgekd.timing import LatencyStats, time_calls
from edgekd.zoo import model_cost

SCHEMA = "edgekd.bench/1"


# ---------------------------------------------------------------------------------------------
# Rows and the report.


@dataclass(frozen=True)
class Delta:
    """``row`` against a reference row: positive ``acc_pts`` means more accurate, ``speedup`` > 1 faster."""

    against: str
    acc_pts: float
    speedup: float | None
    size_reduction_pct: float
    compression: float


@dataclass(frozen=True)
class BenchRow:
    name: str
    path: str
    role: str  # teacher, student, variant
    status: str  # ok, failed
    error: str | None = None
    format: str | None = None
    runtime: str | None = None
    precision: str | None = None
    size_bytes: int | None = None
    params: int | None = None
    macs: int | None = None
    top1: float | None = None
    top5: float | None = None
    agreement: float | None = None  # % of test images with the teacher's top-1
    per_class: tuple[float, ...] | None = None
    confusion: tuple[tuple[int, ...], ...] | None = None
    latency: LatencyStats | None = None
    throughput_ips: float | None = None
    batch: int | None = None
    vs_teacher: Delta | None = None
    vs_fp32: Delta | None = None
    warnings: tuple[str, ...] = ()
    source: str | None = None
    init: str | None = None  # torchvision backbones: ImageNet weights or random init, and what trained


@dataclass(frozen=True)
class BenchReport:
    data: dict
    settings: dict
    env: dict
    rows: tuple[BenchRow, ...]
    teacher: str | None
    focus: str | None  # the student variant the confusion plots compare with the teacher
    histories: dict = field(default_factory=dict)  # row name -> per-epoch history of its run

    @property
    def failed(self) -> list[BenchRow]:
        return [r for r in self.rows if r.status != "ok"]

    def row(self, name: str | None) -> BenchRow | None:
        return next((r for r in self.rows if r.name == name), None)

    def to_dict(self) -> dict:
        def conv(obj):
            if isinstance(obj, (LatencyStats, Delta)):
                return {k: getattr(obj, k) for k in obj.__dataclass_fields__}
            if isinstance(obj, tuple):
                return [conv(v) for v in obj]
            return obj

        rows = [{k: conv(getattr(r, k)) for k in r.__dataclass_fields__} for r in self.rows]
        return {"schema": SCHEMA, "data": self.data, "settings": self.settings, "env": self.env,
                "teacher": self.teacher, "focus": self.focus, "models": rows, "histories": self.histories}


@dataclass(frozen=True)
class ModelSpec:
    path: Path
    name: str
    role: str  # teacher, student, variant


def collect_models(models: list[str | Path], teacher: str | Path | None = None) -> tuple[list[ModelSpec], str | None]:
    """Expand run directories into their models; return the specs and the reference teacher's name.

    A pipeline run directory gives its teachers, students and deploy files, with the teacher of
    best validation accuracy as the reference; a training run directory gives its ``best.pt``;
    an export directory gives its model files.
    """
    specs: list[ModelSpec] = []
    reference = None
    for m in models:
        p = Path(m)
        if p.is_dir():
            found, ref = _expand_dir(p)
            if not found:
                raise EdgeKDError(f"{p} holds no models (.pt, .onnx, .tflite); give model files or a run directory")
            specs += found
            reference = reference or ref
        else:
            specs.append(ModelSpec(p, _name(p), "student" if SUFFIX_FORMAT.get(p.suffix) == "pytorch" else "variant"))
    if teacher is not None:
        t = Path(teacher)
        match = next((s for s in specs if s.path.resolve() == t.resolve()), None)
        if match is None:
            match = ModelSpec(t, _name(t), "teacher")
            specs.insert(0, match)
        specs = [ModelSpec(s.path, s.name, "teacher") if s is match else s for s in specs]
        reference = match.name
    names = [s.name for s in specs]
    specs = [ModelSpec(s.path, s.name if names.count(s.name) == 1 else str(s.path), s.role) for s in specs]
    if reference and reference not in {s.name for s in specs}:
        reference = next((s.name for s in specs if s.role == "teacher"), None)
    return specs, reference


def _name(p: Path) -> str:
    return f"{p.parent.name}/{p.name}" if p.name in rundir.CHECKPOINT_NAMES else p.name


def _expand_dir(p: Path) -> tuple[list[ModelSpec], str | None]:
    specs: list[ModelSpec] = []
    if rundir.is_pipeline_run(p):
        specs += [ModelSpec(run, run.parent.name, "teacher") for run in rundir.teacher_checkpoints(p)]
        best_teacher = rundir.best_teacher(p)
        ref = rundir.run_of(best_teacher).name if best_teacher else None
        specs += [ModelSpec(run, run.parent.name, "student") for run in rundir.student_checkpoints(p)]
        deploy = rundir.deploy_dir(p)
        specs += [ModelSpec(f, f"{deploy.name}/{f.name}", "variant") for f in _model_files(deploy)] if deploy.is_dir() else []
        return specs, ref
    if rundir.is_training_run(p):
        return [ModelSpec(rundir.best(p), p.name, "student")], None
    return [ModelSpec(f, f.name, "student" if f.suffix == ".pt" else "variant") for f in _model_files(p)], None


def _model_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix in (".onnx", ".tflite") and not f.name.startswith("."))


def bench(
    models: list[str | Path],
    *,
    data=None,
    teacher: str | Path | None = None,
    threads: int = 1,
    batch: int = 32,
    min_runs: int = 50,
    min_seconds: float = 1.0,
    warmup: int = 10,
    on_step: Callable[[str, int, int, dict], None] | None = None,
) -> BenchReport:
    """Benchmark every model (files or run directories) on the test split and against the teacher.

    Example (``runs/student`` and its ONNX file from ``edgekd.distill``'s and ``edgekd.export``'s examples):
        >>> from edgekd import bench
        >>> rep = bench(["runs/student/best.pt", "runs/student/export/model.onnx"], min_runs=5, min_seconds=0.1)
        >>> [(r.format, r.status) for r in rep.rows]
        [('pytorch', 'ok'), ('onnx', 'ok')]
        >>> rep.rows[0].top1 == rep.rows[1].top1  # the same test images, the same answers
        True
    """
    if threads < 1 or batch < 1 or min_runs < 1:
        raise EdgeKDError("--threads, --batch and --runs must be at least 1")
    specs, reference = collect_models(models, teacher)
    data = _resolve_bench_data(specs, data)
    x_u8, y = data.test_x, data.test_y.numpy()
    rows: list[BenchRow] = []
    preds: dict[str, np.ndarray] = {}
    for i, spec in enumerate(specs):
        if on_step:
            on_step("models", i, len(specs), {"name": spec.name})
        try:
            row, preds[spec.name] = _bench_one(spec, data, x_u8, y, threads, batch, min_runs, min_seconds, warmup)
        except EdgeKDError as exc:
            row = BenchRow(spec.name, str(spec.path), spec.role, "failed", str(exc))
        except ImportError as exc:
            row = BenchRow(spec.name, str(spec.path), spec.role, "failed",
                           f"runtime missing ({exc.name}): pip install 'edgekd[all]'")
        rows.append(row)
    if on_step:
        on_step("models", len(specs), len(specs), {})
    if reference in preds:  # agreement with the teacher's top-1, image by image
        rows = [dataclasses.replace(r, agreement=float((preds[r.name] == preds[reference]).mean() * 100.0))
                if r.name in preds else r for r in rows]
    by_name = {r.name: r for r in rows}
    rows = _with_deltas(rows, by_name.get(reference))
    focus = _focus(rows, reference)
    histories = {s.name: h for s in specs if (h := _history(s.path))}
    return BenchReport(
        {"name": data.name, "classes": list(data.classes), "test_images": int(len(y))},
        {"threads": threads, "batch": batch, "min_runs": min_runs, "min_seconds": min_seconds, "warmup": warmup},
        environment(), tuple(rows), reference if reference in by_name else None, focus, histories)


def _resolve_bench_data(specs: list[ModelSpec], data):

    if isinstance(data, ImageData):
        return data
    if data:
        return load_data(data)
    for s in specs:
        ckpts = [s.path] if s.path.suffix == ".pt" else []
        src = source_checkpoint(s.path, read_sidecar(s.path)) if s.path.suffix in (".onnx", ".tflite") else None
        for c in ckpts + ([src] if src else []):
            if rundir.config_file(rundir.run_of(c)).is_file():
                return resolve_data(c, None)
    raise EdgeKDError("no dataset recorded with these models; pass --data SPEC with the images they were trained on")


def _bench_one(spec, data, x_u8, y, threads, batch, min_runs, min_seconds, warmup):

    loaded = load_runtime(spec.path, threads)
    if loaded.classes is not None and list(loaded.classes) != list(data.classes):
        raise EdgeKDError(f"{spec.name} was trained on classes {list(loaded.classes)[:5]}..., the data has "
                          f"{list(data.classes)[:5]}...; pass the --data it was trained on")
    if loaded.channels not in (1, 3) or (loaded.channels == 1 and data.channels == 3):
        raise EdgeKDError(f"{spec.name} takes {loaded.channels}-channel input, the data has {data.channels} channels")
    x = app_pixels(x_u8, loaded.channels, loaded.input_size).numpy()  # (N, C, H, W) in [0, 1]
    scores = _scores(spec, loaded, x, data.num_classes)
    pred = scores.argmax(1)
    params, macs = loaded.params, loaded.macs
    if loaded.source is not None and params is None:
        params, macs = _source_cost(loaded.source)
    latency = time_calls(loaded.single(x[:1]), warmup=warmup, min_runs=min_runs, min_seconds=min_seconds,
                         threads=threads)
    xb = x[np.arange(batch) % len(x)]
    batch_stats = time_calls(loaded.batched(xb), warmup=2, min_runs=5, min_seconds=min(0.5, min_seconds),
                             threads=threads)
    acc = metrics(scores, y, data.num_classes)
    row = BenchRow(
        spec.name, str(spec.path), spec.role, "ok", None, loaded.format, loaded.runtime, loaded.precision,
        spec.path.stat().st_size, params, macs, acc["top1"], acc["top5"], None, acc["per_class"], acc["confusion"], latency, batch / (batch_stats.p50_ms / 1e3), batch,
        warnings=tuple(w for w in [_resize_warning(spec, loaded, data)] if w),
        source=str(loaded.source) if loaded.source else None, init=_backbone_init(loaded.source or spec.path))
    return row, pred


def _scores(spec: ModelSpec, loaded: Loaded, x: np.ndarray, num_classes: int) -> np.ndarray:
    """The model's (N, K) scores on the test images; a runtime error or non-finite output is the row's failure."""
    try:
        scores = np.asarray(loaded.predict(x))
    except EdgeKDError:
        raise
    except Exception as exc:  # noqa: BLE001 - the runtime refusing a user's file is a finding, not a crash
        raise EdgeKDError(f"{loaded.runtime} failed running {spec.path.name} ({first_line(exc)}); "
                          "the file may be damaged: export it again") from None
    if scores.ndim != 2 or scores.shape[1] != num_classes:
        raise EdgeKDError(f"{spec.name} outputs {scores.shape[1:]} scores per image, the data has "
                          f"{num_classes} classes")
    if not np.isfinite(scores).all():
        raise EdgeKDError(f"{spec.path.name} outputs NaN or infinite scores; its weights are damaged: export it again")
    return scores


def _resize_warning(spec: ModelSpec, loaded: Loaded, data) -> str | None:
    """A warning when the model's input size differs from the data's images, unless its run chose that
    size on purpose (``model.input_size`` in its config.json): resized images can score near chance."""

    model_hw, data_hw = tuple(loaded.input_size), tuple(data.image_size)
    if model_hw == data_hw:
        return None
    ckpt = loaded.source or (spec.path if spec.path.suffix in (".pt", ".pth") else None)
    if ckpt is not None and chosen_input_size(ckpt) == model_hw:
        return None
    return (f"{spec.name}: model input is {model_hw[0]}x{model_hw[1]} pixels but the {data.name} images are "
            f"{data_hw[0]}x{data_hw[1]}; they were resized to fit, so this accuracy may mean little: "
            "benchmark it on the data it was trained on (--data)")


def _backbone_init(ckpt: Path) -> str | None:
    """How the torchvision backbone of a checkpoint started, from its run's config.json (None otherwise)."""

    model = rundir.recorded_config(ckpt).get("model", {}) if Path(ckpt).suffix == ".pt" else {}
    if not str(model.get("arch", "")).startswith(("torchvision:", "timm:")):
        return None
    start = ("ImageNet weights" + (f" from {model['weights_path']}" if model.get("weights_path") else "")
             if model.get("pretrained") or model.get("weights_path") else "random init (no ImageNet weights)")
    n = model.get("trainable_layers")
    trained = f"last {n} layers and the head trained, the rest frozen" if n is not None else "all layers trained"
    return f"{model['arch']} from {start}; {trained}"


_COSTS: dict[str, tuple[int, int]] = {}


def _source_cost(ckpt: Path) -> tuple[int, int]:
    key = str(ckpt.resolve())
    if key not in _COSTS:

        model, meta = load_model(ckpt)
        _COSTS[key] = model_cost(model, int(meta["in_channels"]), tuple(meta["input_size"]))
    return _COSTS[key]


def metrics(scores: np.ndarray, y: np.ndarray, num_classes: int) -> dict:
    """Top-1, top-5 (more than 5 classes only), per-class accuracy and the confusion matrix (scikit-learn)."""
    from sklearn.metrics import confusion_matrix, top_k_accuracy_score

    labels = np.arange(num_classes)
    cm = confusion_matrix(y, scores.argmax(1), labels=labels)  # rows: true class, columns: predicted
    totals = cm.sum(1)
    per_class = tuple(float(c / t * 100.0) if t else None for c, t in zip(np.diag(cm), totals))  # None: class absent
    top5 = float(top_k_accuracy_score(y, scores, k=5, labels=labels) * 100.0) if num_classes > 5 else None
    return {"top1": float(np.trace(cm) / max(1, cm.sum()) * 100.0), "top5": top5, "per_class": per_class,
            "confusion": tuple(tuple(int(v) for v in r) for r in cm)}


def delta(row: BenchRow, ref: BenchRow) -> Delta:
    """Accuracy change in points, speed-up (reference p50 / row p50), size reduction and compression."""
    speed = ref.latency.p50_ms / row.latency.p50_ms if row.latency and ref.latency else None
    return Delta(ref.name, row.top1 - ref.top1, speed, (1.0 - row.size_bytes / ref.size_bytes) * 100.0,
                 ref.size_bytes / row.size_bytes)


def fp32_counterpart(row: BenchRow, rows: list[BenchRow]) -> BenchRow | None:
    """The fp32 model an int8 (or exported) row came from: same format and folder, else its checkpoint."""
    ok = [r for r in rows if r.status == "ok" and r is not row]
    if row.precision == "int8":
        same = [r for r in ok if r.format == row.format and r.precision == "fp32"
                and Path(r.path).parent == Path(row.path).parent]
        if same:
            return same[0]
    if row.format != "pytorch" and row.source:
        return next((r for r in ok if r.format == "pytorch" and Path(r.path).resolve() == Path(row.source).resolve()), None)
    return None


def _with_deltas(rows: list[BenchRow], teacher: BenchRow | None) -> list[BenchRow]:
    out = []
    for r in rows:
        if r.status != "ok":
            out.append(r)
            continue
        vs_t = delta(r, teacher) if teacher is not None and teacher.status == "ok" and r is not teacher else None
        if vs_t is not None and r.runtime != teacher.runtime:  # a LiteRT student against an eager PyTorch
            vs_t = dataclasses.replace(vs_t, speedup=None)    # teacher would credit the runtime, not the model
        base = fp32_counterpart(r, rows)
        vs_f = delta(r, base) if base is not None else None
        warnings = list(r.warnings)
        if r.precision == "int8" and vs_f is not None and vs_f.speedup is not None and vs_f.speedup < 1.0:
            warnings.append(_slow_int8_warning(r, base, vs_f))
        out.append(dataclasses.replace(r, vs_teacher=vs_t, vs_fp32=vs_f, warnings=tuple(warnings)))
    return out


def _slow_int8_warning(row: BenchRow, base: BenchRow, d: Delta) -> str:
    size = f" ({row.macs / 1e6:.2f} M multiply-accumulates per image)" if row.macs else ""
    cause = (f"likely cause: on a model this small{size}, the quantize/dequantize steps and per-operator overhead "
             "cost more than int8 arithmetic saves" if not row.macs or row.macs < 100e6 else
             "likely cause: operators without fast int8 kernels on this CPU fall back to float around QDQ pairs")
    return (f"{row.name}: int8 p50 {row.latency.p50_ms:.3f} ms is {1 / d.speedup:.2f}x slower than fp32 "
            f"{base.name} ({base.latency.p50_ms:.3f} ms); {cause}")


def _focus(rows: list[BenchRow], teacher: str | None) -> str | None:
    ok = [r for r in rows if r.status == "ok" and r.name != teacher]
    int8 = [r for r in ok if r.precision == "int8"]
    pool = int8 or ok
    return max(pool, key=lambda r: r.top1).name if pool else None


def _history(path: Path) -> list[dict] | None:
    f = rundir.history_file(rundir.run_of(path)) if path.suffix == ".pt" else None
    if f is None or not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


def environment() -> dict:
    """CPU model, the instruction-set flags that matter for int8 and float kernels, and runtime versions."""
    from importlib.metadata import PackageNotFoundError, version

    cpu, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                                     "avx512_bf16", "amx_int8", "amx_bf16", "neon", "asimddp") if f in have]
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("edgekd", "torch", "onnxruntime", "ai-edge-litert", "tensorflow", "numpy"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    import os

    return {"cpu": cpu, "machine": platform.machine(), "cpu_flags": flags, "logical_cpus": os.cpu_count(),
            "python": platform.python_version(), "os": platform.platform(), "versions": versions}
