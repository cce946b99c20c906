import time

import numpy as np

from edgekd.timing import LatencyStats, time_calls


def test_percentile_arithmetic():
    s = LatencyStats.from_seconds([i / 1000 for i in range(1, 101)], threads=1)  # 1..100 ms
    assert s.runs == 100 and s.threads == 1
    assert np.isclose(s.p50_ms, 50.5) and np.isclose(s.p90_ms, 90.1) and np.isclose(s.p99_ms, 99.01)
    assert np.isclose(s.mean_ms, 50.5) and np.isclose(s.std_ms, np.std(np.arange(1, 101)))
    assert s.p50_ms <= s.p90_ms <= s.p99_ms


def test_time_calls_meets_both_run_count_and_duration():
    calls = []
    stats = time_calls(lambda: calls.append(time.sleep(0.001)), warmup=3, min_runs=5, min_seconds=0.05)
    assert stats.runs >= 5 and len(calls) == stats.runs + 3
    assert stats.runs * stats.mean_ms >= 50 * 0.9  # at least ~min_seconds were timed
    assert 0.9 <= stats.p50_ms < 50
    quick = time_calls(lambda: None, warmup=0, min_runs=60, min_seconds=0.0)
    assert quick.runs == 60


# ---------------------------------------------------------------------------------------------
# edgekd bench: deltas, schema, failed rows, report sections.

import dataclasses
import json
from importlib import resources

import pytest
from typer.testing import CliRunner

from edgekd.bench import BenchRow, delta, fp32_counterpart, metrics
from edgekd.cli import app


def _row(name, path, fmt, precision, top1, size, p50, source=None):
    lat = LatencyStats(50, 1, p50, p50, p50, p50, 0.0)
    return BenchRow(name, path, "variant", "ok", format=fmt, precision=precision, top1=top1, size_bytes=size,
                    latency=lat, source=source)


def test_delta_arithmetic():
    teacher = _row("t", "t.pt", "pytorch", "fp32", 90.0, 4000, 2.0)
    student = _row("s", "d/model_int8.tflite", "tflite", "int8", 88.5, 1000, 0.5)
    d = delta(student, teacher)
    assert d.against == "t" and np.isclose(d.acc_pts, -1.5) and np.isclose(d.speedup, 4.0)
    assert np.isclose(d.size_reduction_pct, 75.0) and np.isclose(d.compression, 4.0)


def test_speed_up_against_the_teacher_only_in_the_same_runtime():
    """A LiteRT student against an eager PyTorch teacher would credit the runtime, not the model."""
    from edgekd.bench import _with_deltas

    rows = [_row("t", "t.pt", "pytorch", "fp32", 90.0, 4000, 2.0), _row("s", "s.pt", "pytorch", "fp32", 88.0, 1000, 0.5),
            _row("f", "d/model_int8.tflite", "tflite", "int8", 87.5, 300, 0.01)]
    rows = [dataclasses.replace(r, runtime={"pytorch": "pytorch", "tflite": "litert"}[r.format]) for r in rows]
    t, s, f = _with_deltas(rows, rows[0])
    assert t.vs_teacher is None and np.isclose(s.vs_teacher.speedup, 4.0)
    assert f.vs_teacher.speedup is None and np.isclose(f.vs_teacher.acc_pts, -2.5) and np.isclose(f.vs_teacher.compression, 4000 / 300)


def test_fp32_counterpart_same_format_and_folder_then_source(tmp_path):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"x")
    src = _row("ckpt", str(ckpt), "pytorch", "fp32", 90, 100, 1.0)
    fp32 = _row("f", "a/model_fp32.tflite", "tflite", "fp32", 90, 100, 1.0, source=str(ckpt))
    int8 = _row("i", "a/model_int8.tflite", "tflite", "int8", 89, 30, 2.0)
    other = _row("o", "b/model_fp32.tflite", "tflite", "fp32", 90, 100, 1.0)
    onnx = _row("x", "a/model.onnx", "onnx", "fp32", 90, 100, 1.0)
    rows = [src, other, onnx, fp32, int8]
    assert fp32_counterpart(int8, rows) is fp32
    assert fp32_counterpart(fp32, rows) is src
    assert fp32_counterpart(src, rows) is None


