"""The architecture matrix: every stage of edgekd on the networks phones run, pass or fail with the reason.

For each architecture: train on the embedded digits (real 8x8 handwritten digits, no download) at
``--input-size`` for ``--epochs`` epochs, export ONNX and TFLite with their parity checks, quantize
to int8 ONNX and TFLite (calibrated, proven int8 by the runtimes' MAC share), benchmark fp32 and
int8 in each runtime (batch 1, 1 thread, p50) and package the int8 TFLite bundle, which loads it in
LiteRT, MediaPipe's ImageClassifier and onnxruntime. A stage that fails records its one-line reason
and the stages that need it are skipped. The digits are small and easy: this matrix is about
whether each architecture goes through the chain and what int8 does to its size and speed, not
about its CIFAR-10 accuracy. Resumable: an architecture already in the results file is skipped.

    python benchmarks/arch_matrix.py [--archs A B ...] [--epochs 15] [--input-size 32] [--batch-size 64] [--out runs/arch_matrix]
    python benchmarks/arch_matrix.py --data ../shared/datasets/cifar10-jpeg --epochs 10 --batch-size 128 \
        --archs torchvision:mobilenet_v3_small --out runs/arch_matrix_cifar10 --name arch_matrix_cifar10
Results: benchmarks/results/NAME.json and .md (default arch_matrix). ``--data`` trains on an ImageFolder
(its own test split; validation carved from train) instead of the digits. ``--from ARCH=CHECKPOINT`` runs the
chain from export on a model trained or distilled elsewhere (e.g. models/), its folder only read:

    python benchmarks/arch_matrix.py --data ../shared/datasets/cifar10-jpeg --out runs/arch_matrix_cifar10 \
        --name arch_matrix_cifar10 --from edge_resnet_s=models/cifar10_edge_resnet_s_kd/best.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import traceback
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ARCHS = ["edge_resnet_s", "seed002_student", "torchvision:mobilenet_v2", "torchvision:mobilenet_v3_small",
         "torchvision:mobilenet_v3_large", "torchvision:efficientnet_b0", "torchvision:shufflenet_v2_x1_0",
         "torchvision:resnet18", "timm:mobilenetv4_conv_small", "timm:efficientnet_lite0", "timm:mobilenetv3_small_100"]
STAGES = ("train", "export", "quantize", "bench", "package")


def _reason(exc: BaseException) -> str:
    from edgekd.errors import EdgeKDError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if isinstance(exc, EdgeKDError) else f"{type(exc).__name__}: {text}"


def run_arch(arch: str, epochs: int, size: int, batch: int, out: Path, data: str = "digits",
             trained: Path | None = None) -> dict:
    from edgekd import DistillConfig, ModelConfig, RecipeConfig, train
    from edgekd.bench import bench
    from edgekd.export import export
    from edgekd.package import package
    from edgekd.quantize import quantize

    run = out / arch.replace(":", "_")
    row: dict = {"arch": arch, "stages": {}}

    def stage(name, fn):
        t0 = time.perf_counter()
        try:
            value = fn()
            row["stages"][name] = {"ok": True, "s": round(time.perf_counter() - t0, 1)}
            return value
        except Exception as exc:  # noqa: BLE001 - a failed stage is a result
            row["stages"][name] = {"ok": False, "s": round(time.perf_counter() - t0, 1), "reason": _reason(exc),
                                   "trace_tail": traceback.format_exc().splitlines()[-3:]}
            return None

    cfg = DistillConfig(model=ModelConfig(arch=arch, input_size=size), recipe=RecipeConfig(epochs=epochs, batch_size=batch))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset=data))
    if trained is not None:  # a model trained (or distilled) elsewhere: its files are copied, the chain starts at export
        res = stage("train", lambda: _adopt(trained, run))
        row["trained_by"] = str(trained)
    else:
        res = stage("train", lambda: train(cfg, run, resume=(run / "last.pt").is_file()))
    if res is None and "Lower the learning rate" in row["stages"]["train"]["reason"]:
        # what edgekd's error tells a user to do: a tenth of the learning rate, in a new folder
        row["first_train"] = row["stages"]["train"]
        cfg = dataclasses.replace(cfg, recipe=RecipeConfig(epochs=epochs, batch_size=batch, lr=cfg.recipe.lr / 10))
        run = out / (arch.replace(":", "_") + "-lr" + f"{cfg.recipe.lr:g}")
        res = stage("train", lambda: train(cfg, run, resume=(run / "last.pt").is_file()))
        row["lr"] = cfg.recipe.lr
    if res is None:
        return row
    row.update(params=res.params, fp32_test_acc_pytorch=res.test_acc)
    ckpt = run / "best.pt"
    exp = stage("export", lambda: export(ckpt))
    if exp is not None:
        row["parity"] = {a.path.name: {"top1_agreement": a.top1_agreement, "max_abs_diff": a.max_abs_diff} for a in exp.artifacts}
    q = stage("quantize", lambda: quantize(ckpt))
    if q is None and "quantize with --io int8" in row["stages"]["quantize"]["reason"]:
        # what edgekd's error tells a user to do where only litert-torch converts the network
        row["first_quantize"], row["io"] = row["stages"]["quantize"], "int8"
        q = stage("quantize", lambda: quantize(ckpt, io="int8"))
    if q is None:
        return row
    row["int8"] = {m.format: {"fp32_acc": m.fp32_test_acc, "int8_acc": m.int8_test_acc, "drop": m.drop_pts,
                              "size_ratio": m.int8.size_bytes / m.fp32.size_bytes, "int8_mac_share": m.int8_mac_share}
                   for m in q.models}
    files = [ckpt] + [p for p in sorted((run / "export").iterdir()) if p.suffix in (".onnx", ".tflite")]
    report = stage("bench", lambda: bench(files, min_runs=50, min_seconds=1.0))
    if report is not None:
        row["latency_ms"] = {r.name: r.latency.p50_ms for r in report.rows if r.latency is not None}
        row["macs"] = next((r.macs for r in report.rows if r.macs), None)
    pkg = stage("package", lambda: package(run, out_dir=run / "bundle", bench_runs=10, bench_seconds=0.2))
    if pkg is not None:
        row["package_checks"] = {c.name: c.ok for c in pkg.checks}
        if not pkg.passed:
            row["stages"]["package"].update(ok=False, reason="; ".join(f"{c.name}: {c.detail}" for c in pkg.checks if not c.ok))
    return row


def _adopt(checkpoint: Path, run: Path):
    """``checkpoint`` and its run's config.json and result.json copied into ``run`` (the source folder is only
    read); its recorded result (params, test accuracy), as train() would return it."""
    import shutil
    import types

    src = checkpoint.parent
    if not (src / "result.json").is_file():
        raise FileNotFoundError(f"{src / 'result.json'} is missing: --from needs an edgekd run folder")
    run.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "result.json"):
        shutil.copyfile(src / name, run / name)
    shutil.copyfile(checkpoint, run / "best.pt")
    result = json.loads((src / "result.json").read_text())
    return types.SimpleNamespace(params=result["params"], test_acc=result["test_acc"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=ARCHS)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("runs/arch_matrix"))
    ap.add_argument("--data", default="digits", help="the embedded digits (default) or an ImageFolder")
    ap.add_argument("--name", default="arch_matrix", help="results/NAME.json and .md")
    ap.add_argument("--from", dest="trained", nargs="+", default=[], metavar="ARCH=CHECKPOINT",
                    help="run the chain from export on an edgekd checkpoint trained or distilled elsewhere "
                         "(its run folder is only read) instead of training ARCH")
    args = ap.parse_args()
    trained = dict(t.split("=", 1) for t in args.trained)
    if trained:  # --from alone runs just those; with --archs, both
        args.archs = list(dict.fromkeys([*(args.archs if args.archs != ARCHS else []), *trained]))
    path = (RESULTS / args.name).with_suffix(".json")
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    if earlier and earlier.get("data", "digits") != args.data:
        raise SystemExit(f"{path.name} holds rows trained on {earlier.get('data', 'digits')}; "
                         f"give --data {args.data} its own --name and --out")
    done = earlier.get("rows", {})
    for arch in args.archs:
        if arch in done:
            continue
        done[arch] = run_arch(arch, args.epochs, args.input_size, args.batch_size, args.out, args.data,
                              Path(trained[arch]) if arch in trained else None)
        print(arch, json.dumps({k: v["ok"] for k, v in done[arch]["stages"].items()}), flush=True)
        path.write_text(json.dumps({"epochs": args.epochs, "input_size": args.input_size, "batch_size": args.batch_size,
                                    "data": args.data, "rows": done}, indent=2) + "\n")
        write_md(args, done)


def _cell(row: dict, stage: str) -> str:
    s = row["stages"].get(stage)
    if s is None:
        return "skipped"
    return "pass" if s["ok"] else f"**fail**: {s['reason'][:140]}"


def write_md(args, done: dict) -> None:
    cmd = f"python benchmarks/arch_matrix.py --epochs {args.epochs} --input-size {args.input_size} --batch-size {args.batch_size}"
    if args.data != "digits":
        cmd += f" --data {args.data} --out {args.out} --name {args.name}"
    what = (f"Embedded digits (1,797 real 8x8 digits, resized to {args.input_size} px)" if args.data == "digits" else
            f"`{args.data}` at {args.input_size} px")
    lines = ["# Architecture matrix: every stage on the networks phones run", "", f"`{cmd}`", "",
             f"{what}, {args.epochs} epochs at batch {args.batch_size} from random init, edgekd's default recipe otherwise. "
             "Accuracies are on its test split through each runtime; int8 drop = fp32 - int8 in the same "
             "runtime. Latency: batch 1, 1 thread, p50 in ms, this 2-core x86 CPU (AVX512-VNNI).", "",
             "Where onnx2tf fails and litert-torch is installed (the `litert` extra), TFLite files come from "
             "litert-torch; each file's sidecar names its converter.", "",
             "| architecture | params | MACs | " + " | ".join(STAGES) + " |", "|---|---:|---:|" + "---|" * len(STAGES)]
    for arch, row in done.items():
        macs = f"{row['macs'] / 1e6:,.1f} M" if row.get("macs") else "-"
        name = f"{arch} (lr {row['lr']:g} after a collapse at the default)" if row.get("lr") else arch
        name += " (int8 TFLite with --io int8: only litert-torch converts it)" if row.get("io") else ""
        name += f" (not trained here: `{row['trained_by']}`)" if row.get("trained_by") else ""
        lines.append(f"| {name} | {row.get('params', 0):,} | {macs} | " + " | ".join(_cell(row, s) for s in STAGES) + " |")
    lines += ["", "| architecture | format | fp32 top-1 | int8 top-1 | drop | size int8/fp32 | MACs in int8 | fp32 p50 ms | int8 p50 ms | int8/fp32 latency |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    names = {"onnx": ("model.onnx", "model_int8.onnx"), "tflite": ("model_fp32.tflite", "model_int8.tflite")}
    for arch, row in done.items():
        for fmt, m in row.get("int8", {}).items():
            lat = row.get("latency_ms", {})
            f32, i8 = (lat.get(n) for n in names[fmt])
            ratio = f"{i8 / f32:.2f}x" if f32 and i8 else "-"
            share = f"{100 * m['int8_mac_share']:.0f}%" if m.get("int8_mac_share") is not None else "-"
            lines.append(f"| {arch} | {fmt} | {m['fp32_acc']:.2f} | {m['int8_acc']:.2f} | {m['drop']:+.2f} | "
                         f"{m['size_ratio']:.2f} | {share} | {f32 or 0:.3f} | {i8 or 0:.3f} | {ratio} |")
    (RESULTS / args.name).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
