"""Stage 5: a bundle a mobile app loads as is, proven by loading it back.

The bundle holds ``model.tflite`` with TFLite metadata (one mean/std over 0-255 pixels and the
labels file, zipped into the model as MediaPipe expects), the ONNX files, ``labels.txt``,
``model.json`` (everything an app needs to feed the model), ``MODEL_CARD.md``, ``README.md`` with
Kotlin and Swift snippets for this exact model, ``SHA256SUMS`` and the ``.edgekd-bundle`` marker
listing the files edgekd wrote. It is written to a temporary folder, loaded back through LiteRT,
MediaPipe's ImageClassifier and onnxruntime on real test images, and only then moved into place:
into a new or empty folder, or over an earlier bundle, whose listed files alone are replaced.
"""

from __future__ import annotations

import io
import dataclasses
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgekd.files import Journal, clean_stale_temps, read_json, sha256_file, temp_dir
from edgekd.errors import EdgeKDError
from edgekd.native import quiet_native_logs
from edgekd.version import __version__
from edgekd.bench import bench
from edgekd.data import to_unit
from edgekd.export import resolve_data
from edgekd.runtime import count_tflite_ops, nhwc_array, run_onnx, TFLiteRunner
from edgekd.report import bench_markdown
from edgekd.zoo import fit_input
import edgekd.rundir as rundir

BUNDLE_SCHEMA = "edgekd.bundle/1"
PRECISIONS = {"int8": "model_int8.tflite", "fp32": "model_fp32.tflite"}
ONNX_FILES = ("model.onnx", "model_int8.onnx")
VERIFY_IMAGES = 32  # real test images pushed through MediaPipe's ImageClassifier


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class PackageResult:
    out_dir: Path
    files: tuple[str, ...]
    checks: tuple[Check, ...]
    zip_path: Path | None

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    def description(self) -> dict:
        """The bundle's ``model.json``: input, output, quantization, measured accuracy and latency."""
        return read_json(self.out_dir / "model.json")


# ---------------------------------------------------------------------------------------------
# Finding the model files.


@dataclass(frozen=True)
class Sources:
    tflite: Path
    onnx: tuple[Path, ...]
    checkpoint: Path | None
    sidecar: dict
    teacher: Path | None


def locate(source: str | Path, precision: str = "int8", labels: str | Path | None = None) -> Sources:
    """The TFLite file (and ONNX files, checkpoint, teacher) to bundle from a run, checkpoint or file."""
    if precision not in PRECISIONS:
        raise EdgeKDError(f"unknown --precision {precision!r}; choose int8 or fp32")
    src = Path(source)
    if not src.exists():
        raise EdgeKDError(f"not found: {src}")
    teacher = None
    if src.suffix == ".tflite":
        tflite, folder = src, src.parent
    else:
        run_dir = src.is_dir() and rundir.is_pipeline_run(src)
        if run_dir:  # an `edgekd run` directory
            folder = rundir.deploy_dir(src)
            teacher = rundir.best_teacher(src)
        elif src.is_dir() and rundir.is_training_run(src):
            folder = rundir.export_dir(rundir.best(src))
        elif src.suffix == ".pt":
            folder = rundir.export_dir(src)
        else:
            raise EdgeKDError(f"{src} is not a run directory, an edgekd checkpoint or a .tflite file")
        tflite = folder / PRECISIONS[precision]
        if not tflite.is_file():
            hint = ("edgekd run (with [deploy] quantize = true)" if run_dir else
                    f"edgekd {'quantize' if precision == 'int8' else 'export'} {src}")
            raise EdgeKDError(f"no {precision} model yet: {tflite} does not exist; run `{hint}` first"
                              + (" (or package the float model with --precision fp32)" if precision == "int8" else ""))
    side = read_json(tflite.with_name(tflite.name + ".json"))
    if side.get("status") == "failed":
        raise EdgeKDError(f"{tflite} is marked failed by edgekd quantize (accuracy gate); fix it before packaging")
    ckpt = None
    if side.get("source_checkpoint"):
        c = (tflite.parent / side["source_checkpoint"]).resolve()
        ckpt = c if c.is_file() else None
    if teacher is None and ckpt is not None:
        teacher = _config_teacher(ckpt)
    onnx = tuple(folder / n for n in ONNX_FILES if (folder / n).is_file())
    return Sources(tflite, onnx, ckpt, side, teacher)


def _config_teacher(ckpt: Path) -> Path | None:
    teachers = rundir.recorded_config(ckpt).get("kd", {}).get("teachers", [])
    files = [Path(t) for t in teachers if Path(t).suffix in (".pt", ".onnx", ".tflite") and Path(t).is_file()]
    return files[0] if files else None


