"""The whole experiment from one config: the only module that knows the order of the stages.

Teachers trained (or loaded from files), a scratch student, the student distilled from the best
teacher and from all of them, every one in its own resumable run directory; then the best
student exported and quantized to int8 ONNX and TFLite, every model benchmarked against the
teacher (``<out>/bench/report.html``), the int8 model packaged for apps (``<out>/bundle``), and
a manifest (``<out>/manifest.json``) that traces every artifact to its config, data and seeds.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from edgekd.config import DataConfig, DistillConfig, KDConfig, ModelConfig, RecipeConfig, build, check_fields, load_toml
from edgekd.errors import EdgeKDError
from edgekd.files import atomic_write_json, clean_stale_temps, sha256_file
from edgekd.bench import bench, environment, SUFFIX_FORMAT
from edgekd.data import load_data
from edgekd.distill import check_mixing, matched_scratch, same_config, train
from edgekd.export import export
from edgekd.package import package
from edgekd.quantize import TARGETS, quantize, result_dict
from edgekd.report import write_bench_report
import edgekd.rundir as rundir


@dataclass(frozen=True)
class TeacherEntry:
    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    file: str | None = None  # a ready teacher (any supported format) instead of training one


@dataclass(frozen=True)
class DeployConfig:
    quantize: bool = True  # export + int8-quantize the best student (by validation accuracy)
    formats: tuple[str, ...] = ("onnx", "tflite")
    calib_size: int = 300  # class-stratified training images for int8 calibration
    io: str = "float32"  # TFLite input/output type; float32 loads in MediaPipe and the Task Library
    # int8 accuracy gate in top-1 points against fp32: a model that loses more is not packaged and
    # the run exits 2 (the files stay, marked failed). A 1-point budget is what phone apps usually accept.
    max_drop: float | None = 1.0
    target: str = "arm"  # the CPU the int8 files will run on (edgekd.quantize.TARGETS): sets the ONNX weight range
    # When post-training int8 misses max_drop: quantize again after this many epochs of quantization-aware
    # fine-tuning (edgekd.qat), taught by the run's best teacher; 0 never fine-tunes.
    qat_epochs: int = 3

    def __post_init__(self) -> None:
        check_fields(self, {"formats": ("each", ("choice", ("onnx", "tflite"))), "calib_size": ("min", 1),
                            "io": ("choice", ("float32", "uint8", "int8")), "max_drop": ("min", 0.0),
                            "target": ("choice", tuple(TARGETS)), "qat_epochs": ("min", 0)})


@dataclass(frozen=True)
class BenchConfig:
    enabled: bool = True
    threads: int = 1  # batch-1 latency on one thread: what a phone app's single inference thread sees, and short tails
    batch: int = 32  # images per call for the throughput column
    min_runs: int = 50  # LiteRT benchmark_model's default run count
    min_seconds: float = 1.0

    def __post_init__(self) -> None:
        check_fields(self, {"threads": ("min", 1), "batch": ("min", 1), "min_runs": ("min", 1), "min_seconds": ("min", 0.0)})


@dataclass(frozen=True)
class PackageConfig:
    enabled: bool = True
    precision: str = "int8"  # int8 inside, float32 input: what MediaPipe and the Task Library load
    zip: bool = False

    def __post_init__(self) -> None:
        check_fields(self, {"precision": ("choice", ("int8", "fp32"))})


@dataclass(frozen=True)
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teachers: tuple[TeacherEntry, ...] = ()
    student: ModelConfig = field(default_factory=ModelConfig)
    student_recipe: RecipeConfig = field(default_factory=RecipeConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    # Which student runs to make. scratch_matched is the fair control of the KD runs: no teacher, the
    # same student passes and augmentation (edgekd.distill.matched_scratch).
    students: tuple[str, ...] = ("scratch", "scratch_matched", "kd_best", "kd_all")
    # Student runs are repeated with seeds student_recipe.seed, +1, ...: KD's gain over the matched twin is
    # reported as mean +- sd over them (test split). Only the first seed's models are exported and benchmarked.
    seeds: int = 1
    deploy: DeployConfig = field(default_factory=DeployConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    package: PackageConfig = field(default_factory=PackageConfig)


STUDENT_RUNS = ("scratch", "scratch_matched", "kd_best", "kd_all")


def pipeline_config_from_dict(values: dict[str, Any]) -> PipelineConfig:
    """Validate a parsed TOML document; unknown sections and keys are errors naming them."""
    allowed = {"data", "teachers", "student", "student_recipe", "kd", "students", "seeds", "deploy", "bench", "package"}
    unknown = [k for k in values if k not in allowed]
    if unknown:
        raise EdgeKDError(f"unknown section [{unknown[0]}]; valid sections: {', '.join(sorted(allowed))}")
    teachers = []
    raw_teachers = values.get("teachers", [])
    if not isinstance(raw_teachers, list) or not all(isinstance(t, dict) for t in raw_teachers):
        raise EdgeKDError("teachers must be [[teachers]] tables, each with a name and a model or a file")
    for i, t in enumerate(raw_teachers):
        t = dict(t)
        extra = [k for k in t if k not in ("name", "model", "recipe", "file")]
        if extra:
            raise EdgeKDError(f"unknown key teachers[{i}].{extra[0]}; valid keys: name, model, recipe, file")
        if "name" not in t:
            raise EdgeKDError(f"teachers[{i}] needs a name")
        if not isinstance(t["name"], str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", t["name"]):
            raise EdgeKDError(f"teachers[{i}].name must be letters, digits, '_', '-' or '.' (a folder name), "
                              f"got {t['name']!r}")
        if t.get("file") is not None and not isinstance(t["file"], str):
            raise EdgeKDError(f"teachers[{i}].file must be a string (a path), got {t['file']!r}")
        teachers.append(TeacherEntry(t["name"], build(ModelConfig, t.get("model", {}), f"teachers[{i}].model"),
                                     build(RecipeConfig, t.get("recipe", {}), f"teachers[{i}].recipe"), t.get("file")))
    if not teachers:
        raise EdgeKDError("the config names no teachers; add at least one [[teachers]] table")
    kd = build(KDConfig, values.get("kd", {}), "kd")
    if kd.teachers:
        raise EdgeKDError("kd.teachers is set by the pipeline; list teachers as [[teachers]] tables instead")
    if kd.teacher_weights and len(kd.teacher_weights) != len(teachers):
        raise EdgeKDError(f"kd.teacher_weights has {len(kd.teacher_weights)} weights for {len(teachers)} teachers; "
                          "give one per [[teachers]] table, in their order")
    students = values.get("students", STUDENT_RUNS)
    if not isinstance(students, list | tuple) or not all(isinstance(s, str) for s in students):
        raise EdgeKDError(f"students must be a list of names, got {students!r}")
    students = tuple(students)
    bad = [s for s in students if s not in STUDENT_RUNS]
    if bad:
        raise EdgeKDError(f"unknown student run {bad[0]!r}; choose from {', '.join(STUDENT_RUNS)}")
    seeds = values.get("seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise EdgeKDError(f"seeds must be an integer of at least 1, got {seeds!r}")
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise EdgeKDError("teacher names must be unique")
    student_recipe = build(RecipeConfig, values.get("student_recipe", {}), "student_recipe")
    if any(name.startswith("kd") for name in students):  # refused now, not after the teachers have trained
        check_mixing(student_recipe, kd, "student_recipe")
    return PipelineConfig(build(DataConfig, values.get("data", {}), "data"), tuple(teachers),
                          build(ModelConfig, values.get("student", {}), "student"), student_recipe, kd, students, seeds,
                          build(DeployConfig, values.get("deploy", {}), "deploy"),
                          build(BenchConfig, values.get("bench", {}), "bench"),
                          build(PackageConfig, values.get("package", {}), "package"))


def load_pipeline_config(path: str | Path | None = None, overrides: tuple[str, ...] = ()) -> PipelineConfig:
    """Load a pipeline TOML, or the embedded default (digits, two teachers) when ``path`` is None.

    ``overrides`` are ``dotted.key=value`` strings (TOML values), e.g. ``student_recipe.epochs=3``
    or ``teachers.0.recipe.epochs=5``; they are applied before validation, so typos are errors.
    """
    import tomllib

    if path is None:
        values = tomllib.loads(resources.files("edgekd").joinpath("configs/default.toml").read_text())
    else:
        values = load_toml(path)
    for item in overrides:
        _override(values, item)
    return pipeline_config_from_dict(values)


def _override(values: dict, item: str) -> None:
    import tomllib

    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise EdgeKDError(f"--set {item!r}: write KEY=VALUE, e.g. --set student_recipe.epochs=3")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word is a string
    parts = key.strip().split(".")
    node = values
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise EdgeKDError(f"--set {key}: {'.'.join(parts[:i])} has no item {part}")
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        if not isinstance(node, dict | list):
            raise EdgeKDError(f"--set {key}: {'.'.join(parts[:i + 1])} is a value, not a table of keys")
    if isinstance(node, list):
        raise EdgeKDError(f"--set {key}: give an item index before the key")
    node[parts[-1]] = value


@dataclass(frozen=True)
class RunRow:
    name: str
    role: str  # teacher, student
    arch: str
    params: int
    val_acc: float
    test_acc: float
    train_s: float
    out_dir: str


@dataclass(frozen=True)
class PipelineResult:
    rows: tuple[RunRow, ...]
    deployed: dict | None  # edgekd.quantize.result_dict of the best student, when deploy.quantize
    bench: object | None = None  # edgekd.bench.BenchReport of every model, when bench.enabled
    bundle: object | None = None  # edgekd.package.PackageResult, when package.enabled
    kd_gain: dict = field(default_factory=dict)  # per KD run: test top-1 minus the matched twin's, per seed (kd_gains)


def run(config: str | Path | PipelineConfig | None = None, out_dir: str | Path = "runs/default", *,
        overrides: tuple[str, ...] = (), resume: bool = False, on_stage: Callable[[str], None] | None = None,
        on_step=None) -> PipelineResult:
    """``edgekd run``: the whole chain from a pipeline TOML (``None``: the embedded default on digits),
    with ``dotted.key=value`` overrides; see ``run_pipeline`` for what ``resume`` skips.

    Example (the embedded default, made small):
        >>> from pathlib import Path
        >>> from edgekd import run
        >>> quick = ("seeds=1", "teachers.0.recipe.epochs=2", "teachers.1.recipe.epochs=2", "student_recipe.epochs=3")
        >>> res = run(None, "runs/quick", overrides=quick)
        >>> [r.name for r in res.rows]
        ['resnet_m', 'seed002_teacher', 'scratch', 'scratch_matched', 'kd_best', 'kd_all']
        >>> (Path("runs/quick") / "manifest.json").is_file(), [m["format"] for m in res.deployed["models"]]
        (True, ['onnx', 'tflite'])
    """
    cfg = config if isinstance(config, PipelineConfig) else load_pipeline_config(config, overrides)
    if isinstance(config, PipelineConfig) and overrides:
        raise EdgeKDError("overrides apply to a TOML file or the embedded default, not to a PipelineConfig object")
    return run_pipeline(cfg, out_dir, resume=resume, on_stage=on_stage, on_step=on_step)


def run_pipeline(cfg: PipelineConfig, out_dir: str | Path, *, resume: bool = False,
                 on_stage: Callable[[str], None] | None = None, on_step=None) -> PipelineResult:
    """Train or load the teachers, then the student runs, then export, quantize, bench and package.

    ``out_dir`` must be new or empty unless ``resume``: then completed stages whose config is
    unchanged are skipped, an interrupted training continues from its last epoch, and the
    rest is redone.
    """

    out = Path(out_dir)
    if not resume and out.is_dir() and any(out.iterdir()):
        raise EdgeKDError(f"{out} already holds a run; pass --resume to continue it (finished stages are skipped) "
                          "or choose another --out")
    clean_stale_temps(out)  # orphans of a killed run in the run's top folder (each stage cleans its own)
    d = cfg.data
    data = load_data(d.dataset, data_dir=d.data_dir, download=d.download, val_fraction=d.val_fraction,
                     test_fraction=d.test_fraction, image_size=d.image_size, seed=d.split_seed)
    if on_step:
        on_step("data", 0, 0, {"name": data.name, "summary": data.summary})
    rows: list[RunRow] = []
    teacher_files: list[tuple[str, str, float]] = []
    for t in cfg.teachers:
        if t.file:
            if not Path(t.file).exists():
                raise EdgeKDError(f"teacher file not found: {t.file} (teachers '{t.name}')")
            teacher_files.append((t.name, t.file, float("nan")))
            continue
        run_cfg = DistillConfig(data=cfg.data, model=t.model, recipe=t.recipe)
        row = _run_one(train, run_cfg, rundir.teacher_run(out, t.name), t.name, "teacher", data, on_stage, on_step)
        rows.append(row)
        teacher_files.append((t.name, str(rundir.best(rundir.teacher_run(out, t.name))), row.val_acc))
    ranked = [f[1] for f in sorted(teacher_files, key=lambda f: -f[2] if f[2] == f[2] else 0.0)]
    by_seed = [_student_runs(cfg, rundir.seed_root(out, k), k, ranked,
                             tuple(f[1] for f in teacher_files), data, on_stage, on_step) for k in range(cfg.seeds)]
    rows += by_seed[0]
    gains = kd_gains(by_seed)

    deployed = (_deploy(cfg.deploy, rows, data, rundir.deploy_dir(out), ranked[0] if ranked else None, on_stage)
                if cfg.deploy.quantize else None)
    atomic_write_json(rundir.summary_file(out), {"models": [r.__dict__ for r in rows], "kd_gain_over_matched_scratch": gains,
                                             "deployed": deployed})
    report = _bench(cfg.bench, out, data, teacher_files, on_stage, on_step) if cfg.bench.enabled else None
    bundle = None
    if cfg.package.enabled and deployed and "tflite" in cfg.deploy.formats and deployed["passed"]:

        if on_stage:
            on_stage(f"package: {cfg.package.precision} bundle for apps, verified in LiteRT, MediaPipe and onnxruntime")
        bundle = package(out, out_dir=rundir.bundle_dir(out), precision=cfg.package.precision, data=data,
                         make_zip=cfg.package.zip, bench_runs=cfg.bench.min_runs, bench_seconds=cfg.bench.min_seconds,
                         bench_report=report,
                         on_step=on_stage)
    write_manifest(cfg, out, data)
    return PipelineResult(tuple(rows), deployed, report, bundle, gains)


def _student_runs(cfg: PipelineConfig, out: Path, offset: int, ranked: list[str], all_files: tuple[str, ...],
                  data, on_stage, on_step) -> list[RunRow]:
    """The student runs of one seed (``student_recipe.seed + offset``), each in ``out/students/NAME``."""

    recipe = dataclasses.replace(cfg.student_recipe, seed=cfg.student_recipe.seed + offset)
    base = DistillConfig(data=cfg.data, model=cfg.student, recipe=recipe)
    kd_best = dataclasses.replace(base, kd=dataclasses.replace(cfg.kd, teachers=(ranked[0],), teacher_weights=()))
    runs = {"scratch": base, "scratch_matched": matched_scratch(kd_best), "kd_best": kd_best,
            "kd_all": dataclasses.replace(base, kd=dataclasses.replace(cfg.kd, teachers=all_files))}
    suffix = f" (seed {recipe.seed})" if offset else ""
    return [_run_one(train, runs[name], rundir.student_run(out, name), name + suffix, "student", data, on_stage, on_step,
                     cache_dir=rundir.teacher_cache(out))  # students share each teacher's outputs
            for name in cfg.students if name != "kd_all" or len(all_files) >= 2]


def kd_gains(by_seed: list[list[RunRow]]) -> dict:
    """Each KD run's test top-1 minus its matched scratch twin's, per seed, with mean and sd (points)."""
    import statistics

    gains: dict[str, list[float]] = {}
    for rows in by_seed:
        test = {Path(r.out_dir).name: r.test_acc for r in rows}  # students/NAME, whatever the seed
        for name in ("kd_best", "kd_all"):
            if name in test and "scratch_matched" in test:
                gains.setdefault(name, []).append(test[name] - test["scratch_matched"])
    return {name: {"per_seed": g, "mean": statistics.mean(g), "sd": statistics.stdev(g) if len(g) > 1 else None}
            for name, g in gains.items()}


def _bench(b: BenchConfig, out: Path, data, teacher_files, on_stage, on_step):
    """Every model of the run against the reference teacher: the best trained one, else the first file."""

    if on_stage:
        on_stage("bench: every model on the test split through its own runtime, against the teacher")
    files = [f for _, f, acc in teacher_files if acc != acc and Path(f).suffix.lower() in SUFFIX_FORMAT]
    trained = sorted((t for t in teacher_files if t[2] == t[2]), key=lambda t: -t[2])
    reference = ([f for _, f, _ in trained] or files or [None])[0]
    report = bench([*files, out], data=data, teacher=reference, threads=b.threads, batch=b.batch,
                   min_runs=b.min_runs, min_seconds=b.min_seconds, on_step=on_step)
    write_bench_report(report, rundir.bench_dir(out))
    return report


def write_manifest(cfg: PipelineConfig, out: Path, data) -> dict:
    """Seeds, library versions, config, data and calibration hashes, and every artifact's SHA-256."""

    artifacts = {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*"))
                 if p.is_file() and p != rundir.manifest_file(out) and not any(part.startswith(".") for part in p.relative_to(out).parts)}
    quant = rundir.quantize_summary(rundir.deploy_dir(out))
    calib = json.loads(quant.read_text())["calibration"]["sha256"] if quant.is_file() else None
    seeds = {"split_seed": cfg.data.split_seed, "student_seed": cfg.student_recipe.seed,
             **{f"teacher_{t.name}_seed": t.recipe.seed for t in cfg.teachers if not t.file}}
    manifest = {"config": json.loads(json.dumps(dataclasses.asdict(cfg))), "seeds": seeds,
                "data": {"name": data.name, "fingerprint": data.fingerprint(), "classes": list(data.classes),
                         "train": len(data.train_y), "val": len(data.val_y), "test": len(data.test_y)},
                "calibration_sha256": calib, "environment": environment(), "artifacts": artifacts}
    atomic_write_json(rundir.manifest_file(out), manifest)
    return manifest