def test_slow_int8_gets_a_warning_with_its_cause():
    from edgekd.bench import _with_deltas

    fp32 = _row("f", "a/model.onnx", "onnx", "fp32", 90, 100, 1.0)
    int8 = _row("i", "a/model_int8.onnx", "onnx", "int8", 89, 30, 1.5)
    rows = _with_deltas([fp32, int8], None)
    assert rows[1].vs_fp32.against == "f" and np.isclose(rows[1].vs_fp32.speedup, 1 / 1.5)
    [w] = rows[1].warnings
    assert "1.50x slower" in w and "likely cause" in w
    assert rows[0].warnings == ()


def test_metrics_match_direct_counts():
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    scores = np.eye(6)[[0, 1, 1, 1, 2, 0, 3, 3, 4, 4, 5, 2]] + 0.01 * np.arange(6)  # 9 of 12 right
    m = metrics(scores, y, 6)
    assert np.isclose(m["top1"], 75.0) and m["top5"] is not None and m["top5"] >= m["top1"]
    assert m["per_class"][0] == 50.0 and m["per_class"][1] == 100.0
    assert m["confusion"][0] == (1, 1, 0, 0, 0, 0) and sum(map(sum, m["confusion"])) == 12
    assert metrics(np.eye(3)[[0, 1, 2]], np.array([0, 1, 2]), 3)["top5"] is None  # top-5 only above 5 classes


@pytest.fixture(scope="module")
def digits_bench(digits_model, quantized, teacher_run, tmp_path_factory):
    """A bench of a checkpoint, its fp32/int8 ONNX and TFLite files, a bogus file and a wrong-class model."""
    from edgekd.bench import bench

    folder = quantized.models[0].int8.path.parent
    bogus = tmp_path_factory.mktemp("bogus") / "model.coreml"
    bogus.write_bytes(b"\0" * 16)
    files = [folder / n for n in ("model.onnx", "model_int8.onnx", "model_fp32.tflite", "model_int8.tflite")]
    wrong = teacher_run.out_dir + "/best.pt" if isinstance(teacher_run.out_dir, str) else teacher_run.out_dir / "best.pt"
    return bench([digits_model, *files, bogus, wrong], teacher=digits_model, min_runs=5, min_seconds=0.0, warmup=1,
                 batch=8)


def test_bench_rows_for_every_format_and_failed_rows(digits_bench):
    rep = digits_bench
    rows = {r.name: r for r in rep.rows}
    assert rep.teacher == "digits0/best.pt" or rows[rep.teacher].role == "teacher"
    ok = [r for r in rep.rows if r.status == "ok"]
    assert {(r.format, r.precision) for r in ok} == {("pytorch", "fp32"), ("onnx", "fp32"), ("onnx", "int8"),
                                                    ("tflite", "fp32"), ("tflite", "int8")}
    failed = {r.name: r.error for r in rep.failed}
    assert len(failed) == 2
    assert any("unknown model format '.coreml'" in e for e in failed.values())
    assert any("classes" in e for e in failed.values())
    for r in ok:
        assert r.latency.runs >= 5 and r.latency.p50_ms <= r.latency.p90_ms <= r.latency.p99_ms
        assert r.top5 is not None and r.top5 >= r.top1 and r.params and r.macs and r.throughput_ips > 0
        assert sum(map(sum, r.confusion)) == rep.data["test_images"]
        assert np.isclose(np.mean(r.per_class), np.mean([row[i] / sum(row) * 100 for i, row in enumerate(r.confusion)]))
    teacher = rows[rep.teacher]
    assert teacher.vs_teacher is None and teacher.agreement == 100.0
    int8 = next(r for r in ok if r.format == "tflite" and r.precision == "int8")
    assert int8.vs_fp32.against.endswith("model_fp32.tflite")
    assert np.isclose(int8.vs_teacher.acc_pts, int8.top1 - teacher.top1)
    assert int8.runtime != teacher.runtime and int8.vs_teacher.speedup is None  # see the test below
    assert rep.focus == max((r for r in ok if r.precision == "int8"), key=lambda r: r.top1).name
    # the params come from the checkpoint every file was exported from
    assert len({r.params for r in ok}) == 1


