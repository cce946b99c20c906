"""Put a finished run into models/ as a reference model, and regenerate models/README.md.

For ``NAME`` and the run directory that trained it, writes ``models/NAME/``:
  best.pt, config.json, result.json, history.csv   the checkpoint and how it was trained (copied)
  COMMAND                                          the command that made the run (given here)
  bench/bench.md, bench/bench.json                 ``edgekd bench`` of the checkpoint and its fp32/int8 files
  bundle/                                          ``edgekd package``: the app bundle with its model card
The int8 files come from ``edgekd quantize`` (``models/NAME/export/``, removed once packaged: the bundle
holds the int8 TFLite and both ONNX files). Every number in the index is read from these files.

    python benchmarks/reference_models.py add cifar10_fastcnn_teacher runs/c10-teacher \\
        --data ../shared/datasets/cifar10-jpeg --command "edgekd train --config configs/cifar10_teacher.toml ..."
    python benchmarks/reference_models.py index
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
EDGEKD = [sys.executable, "-m", "edgekd.cli"]


def edgekd(*args: str) -> None:
    print("+ edgekd", " ".join(args), flush=True)
    subprocess.run([*EDGEKD, *args], check=True, cwd=ROOT)


def add(name: str, run: Path, data: str, command: str, teacher: str | None) -> None:
    dest = MODELS / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("best.pt", "config.json", "history.csv"):
        shutil.copy2(run / f, dest / f)
    result = json.loads((run / "result.json").read_text())
    result.pop("out_dir", None)  # a path on the machine that trained it
    (dest / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (dest / "COMMAND").write_text(command.strip() + "\n")
    edgekd("quantize", str(dest / "best.pt"), "--data", data, "--max-drop", "1.0", "--out", str(dest / "export"))
    edgekd("bench", str(dest / "best.pt"), str(dest / "export"), "--data", data, "--out", str(dest / "bench"),
           *(["--teacher", teacher] if teacher else []))
    for extra in (dest / "bench").iterdir():  # the Markdown report and its JSON are what models/ keeps
        if extra.name not in ("bench.md", "bench.json"):
            extra.unlink()
    shutil.rmtree(dest / "bundle", ignore_errors=True)
    edgekd("package", str(dest / "export" / "model_int8.tflite"), "--data", data, "--out", str(dest / "bundle"))
    shutil.rmtree(dest / "export")


def index() -> str:
    rows = ["| model | arch | params | val top-1 | test top-1 | int8 TFLite | int8 top-1 (LiteRT) | made by |",
            "|---|---|---:|---:|---:|---:|---:|---|"]
    for d in sorted(p for p in MODELS.iterdir() if (p / "result.json").is_file()):
        r = json.loads((d / "result.json").read_text())
        bundle = json.loads((d / "bundle" / "model.json").read_text()) if (d / "bundle" / "model.json").is_file() else {}
        lite = bundle.get("measured", {}).get("model.tflite", {})
        size = f"{lite['size_bytes'] / 1024:,.0f} KiB" if lite else "-"
        top1 = f"{lite['top1']:.2f}%" if lite else "-"
        rows.append(f"| [{d.name}]({d.name}/) | {r['arch']} | {r['params']:,} | {r['best_val_acc']:.2f}% | "
                    f"{r['test_acc']:.2f}% | {size} | {top1} | [`COMMAND`]({d.name}/COMMAND) |")
    return "\n".join(rows)


def write_index() -> None:
    head = (MODELS / "README.md").read_text().split("<!-- index -->")[0] if (MODELS / "README.md").is_file() else ""
    (MODELS / "README.md").write_text(head + "<!-- index -->\n" + index() + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("add", help="copy a run into models/NAME, quantize, bench and package it")
    a.add_argument("name")
    a.add_argument("run", type=Path)
    a.add_argument("--data", required=True)
    a.add_argument("--command", required=True, help="the command that made the run")
    a.add_argument("--teacher", help="reference model for the bench deltas")
    sub.add_parser("index", help="regenerate models/README.md's table")
    args = ap.parse_args()
    if args.what == "add":
        add(args.name, args.run, args.data, args.command, args.teacher)
    write_index()


if __name__ == "__main__":
    main()