def read_labels(sources: Sources, labels: str | Path | None) -> list[str]:
    if labels is not None:
        path = Path(labels)
        if not path.is_file():
            raise EdgeKDError(f"labels file not found: {path}")
        names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    else:
        names = list(sources.sidecar.get("preprocessing", {}).get("classes") or [])
    if not names:
        raise EdgeKDError(f"no labels for {sources.tflite.name}: no edgekd sidecar names its classes; pass "
                          "--labels FILE with one class name per line, in the model's output order")
    return names


# ---------------------------------------------------------------------------------------------
# TFLite metadata, written with the flatbuffers schemas that LiteRT and MediaPipe ship.


def describe_tflite(path: Path) -> dict:
    """Input/output tensors of a .tflite file, checked for what MediaPipe's ImageClassifier accepts."""

    runner = TFLiteRunner(path)
    inp, out = runner.inp, runner.out
    shape, signature = [int(v) for v in inp["shape"]], [int(v) for v in inp.get("shape_signature", inp["shape"])]
    if len(shape) != 4 or signature[0] != 1:
        raise EdgeKDError(f"{path.name} has input shape {signature}; a bundle needs batch 1 (1, H, W, 3). "
                          "Re-export with this edgekd version, which writes batch-1 TFLite files")
    if shape[3] != 3:
        raise EdgeKDError(f"{path.name} takes {shape[3]} channels; MediaPipe needs RGB (1, H, W, 3) input. "
                          "Re-export with this edgekd version (gray models take RGB)")
    dtype = np.dtype(inp["dtype"]).name
    if dtype not in ("float32", "uint8"):
        raise EdgeKDError(f"{path.name} has {dtype} input, which MediaPipe and the TFLite Task Library refuse; "
                          "quantize with --io float32 (default) or --io uint8")
    out_shape = [int(v) for v in out["shape"]]
    if len(out_shape) != 2 or out_shape[0] != 1:
        raise EdgeKDError(f"{path.name} outputs shape {out_shape}; a classifier bundle needs (1, num_classes)")
    quantized, float_ops = count_tflite_ops(runner)
    q = runner.quantization()
    return {"input_name": inp["name"], "input_shape": shape, "input_dtype": dtype, "input_quantization": q["input"],
            "output_name": out["name"], "output_shape": out_shape, "output_dtype": np.dtype(out["dtype"]).name,
            "output_quantization": q["output"], "int8_ops": quantized, "float_compute_ops": float_ops}


def metadata_normalization(desc: dict) -> tuple[float, float] | None:
    """MediaPipe's one mean/std over 0-255 pixels: the model takes [0, 1], so (0, 255) for float input.

    uint8 input takes raw pixels (the quantization maps codes 0..255 onto [0, 1]): no normalization.
    """
    if desc["input_dtype"] != "float32":
        q = desc["input_quantization"]
        if abs(q["scale"] * 255.0 - 1.0) > 0.02 or abs(q["zero_point"]) > 2:
            raise EdgeKDError(f"uint8 input with scale {q['scale']:.5f} and zero point {q['zero_point']} does not map "
                              "pixels 0..255 onto [0, 1]; quantize with --io float32")
        return None
    return 0.0, 255.0


def with_metadata(model_bytes: bytes, labels: list[str], *, name: str, description: str, version: str,
                  normalization: tuple[float, float] | None, input_dtype: str) -> bytes:
    """The model with TFLite metadata (image input, normalization, labels) and labels.txt zipped in.

    tflite-support's writer pins protobuf<4 and mediapipe's Python writer does not import here, so
    we fill the metadata schema's object API ourselves: the same flatbuffer those writers produce,
    from the generated schema modules of LiteRT (model) and MediaPipe (metadata).
    """
    import flatbuffers

    md = _metadata_schema()
    graph = md.SubGraphMetadataT()
    graph.inputTensorMetadata = [_image_input_metadata(md, normalization)]
    graph.outputTensorMetadata = [_scores_output_metadata(md)]
    meta = md.ModelMetadataT()
    meta.name, meta.description, meta.version = name.encode(), description.encode(), version.encode()
    meta.author, meta.license = b"edgekd", b""
    meta.minParserVersion = b"1.0.0"  # only version-1.0 fields are used above
    meta.subgraphMetadata = [graph]
    b = flatbuffers.Builder(0)
    b.Finish(meta.Pack(b), b"M001")
    packed = io.BytesIO(_with_metadata_buffer(model_bytes, bytes(b.Output())))
    packed.seek(0, io.SEEK_END)
    with zipfile.ZipFile(packed, "a") as z:  # associated files live in a zip appended to the model
        z.writestr("labels.txt", "\n".join(labels) + "\n")
    return packed.getvalue()