def test_bench_json_follows_the_documented_schema(digits_bench):
    import jsonschema

    schema = json.loads(resources.files("edgekd").joinpath("schemas/bench-1.json").read_text())
    doc = json.loads(json.dumps(digits_bench.to_dict(), allow_nan=False))
    jsonschema.validate(doc, schema)
    assert doc["schema"] == schema["$id"]
    broken = dict(doc, models=[dict(doc["models"][0], status="maybe")])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_report_files_and_html_sections(digits_bench, tmp_path):
    from edgekd.report import HTML_SECTIONS, bench_markdown, write_bench_report

    files = write_bench_report(digits_bench, tmp_path)
    html = files["html"].read_text()
    for section in HTML_SECTIONS:
        if section != "curves" or digits_bench.histories:
            assert f"id='{section}'" in html, section
    pngs = [k for k in files if k not in ("json", "markdown", "html", "plots_json")]
    assert html.count("data:image/png;base64,") == len(pngs)
    assert "src='http" not in html and "<script" not in html  # self-contained, readable offline
    md = bench_markdown(digits_bench)
    table, _, training = md.partition("\nTraining (")
    assert table.count("\n| ") == len(digits_bench.rows) + 1 and "failed: " in md
    # the train-validation gap of every trained model, at its best epoch
    assert digits_bench.histories and training.count("\n| ") == len(digits_bench.histories) + 1
    for name, hist in digits_bench.histories.items():
        best = max(hist, key=lambda h: h["val_acc"])
        assert f"| {name} | {len(hist)} | {best['epoch']} |" in training
        assert f"{best['train_acc'] - best['val_acc']:+.2f} pts" in training
    assert "id='gap'" in html
    saved = json.loads(files["json"].read_text())
    assert [m["name"] for m in saved["models"]] == [r.name for r in digits_bench.rows]
    assert {"accuracy", "tradeoff", "confusion", "per_class"} <= set(pngs)
    # the numbers the plots drew are the measured ones in bench.json
    plotted = json.loads(files["plots_json"].read_text())
    ok = [m for m in saved["models"] if m["status"] == "ok"]
    assert [(e["model"], e["top1"]) for e in plotted["accuracy"]] == [(m["name"], m["top1"]) for m in ok]
    assert [e["p50_ms"] for e in plotted["tradeoff"]] == [m["latency"]["p50_ms"] for m in ok]
    by_name = {m["name"]: m for m in saved["models"]}
    assert [e["model"] for e in plotted["confusion"]] == [saved["teacher"], saved["focus"]]
    for e in plotted["confusion"]:
        assert e["matrix"] == by_name[e["model"]]["confusion"]
    for e in plotted["per_class"]:
        assert e["accuracy"] == by_name[e["model"]]["per_class"]


def test_bench_cli_reports_failed_models_and_exits_1(quantized, tmp_path):
    folder = quantized.models[0].int8.path.parent
    bogus = tmp_path / "m.xyz"
    bogus.write_text("x")
    result = CliRunner().invoke(app, ["bench", str(folder / "model_int8.onnx"), str(bogus), "--data", "digits",
                                      "--runs", "3", "--min-seconds", "0", "--out", str(tmp_path / "b"), "--json"])
    assert result.exit_code == 1
    assert "m.xyz: unknown model format '.xyz'" in result.output
    assert (tmp_path / "b" / "report.html").is_file()


def test_bench_cli_help_teaches():
    result = CliRunner().invoke(app, ["bench", "--help"])
    assert result.exit_code == 0 and "--teacher" in result.output and "Example" in result.output


def test_bench_run_of_an_image_folder(folder_run, tmp_path):
    """Checkpoint, ONNX and TFLite files of a model trained on an ImageFolder, data found from the run."""
    from edgekd.bench import bench

    rep = bench([folder_run, folder_run / "export"], min_runs=5, min_seconds=0.0, warmup=1, batch=4)
    assert not rep.failed, [r.error for r in rep.failed]
    assert len(rep.rows) == 5 and rep.data["classes"] == ["class_0", "class_1", "class_2"]
    assert all(r.top5 is None for r in rep.rows)  # 3 classes: no top-5


def test_bench_states_how_a_torchvision_backbone_started(tmp_path):
    from edgekd.bench import _backbone_init

    model = {"arch": "torchvision:vgg16", "pretrained": False, "weights_path": None, "trainable_layers": 2}
    (tmp_path / "config.json").write_text(json.dumps({"model": model}))
    assert _backbone_init(tmp_path / "best.pt") == (
        "torchvision:vgg16 from random init (no ImageNet weights); last 2 layers and the head trained, the rest frozen")
    (tmp_path / "config.json").write_text(json.dumps({"model": {**model, "pretrained": True, "trainable_layers": None}}))
    assert _backbone_init(tmp_path / "best.pt") == "torchvision:vgg16 from ImageNet weights; all layers trained"
    (tmp_path / "config.json").write_text(json.dumps({"model": {"arch": "seed002_student"}}))
    assert _backbone_init(tmp_path / "best.pt") is None and _backbone_init(tmp_path / "m.onnx") is None