def _deploy(deploy: DeployConfig, rows: list[RunRow], data, out: Path, teacher: str | None, on_stage) -> dict | None:
    """The student with the best validation accuracy exported (stage 2: ONNX, checked against PyTorch),
    then that file quantized to int8 ONNX/TFLite (stage 3); skipped when up to date. When post-training
    int8 misses the gate, quantized again after quantization-aware fine-tuning taught by ``teacher``."""

    students = [r for r in rows if r.role == "student"]
    if not students:
        return None
    best = max(students, key=lambda r: r.val_acc)
    ckpt = rundir.best(best.out_dir)
    stamp = {"checkpoint": str(ckpt), "mtime_ns": ckpt.stat().st_mtime_ns, **dataclasses.asdict(deploy)}
    stamp = json.loads(json.dumps(stamp))
    report, done = rundir.quantize_summary(out), rundir.deploy_stamp(out)
    if report.is_file() and done.is_file() and json.loads(done.read_text()) == stamp:
        if on_stage:
            on_stage(f"deploy {best.name}: done before, skipped")
        before = rundir.post_training_file(out)
        post_training = json.loads(before.read_text()) if before.is_file() else None
        return {"student": best.name, **json.loads(report.read_text()), "post_training": post_training}
    if on_stage:
        on_stage(f"deploy {best.name}: export to ONNX, then int8 quantization ({', '.join(deploy.formats)})")
    done.unlink(missing_ok=True)  # until this deploy finishes, nothing in out/ is "done before"
    source = export(ckpt, ("onnx",), out_dir=out, data=data).artifacts[0].path if "onnx" in deploy.formats else ckpt
    settings = dict(data=data, formats=deploy.formats, calib_size=deploy.calib_size, io=deploy.io,
                    max_drop=deploy.max_drop, target=deploy.target, out_dir=out)
    result = quantize(source, **settings)
    post_training = None
    if not result.passed and deploy.qat_epochs:
        post_training = result_dict(result)
        if on_stage:
            worst = max(result.models, key=lambda m: m.drop_pts)
            on_stage(f"deploy {best.name}: post-training int8 {worst.format} lost {worst.drop_pts:.2f} points; "
                     f"quantization-aware fine-tuning, {deploy.qat_epochs} epochs")
        result = quantize(source, qat_epochs=deploy.qat_epochs, teacher=teacher, **settings)
    atomic_write_json(rundir.post_training_file(out), post_training)  # the gate's first verdict when QAT followed, else null
    atomic_write_json(done, stamp)
    return {"student": best.name, **result_dict(result), "post_training": post_training}


def _run_one(train, run_cfg, run_dir: Path, name, role, data, on_stage, on_step, cache_dir=None) -> RunRow:
    result_file, config_file = rundir.result_file(run_dir), rundir.config_file(run_dir)
    # the same run, also when it was saved before a config field existed (edgekd.distill.same_config)
    same = config_file.is_file() and same_config(json.loads(config_file.read_text()), run_cfg)
    done = result_file.is_file() and same
    if done:
        if on_stage:
            on_stage(f"{role} {name}: done before, skipped")
        res = json.loads(result_file.read_text())
    else:
        if on_stage:
            on_stage(f"{role} {name}: training {run_cfg.model.arch}")
        resume = rundir.last(run_dir).is_file()
        if resume and not same:
            raise EdgeKDError(f"{run_dir} holds a run with another config; remove it or use a new --out")
        res = train(run_cfg, run_dir, resume=resume, data=data, on_step=on_step, cache_dir=cache_dir).summary()
        for warning in res.get("warnings", ()):
            if on_stage:
                on_stage(f"warning: {role} {name}: {warning}")
    return RunRow(name, role, res["arch"], res["params"], res["best_val_acc"], res["test_acc"], res["train_s"], str(run_dir))