def _image_input_metadata(md, normalization: tuple[float, float] | None):
    """The input tensor's metadata: an RGB image of 0-255 pixels, normalized by (mean, std) when float."""
    image = md.ImagePropertiesT()
    image.colorSpace = md.ColorSpaceType.RGB
    content = md.ContentT()
    content.contentPropertiesType, content.contentProperties = md.ContentProperties.ImageProperties, image
    inp = md.TensorMetadataT()
    inp.name, inp.description, inp.content = b"image", b"RGB image, 0-255 pixels", content
    stats = md.StatsT()
    if normalization is not None:
        mean, std = normalization
        norm = md.NormalizationOptionsT()
        norm.mean, norm.std = [mean], [std]
        unit = md.ProcessUnitT()
        unit.optionsType, unit.options = md.ProcessUnitOptions.NormalizationOptions, norm
        inp.processUnits = [unit]
        stats.min, stats.max = [(0.0 - mean) / std], [(255.0 - mean) / std]
    else:
        stats.min, stats.max = [0.0], [255.0]
    inp.stats = stats
    return inp


def _scores_output_metadata(md):
    """The output tensor's metadata: one logit per class, named by the packed labels.txt."""
    feature = md.ContentT()
    feature.contentPropertiesType, feature.contentProperties = md.ContentProperties.FeatureProperties, md.FeaturePropertiesT()
    labels_file = md.AssociatedFileT()
    labels_file.name, labels_file.description = b"labels.txt", b"class names, one per line, in output order"
    labels_file.type = md.AssociatedFileType.TENSOR_AXIS_LABELS
    out = md.TensorMetadataT()
    out.name, out.description, out.content = b"score", b"logits, one per class", feature
    out.associatedFiles = [labels_file]
    return out


def _with_metadata_buffer(model_bytes: bytes, meta_bytes: bytes) -> bytes:
    """The TFLite flatbuffer with ``meta_bytes`` as its one TFLITE_METADATA buffer (an older one replaced)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as tfl

    model = tfl.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    model.metadata = [m for m in (model.metadata or []) if m.name != b"TFLITE_METADATA"]
    buffer = tfl.BufferT()
    buffer.data = np.frombuffer(meta_bytes, dtype=np.uint8)
    model.buffers.append(buffer)
    entry = tfl.MetadataT()
    entry.name, entry.buffer = b"TFLITE_METADATA", len(model.buffers) - 1
    model.metadata.append(entry)
    b = flatbuffers.Builder(0)
    b.Finish(model.Pack(b), b"TFL3")
    return bytes(b.Output())


def _metadata_schema():
    """MediaPipe's generated metadata schema module, loaded from its file alone.

    Importing the ``mediapipe`` package loads its native libraries; when that happens before
    PyTorch runs, the process segfaults (measured with mediapipe 1.2.2 and torch 2.14). The schema
    module needs only ``flatbuffers``.
    """
    import importlib.util

    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        raise EdgeKDError("writing TFLite metadata needs mediapipe's schema: pip install 'edgekd[mediapipe]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "tasks" / "metadata" / "metadata_schema_py_generated.py"
    module_spec = importlib.util.spec_from_file_location("edgekd_tflite_metadata_schema", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def read_metadata(path: Path) -> dict:
    """Parse a bundle model's metadata back: normalization, labels file name and its contents."""
    from ai_edge_litert import schema_py_generated as tfl

    md = _metadata_schema()
    buf = bytearray(Path(path).read_bytes())
    model = tfl.ModelT.InitFromPackedBuf(buf, 0)
    entry = next((m for m in model.metadata or [] if m.name == b"TFLITE_METADATA"), None)
    if entry is None:
        return {}
    meta = md.ModelMetadataT.InitFromPackedBuf(bytearray(model.buffers[entry.buffer].data.tobytes()), 0)
    inp = meta.subgraphMetadata[0].inputTensorMetadata[0]
    out = meta.subgraphMetadata[0].outputTensorMetadata[0]
    norm = inp.processUnits[0].options if inp.processUnits else None
    with zipfile.ZipFile(Path(path)) as z:
        packed = {n: z.read(n).decode() for n in z.namelist()}
    return {"name": meta.name.decode(), "mean": list(norm.mean) if norm else None, "std": list(norm.std) if norm else None,
            "color_space": inp.content.contentProperties.colorSpace,
            "associated_files": [f.name.decode() for f in out.associatedFiles or []], "packed_files": packed}


