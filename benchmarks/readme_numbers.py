"""The numbers in README.md, written from committed results (never typed by hand).

    python benchmarks/readme_numbers.py record     # fresh clone of HEAD: time `make test` and `make run`,
                                                   # keep the embedded default's results (minutes)
    python benchmarks/readme_numbers.py render     # rewrite README.md's generated blocks

`record` writes benchmarks/results/fresh_clone.json and benchmarks/results/embedded_default/ (the run's
summary.json, bench.json and the bundle's model.json). `render` fills every
``<!-- numbers:NAME -->...<!-- /numbers -->`` block of README.md from those files and
benchmarks/results/keras_peer_e10.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from keras_peer import peer_pairs  # a sibling script: python puts benchmarks/ on the path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT = RESULTS / "embedded_default"


def _timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout + proc.stderr


def record(keep: Path | None) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    clone = keep or Path(tempfile.mkdtemp(prefix="edgekd-clone-"))
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    # ../shared beside the clone, as CI has it (the tests never need it; benchmarks may)
    test_s, test_out = _timed(["make", "test"], clone)
    passed = re.findall(r"(\d+) passed.* in ([\d.]+)s", test_out)
    run_s, _ = _timed(["make", "run"], clone)
    run = clone / "runs" / "default"
    DEFAULT.mkdir(parents=True, exist_ok=True)
    for src, name in ((run / "summary.json", "summary.json"), (run / "bench" / "bench.json", "bench.json"),
                      (run / "bundle" / "model.json", "model.json")):
        shutil.copy2(src, DEFAULT / name)
    load = os.getloadavg()
    (RESULTS / "fresh_clone.json").write_text(json.dumps({
        "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M"), "make_test_s": round(test_s, 1),
        "tests_passed": int(passed[-1][0]) if passed else None, "pytest_s": float(passed[-1][1]) if passed else None,
        "make_run_s": round(run_s, 1), "load_average_after": [round(v, 2) for v in load],
        "machine": {"cores": os.cpu_count()}}, indent=2) + "\n")
    if keep is None:
        shutil.rmtree(clone, ignore_errors=True)


def _minutes(s: float) -> str:
    return f"{int(s // 60)} min {round(s % 60):d} s"


def block_fresh_clone() -> str:
    f = json.loads((RESULTS / "fresh_clone.json").read_text())
    return (f"Measured from a fresh clone of `{f['commit']}` (`git clone`, then the two commands) on this project's "
            f"{f['machine']['cores']}-core CPU (`python benchmarks/readme_numbers.py record`): `make test` took "
            f"{_minutes(f['make_test_s'])} including the `.venv` install ({f['tests_passed']} tests in {f['pytest_s']:.0f} s); "
            f"`make run` took {f['make_run_s']:.0f} s.")


def block_default_models() -> str:
    s = json.loads((DEFAULT / "summary.json").read_text())
    n = json.loads((DEFAULT / "bench.json").read_text())["data"]["test_images"]
    rows = [f"Its tables (first seed's models; test split of {n} images, one image = {100 / n:.2f} points):", "",
            "| model | role | params | val acc | test acc | train time |", "|---|---|---:|---:|---:|---:|"]
    rows += [f"| {m['name']} | {m['role']} | {m['params']:,} | {m['val_acc']:.2f}% | {m['test_acc']:.2f}% | "
             f"{m['train_s']:.1f} s |" for m in s["models"]]
    return "\n".join(rows)


def block_default_gains() -> str:
    from edgekd.report import kd_gain_lines

    s = json.loads((DEFAULT / "summary.json").read_text())
    return "\n".join("    " + line for line in kd_gain_lines(s["kd_gain_over_matched_scratch"]))


def block_default_deploy() -> str:
    s = json.loads((DEFAULT / "summary.json").read_text())
    bench = json.loads((DEFAULT / "bench.json").read_text())
    files = {Path(m[k]["path"]).name for m in s["deployed"]["models"] for k in ("fp32", "int8")}
    rows = [f"| file (best student: {s['deployed']['student']}) | runtime | size | top-1 | p50 latency |",
            "|---|---|---:|---:|---:|"]
    for r in bench["models"]:
        if Path(r["path"]).name in files and r["status"] == "ok":
            rows.append(f"| deploy/{Path(r['path']).name} | {r['runtime']} {r['precision']} | {r['size_bytes'] / 1024:.1f} KiB | "
                        f"{r['top1']:.2f}% | {r['latency']['p50_ms']:.3f} ms |")
    return "\n".join(rows)


SPEED = RESULTS / "keras_peer_e10.json"


def block_speed() -> str:
    k = json.loads(SPEED.read_text())
    rounds = list(k["rounds"].values())
    names = {"teacher": "seed 002's teacher", "scratch": "its student", "scratch-long": "its student at edgekd's "
             "default length", "distill": "edgekd's default distillation against Keras's Distiller",
             "distill-online": "the teacher on every batch on both sides", "edge_resnet_s": "`edge_resnet_s`",
             "mobilenet_v2": "MobileNetV2"}
    phases = [p for p in names if any(f"{p}/edgekd" in r and f"{p}/keras" in r for r in rounds)]

    def against(phase, peer):  # median ratio within a round, as keras_peer.md gives it; mean test accuracy of both sides
        pairs = peer_pairs(k, phase, peer)
        if not pairs:
            return None
        return (statistics.median(a["images_per_s"] / b["images_per_s"] for a, b in pairs),
                statistics.mean(a["test_acc"] for a, _ in pairs), statistics.mean(b["test_acc"] for _, b in pairs))

    parts = []
    for p in phases:
        row = next(r[f"{p}/edgekd"] for r in rounds if f"{p}/edgekd" in r)
        ratio, ours, theirs = against(p, "keras")
        part = (f"**{ratio:.2f}x** on {names[p]} ({row['train_images']:,} images x {row['epochs']} epochs, "
                f"test {ours:.1f}% vs {theirs:.1f}%")
        bf16 = against(p, "keras_bf16")
        if bf16:
            part += f"; against Keras under `mixed_bfloat16` {bf16[0]:.2f}x, test {bf16[2]:.1f}%"
        parts.append(part + ")")
    return (f"edgekd / Keras 3 = {', '.join(parts)}; median of {len(rounds)} interleaved rounds on CIFAR-10: "
            f"`{k['command']}`.")


def _kd_line(name: str, what: str) -> str | None:
    f = RESULTS / f"{name}.json"
    if not f.is_file():
        return None
    runs = json.loads(f.read_text())["runs"]["cached"]
    done = [r for r in runs.values() if r["kd"]["test_acc"] is not None and r["twin"]["test_acc"] is not None]
    kd, twin = [r["kd"]["test_acc"] for r in done], [r["twin"]["test_acc"] for r in done]
    gains = [a - b for a, b in zip(kd, twin)]
    sd = lambda v: f" +- {statistics.stdev(v):.2f}" if len(v) > 1 else ""  # noqa: E731
    return (f"{what}: distilled {statistics.mean(kd):.2f}%{sd(kd)}, matched twin {statistics.mean(twin):.2f}%{sd(twin)}, "
            f"**KD {statistics.mean(gains):+.2f}{sd(gains)} points** over {len(done)} seed{'s' if len(done) > 1 else ''} "
            f"({', '.join(f'{g:+.2f}' for g in gains)}; `benchmarks/results/{name}.md`)")


def _teacher_val(name: str) -> str:
    f = RESULTS / f"{name}.json"
    acc = json.loads(f.read_text()).get("teacher_val_acc") if f.is_file() else None  # kd_vs_twin records it
    return f"{acc:.2f}%" if acc is not None else "?"


def block_cifar_kd() -> str:
    smoothed = json.loads((ROOT / "models" / "cifar10_fastcnn_teacher" / "result.json").read_text())
    sharp = json.loads((RESULTS / "cifar10_teacher_kd.json").read_text())
    lines = [_kd_line("kd_vs_twin_cifar10_edge_resnet_s_default",
                      f"edgekd's default student (`edge_resnet_s`) from the {sharp['test_acc']:.2f}% `fastcnn` teacher "
                      "without label smoothing (`models/cifar10_fastcnn_teacher_kd`), 10 epochs"),
             _kd_line("kd_vs_twin_cifar10_seed002", f"seed 002's student (no batch norm) from the {smoothed['test_acc']:.2f}% "
                      "`fastcnn` teacher in `models/`, 10 epochs"),
             _kd_line("kd_vs_twin_cifar10_seed002_e30", "the same, 30 epochs"),
             _kd_line("kd_vs_twin_cifar_gray24_edge_resnet_s", "a dataset nothing was tuned on (CIFAR-10 subset, grayscale, "
                      f"24 px, 18,000 training images; `fastcnn` teacher at {_teacher_val('kd_vs_twin_cifar_gray24_edge_resnet_s')} "
                      "validation), edgekd's default student, 10 epochs")]
    head = ("On CIFAR-10 (the shared JPEG copy, test top-1), the default recipe, each distilled run against its matched "
            "scratch twin (the same student passes and augmentation; more in `benchmarks/README.md`):")
    return "\n".join([head, *(f"- {line}" for line in lines if line)])


BLOCKS = {"fresh-clone": block_fresh_clone, "default-models": block_default_models, "default-gains": block_default_gains,
          "default-deploy": block_default_deploy, "speed": block_speed, "cifar-kd": block_cifar_kd}


def render(readme: Path) -> None:
    text = readme.read_text()
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- numbers:{name} -->\n)(?:(?!<!-- numbers:).)*?(<!-- /numbers -->)", re.S)
        if not pattern.search(text):
            sys.exit(f"README.md has no <!-- numbers:{name} --> block")
        text = pattern.sub(lambda m: m.group(1) + make() + "\n" + m.group(2), text)
    readme.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("record")
    r.add_argument("--keep", type=Path, help="clone here and keep it (default: a temporary folder)")
    sub.add_parser("render")
    args = ap.parse_args()
    if args.what == "record":
        record(args.keep)
    render(ROOT / "README.md")


if __name__ == "__main__":
    main()