# ---------------------------------------------------------------------------------------------
# The bundle.


def package(
    source: str | Path,
    *,
    out_dir: str | Path,
    precision: str = "int8",
    labels: str | Path | None = None,
    data=None,
    make_zip: bool = False,
    bench_runs: int = 50,
    bench_seconds: float = 1.0,
    bench_report=None,
    on_step: Callable[[str], None] | None = None,
) -> PackageResult:
    """Write a verified app bundle for the int8 (or fp32) TFLite model of a run, checkpoint or file.

    ``out_dir`` must be new, empty, or a bundle edgekd wrote (its ``.edgekd-bundle`` marker lists
    the files it may replace); ``<out_dir>.zip`` is only overwritten when edgekd made it.

    Example (``runs/student`` quantized by ``edgekd.quantize``'s example):
        >>> from edgekd import package
        >>> res = package("runs/student", out_dir="bundle", bench_runs=5, bench_seconds=0.1)
        >>> res.passed, [c.name for c in res.checks][:2], "model.tflite" in res.files
        (True, ['litert', 'mediapipe'], True)
    """
    step = on_step or (lambda _msg: None)
    sources, names, desc, data = _inputs(source, precision, labels, data)
    out = Path(out_dir)
    zip_path = out.with_name(out.name + ".zip") if make_zip else None
    check_destination(out, zip_path)  # refuse before the slow part
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out.parent)
    with temp_dir(out) as tmp:
        folder = tmp / "bundle"
        folder.mkdir()
        measured = BenchPlan(bench_runs, bench_seconds, bench_report)
        checks = write_bundle(folder, sources, names, desc, data, precision, measured, step)
        journal = Journal(tmp / "replaced")
        try:
            if zip_path is not None:
                step("zipping")
                journal.put(zip_path, lambda t: _write_zip(folder, t))
            _place_bundle(folder, out, journal)
        except BaseException:
            journal.undo()
            raise
    return PackageResult(out, tuple(sorted(p.name for p in out.iterdir())), checks, zip_path)


def _inputs(source, precision: str, labels, data) -> tuple[Sources, list[str], dict, object]:
    """The model files, labels, TFLite description and dataset of a bundle, checked against each other."""

    sources = locate(source, precision, labels)
    names = read_labels(sources, labels)
    desc = describe_tflite(sources.tflite)
    if desc["output_shape"][1] != len(names):
        raise EdgeKDError(f"{sources.tflite.name} outputs {desc['output_shape'][1]} scores but there are {len(names)} "
                          "labels; give the labels file that belongs to this model")
    if data is None and sources.checkpoint is None:
        raise EdgeKDError("no dataset recorded for this model; pass --data SPEC with the images it was trained on")
    data = resolve_data(sources.checkpoint, data)
    if list(data.classes) != names:
        raise EdgeKDError(f"the data's classes {list(data.classes)[:5]}... differ from the model's labels {names[:5]}...")
    return sources, names, desc, data


@dataclass(frozen=True)
class BenchPlan:
    """How the bundle's numbers are measured: ``report`` (an ``edgekd.bench.BenchReport`` that already
    measured the bundle's source files, as ``edgekd run`` has) is reused when it covers every one of
    them; otherwise the bundle's files are benchmarked with ``runs`` and ``seconds``."""

    runs: int
    seconds: float
    report: object | None = None


def write_bundle(folder: Path, sources: Sources, names: list[str], desc: dict, data, precision: str,
                 plan: BenchPlan, step: Callable[[str], None]) -> tuple[Check, ...]:
    """Every bundle file written into ``folder``, benchmarked and loaded back; returns the checks."""

    norm = metadata_normalization(desc)
    step("writing model.tflite with metadata and labels")
    (folder / "model.tflite").write_bytes(with_metadata(
        sources.tflite.read_bytes(), names, name=f"edgekd {data.name} classifier",
        description=f"{len(names)}-class image classifier ({precision}) distilled with edgekd",
        version=_version(), normalization=norm, input_dtype=desc["input_dtype"]))
    for f in sources.onnx:
        shutil.copyfile(f, folder / f.name)
    (folder / "labels.txt").write_text("\n".join(names) + "\n")
    report = reused_report(plan.report, sources, folder) if plan.report is not None else None
    if report is None:
        step("benchmarking the bundle's files (accuracy on the test split, batch-1 latency)")
        models = ([sources.teacher] if sources.teacher else []) + ([sources.checkpoint] if sources.checkpoint else [])
        models += [folder / "model.tflite", *(folder / f.name for f in sources.onnx)]
        report = bench(models, data=data, teacher=sources.teacher, min_runs=plan.runs, min_seconds=plan.seconds)
    else:
        step("bench: reusing the measurements of the files the bundle was made from")
    step("loading the bundle back: LiteRT, MediaPipe ImageClassifier, onnxruntime")
    checks = verify(folder, data, report, names, norm)
    manifest = bundle_json(sources, desc, names, norm, precision, report, checks)
    (folder / "model.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (folder / "MODEL_CARD.md").write_text(model_card(sources, data, manifest, report))
    (folder / "README.md").write_text(bundle_readme(manifest))
    files = sorted([p.name for p in folder.iterdir() if p.is_file()] + [MARKER])
    (folder / MARKER).write_text(json.dumps({"schema": MARKER_SCHEMA, "files": files + ["SHA256SUMS"],
                                             "edgekd_version": _version()}, indent=2) + "\n")
    (folder / "SHA256SUMS").write_text("".join(f"{sha256_file(folder / n)}  {n}\n" for n in files))
    return checks + (check_sums(folder),)


def reused_report(report, sources: Sources, folder: Path):
    """The rows of ``report`` that measured the bundle's sources, renamed to the bundle's files (the same
    network: model.tflite only adds metadata), or None when any source is missing or failed there."""
    by_path = {Path(r.path).resolve(): r for r in report.rows if r.status == "ok"}
    rows = []
    for src in (sources.teacher, sources.checkpoint):
        if src is not None:
            if Path(src).resolve() not in by_path:
                return None
            rows.append(by_path[Path(src).resolve()])
    for src, name in ((sources.tflite, "model.tflite"), *((f, f.name) for f in sources.onnx)):
        row = by_path.get(Path(src).resolve())
        if row is None:
            return None
        rows.append(dataclasses.replace(row, name=name, path=str(folder / name), size_bytes=(folder / name).stat().st_size))
    renamed = {Path(src).resolve(): name for src, name in ((sources.tflite, "model.tflite"), *((f, f.name) for f in sources.onnx))}
    focus = next((renamed[p] for p, r in by_path.items() if r.name == report.focus and p in renamed), report.focus)
    return dataclasses.replace(report, rows=tuple(rows), histories={}, focus=focus)


# ---------------------------------------------------------------------------------------------
# Where the bundle goes: only into a new or empty folder, or over a bundle edgekd wrote.

MARKER = ".edgekd-bundle"  # in every bundle (and its zip): the files edgekd wrote there
MARKER_SCHEMA = "edgekd.bundle-marker/1"


def check_destination(out: Path, zip_path: Path | None) -> list[str]:
    """The names now in ``out`` (all edgekd's bundle files), or refuse: a non-empty folder without
    edgekd's marker, a bundle with foreign files in it, or a zip edgekd did not make."""
    if out.exists() and not out.is_dir():
        raise EdgeKDError(f"--out {out} is a file; choose a new folder for the bundle")
    if zip_path is not None and zip_path.exists() and not _is_bundle_zip(zip_path):
        raise EdgeKDError(f"{zip_path} exists and is not a bundle zip edgekd made; move it away or choose another --out")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not present:
        return []
    listed = _marker_files(out)
    if listed is None:
        raise EdgeKDError(f"{out} is not empty and is not an edgekd bundle (no {MARKER} marker); "
                          "choose a new or empty --out")
    foreign = [n for n in present if n not in listed]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise EdgeKDError(f"{out} is an edgekd bundle but also holds files edgekd did not write ({shown}); "
                          "move them away or choose a new --out")
    return present


def _marker_files(folder: Path) -> list[str] | None:
    marker = read_json(folder / MARKER)
    files = marker.get("files")
    if marker.get("schema") != MARKER_SCHEMA or not isinstance(files, list):
        return None
    return [str(n) for n in files]


def _is_bundle_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read(MARKER)).get("schema") == MARKER_SCHEMA
    except (OSError, KeyError, ValueError, AttributeError, zipfile.BadZipFile):
        return False


def _write_zip(folder: Path, dest: Path) -> None:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(folder.iterdir()):
            z.write(p, p.name)


def _place_bundle(folder: Path, out: Path, journal) -> None:
    """Move the built bundle to ``out``: one rename into a new or empty folder, otherwise file by file
    over the old bundle (through ``journal``, so a failure restores it), then drop its stale files."""
    old = check_destination(out, None)  # again: the folder may have changed during the benchmark
    if not old:
        if out.exists():
            out.rmdir()
        os.replace(folder, out)
        return
    new = sorted(p.name for p in folder.iterdir())
    for name in new:
        journal.put(out / name, lambda t, src=folder / name: os.replace(src, t))
    for name in sorted(set(old) - set(new)):  # names seen in ``out`` and listed by its marker
        if (out / name).is_file():
            (out / name).unlink()


def _version() -> str:

    return __version__


def check_sums(folder: Path) -> Check:
    """Every file listed in SHA256SUMS exists and matches; every file in the folder is listed."""
    listed = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != "SHA256SUMS"}
    bad = [n for n, d in listed.items() if not (folder / n).is_file() or sha256_file(folder / n) != d]
    missing = sorted(present - set(listed))
    ok = not bad and not missing
    return Check("checksums", ok, f"{len(listed)} files match SHA256SUMS" if ok else f"mismatch: {bad}, unlisted: {missing}")


def verify(folder: Path, data, report, names: list[str], norm) -> tuple[Check, ...]:
    """Load the bundle back like an app would and compare with what edgekd bench measured."""

    rows = {Path(r.path).name: r for r in report.rows}
    checks = []
    runner = TFLiteRunner(folder / "model.tflite")
    h, w = runner.inp["shape"][1:3]
    x = fit_input(to_unit(data.test_x), 3, (int(h), int(w)))
    x_u8 = np.round(x.numpy() * 255.0).astype(np.uint8)  # the exact pixels both runtimes get, (N, 3, H, W)
    x = x_u8.astype(np.float32) / 255.0
    y = data.test_y.numpy()
    litert = runner(nhwc_array(x)).argmax(1)
    row = rows.get("model.tflite")
    acc = float((litert == y).mean() * 100.0)
    same = row is not None and row.status == "ok" and abs(row.top1 - acc) < 100.0 / len(y)
    checks.append(Check("litert", same, f"top-1 {acc:.2f}% through LiteRT on {len(y)} test images; edgekd bench "
                                        f"measured {row.top1:.2f}%" if row is not None and row.status == "ok"
                        else f"edgekd bench could not run model.tflite: {row.error if row else 'missing'}"))
    checks.append(_mediapipe_check(folder / "model.tflite", x_u8[:VERIFY_IMAGES], litert[:VERIFY_IMAGES], names))
    for name in ONNX_FILES:
        if (folder / name).is_file():
            pred = run_onnx(folder / name, x).argmax(1)
            acc = float((pred == y).mean() * 100.0)
            r = rows.get(name)
            ok = r is not None and r.status == "ok" and abs(r.top1 - acc) < 100.0 / len(y)
            checks.append(Check(f"onnxruntime {name}", ok, f"top-1 {acc:.2f}%; edgekd bench measured "
                                + (f"{r.top1:.2f}%" if r is not None and r.status == "ok" else "nothing")))
    meta = read_metadata(folder / "model.tflite")
    meta_ok = (meta.get("packed_files", {}).get("labels.txt", "").split() == names
               and (norm is None or (meta["mean"] == [norm[0]] and meta["std"] == [norm[1]])))
    checks.append(Check("metadata", meta_ok, f"labels.txt packed with {len(names)} classes, normalization "
                                             f"{_plain_normalization(meta) if norm else 'none (uint8 input)'}"))
    return tuple(checks)


def _plain_normalization(meta: dict) -> str:
    """``mean [0.0] std [255.0]``: plain numbers, not numpy reprs."""
    return " ".join(f"{k} [{', '.join(f'{float(v):g}' for v in meta.get(k, []))}]" for k in ("mean", "std"))


def _mediapipe_check(model: Path, x_u8: np.ndarray, litert_pred: np.ndarray, names: list[str]) -> Check:
    try:
        import torch  # noqa: F401 - must be loaded before mediapipe's native libraries (see _metadata_schema)
        with quiet_native_logs():
            import mediapipe as mp
            from mediapipe.tasks.python import BaseOptions, vision
    except ImportError:
        return Check("mediapipe", False, "mediapipe is not installed: pip install 'edgekd[mediapipe]'")
    try:
        options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(model)), max_results=1)
        with quiet_native_logs(), vision.ImageClassifier.create_from_options(options) as classifier:
            got = []
            for img in x_u8:
                frame = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(img.transpose(1, 2, 0)))
                top = classifier.classify(frame).classifications[0].categories[0]
                got.append((top.index, top.category_name))
    except Exception as exc:  # noqa: BLE001 - MediaPipe's refusal is the finding
        return Check("mediapipe", False, f"MediaPipe ImageClassifier refused the model: {str(exc).splitlines()[0]}")
    agree = sum(int(i == p) for (i, _), p in zip(got, litert_pred))
    named = all(n == names[i] for i, n in got)
    ok = agree == len(got) and named
    return Check("mediapipe", ok, f"ImageClassifier top-1 equals LiteRT's on {agree}/{len(got)} real test images; "
                                  f"category names {'from' if named else 'DIFFER from'} labels.txt")


def bundle_json(sources: Sources, desc: dict, names: list[str], norm, precision: str, report, checks) -> dict:
    rows = {Path(r.path).name: r for r in report.rows if r.status == "ok"}
    h, w = desc["input_shape"][1:3]
    pre = sources.sidecar.get("preprocessing", {})
    measured = {n: {"top1": r.top1, "top5": r.top5, "agreement_with_teacher": r.agreement,
                    "latency_ms_p50": r.latency.p50_ms, "latency_ms_p90": r.latency.p90_ms,
                    "latency_ms_p99": r.latency.p99_ms, "size_bytes": r.size_bytes}
                for n, r in rows.items() if n in ("model.tflite", *ONNX_FILES)}
    return {
        "schema": BUNDLE_SCHEMA,
        "status": "ok" if all(c.ok for c in checks) else "failed",
        "model": "model.tflite",
        "precision": precision,
        "input": {"name": desc["input_name"], "shape": desc["input_shape"], "layout": "NHWC",
                  "dtype": desc["input_dtype"], "resize": [h, w], "channel_order": "RGB",
                  "pixels": "0-255 RGB divided by 255 (range [0, 1])" if norm else "raw 0-255 RGB bytes",
                  "metadata_normalization": {"mean": [norm[0]], "std": [norm[1]]} if norm else None,
                  "quantization": desc["input_quantization"],
                  "training_normalization": pre.get("normalization_inside_model"),
                  **({"grayscale_model": pre["grayscale_model"]} if "grayscale_model" in pre else {})},
        "output": {"name": desc["output_name"], "shape": desc["output_shape"], "dtype": desc["output_dtype"],
                   "meaning": "logits (apply softmax for probabilities)", "quantization": desc["output_quantization"]},
        "classes": names,
        "labels_file": "labels.txt",
        "onnx": {f.name: {"layout": "NCHW", "shape": ["batch", 3, h, w], "dtype": "float32"} for f in sources.onnx},
        "int8_ops": desc["int8_ops"],
        "quantization_target": sources.sidecar.get("quantization_choice", {}).get("target"),
        "measured": measured,
        "bench": {"cpu": report.env["cpu"], "threads": report.settings["threads"], "data": report.data["name"],
                  "test_images": report.data["test_images"], "teacher": report.teacher},
        "verification": [{"check": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
        "source": {"tflite": str(sources.tflite), "checkpoint": str(sources.checkpoint) if sources.checkpoint else None},
        "edgekd_version": _version(),
    }


def model_card(sources: Sources, data, manifest: dict, report) -> str:

    cfg = rundir.recorded_config(sources.checkpoint) if sources.checkpoint else {}
    result = read_json(rundir.result_file(rundir.run_of(sources.checkpoint))) if sources.checkpoint else {}
    recipe = cfg.get("recipe", {})
    kd = cfg.get("kd", {})
    teachers = kd.get("teachers") or []
    m = manifest["measured"].get("model.tflite", {})
    fails = [f"- {c['check']}: {c['detail']}" for c in manifest["verification"] if not c["ok"]]
    table = bench_markdown(report).split("\n| ", 1)
    lines = [
        f"# Model card: {data.name} classifier ({manifest['precision']} TFLite)", "",
        "## Data",
        f"{data.name}: {len(data.classes)} classes ({', '.join(data.classes[:12])}{', ...' if len(data.classes) > 12 else ''}); "
        f"{len(data.train_y):,} training, {len(data.val_y):,} validation, {len(data.test_y):,} test images.", "",
        "## Model",
        f"- Student: `{result.get('arch', cfg.get('model', {}).get('arch', 'unknown'))}`, "
        f"{result.get('params', 'unknown'):,} parameters" if isinstance(result.get("params"), int) else "- Student: unknown",
        "- Teacher(s): " + (", ".join(f"`{t}`" for t in teachers) if teachers else "none (trained from labels only)"),
        f"- Recipe: {recipe.get('epochs', '?')} epochs, {recipe.get('optimizer', '?')} lr {recipe.get('lr', '?')}, "
        f"batch {recipe.get('batch_size', '?')}, {recipe.get('schedule', '?')} schedule"
        + (f"; KD temperature {kd.get('temperature')}, alpha {kd.get('alpha')}" if teachers else ""),
        f"- Deployed file: model.tflite, {manifest['precision']}, input {manifest['input']['shape']} "
        f"{manifest['input']['dtype']}, {manifest['int8_ops']} int8 compute ops.", "",
        "## Measured (edgekd bench, this bundle's files)",
        f"CPU: {report.env['cpu']}, {report.settings['threads']} thread(s). Top-1 of model.tflite: "
        f"{m.get('top1', float('nan')):.2f}% on the test split, p50 latency {m.get('latency_ms_p50', float('nan')):.3f} ms.", "",
        "| " + table[1] if len(table) > 1 else "", "",
        "## Intended use",
        f"Classifying images like the {data.name} training data into the {len(data.classes)} classes above, on a phone "
        "or edge CPU, with the preprocessing in model.json (RGB, resized to the model input, pixels / 255).", "",
        "## Known limits",
        f"- Only the {len(data.classes)} training classes exist: any other input still gets one of them.",
        f"- Images unlike the training data (domain, size {manifest['input']['resize']}, framing) will score lower "
        "than the test accuracy above.",
        "- Latency was measured on the CPU named above; phones differ, measure there.",
        "- int8 accuracy can differ slightly from the float model's; both are in the table above.",
    ]
    if fails:
        lines += ["", "## FAILED verification", *fails]
    return "\n".join(lines) + "\n"


def bundle_readme(manifest: dict) -> str:
    h, w = manifest["input"]["resize"]
    float_input = manifest["input"]["dtype"] == "float32"
    fill = ("input.putFloat(r / 255f); input.putFloat(g / 255f); input.putFloat(b / 255f)" if float_input
            else "input.put(r.toByte()); input.put(g.toByte()); input.put(b.toByte())")
    bytes_per = 4 if float_input else 1
    return f"""# Image classifier bundle ({manifest['precision']}, {len(manifest['classes'])} classes)

`model.tflite` carries its own metadata (input normalization and `labels.txt`), so MediaPipe
Tasks' ImageClassifier needs no preprocessing code: give it the camera frame. Input: RGB,
resized to {w}x{h}, {manifest['input']['pixels']}; output: {manifest['output']['meaning']}.
`model.json` lists every detail; `SHA256SUMS` the checksums; `MODEL_CARD.md` what it was trained on
and what it measured. `model.onnx`/`model_int8.onnx` (NCHW, same preprocessing) are for ONNX runtimes.

## Android, MediaPipe Tasks (Kotlin)
```kotlin
val options = ImageClassifier.ImageClassifierOptions.builder()
    .setBaseOptions(BaseOptions.builder().setModelAssetPath("model.tflite").build())
    .setMaxResults(3)
    .build()
val classifier = ImageClassifier.createFromOptions(context, options)
val result = classifier.classify(BitmapImageBuilder(bitmap).build())
val top = result.classificationResult().classifications()[0].categories()[0]  // top.categoryName(), top.score()
```

## Android, LiteRT Interpreter (Kotlin)
```kotlin
val interpreter = Interpreter(FileUtil.loadMappedFile(context, "model.tflite"))
val scaled = Bitmap.createScaledBitmap(bitmap, {w}, {h}, true)
val input = ByteBuffer.allocateDirect({h} * {w} * 3 * {bytes_per}).order(ByteOrder.nativeOrder())
for (y in 0 until {h}) for (x in 0 until {w}) {{
    val p = scaled.getPixel(x, y); val r = (p shr 16) and 0xFF; val g = (p shr 8) and 0xFF; val b = p and 0xFF
    {fill}
}}
val logits = Array(1) {{ FloatArray({len(manifest['classes'])}) }}
interpreter.run(input, logits)
val labels = context.assets.open("labels.txt").bufferedReader().readLines()
val best = labels[logits[0].indices.maxBy {{ logits[0][it] }}]
```

## iOS, MediaPipe Tasks (Swift)
```swift
let options = ImageClassifierOptions()
options.baseOptions.modelAssetPath = Bundle.main.path(forResource: "model", ofType: "tflite")!
options.maxResults = 3
let classifier = try ImageClassifier(options: options)
let result = try classifier.classify(image: try MPImage(uiImage: image))
let top = result.classificationResult.classifications[0].categories[0]  // top.categoryName, top.score
```
"""
