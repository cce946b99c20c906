"""Where the bytes of an exported model go: weights by type, quantization parameters, names, and the rest.

    python benchmarks/size_breakdown.py runs/arch_matrix_cifar10/torchvision_mobilenet_v2/export/*.{onnx,tflite}

Each line is a share of the file's own size, and of the first file's size of the same format (pass the
fp32 file before the int8 file of the same folder to read the int8/fp32 ratio part by part). Reads the files only; with
--name, also writes results/NAME.json and .md.
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def onnx_parts(path: Path) -> dict[str, int]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    parts: collections.Counter = collections.Counter()
    g = model.graph
    consumers = collections.defaultdict(list)
    for node in g.node:
        for name in node.input:
            consumers[name].append(node)
    for init in g.initializer:
        arr = numpy_helper.to_array(init)
        users = consumers.get(init.name, [])
        role = "weights"
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and list(n.input).index(init.name) > 0 for n in users):
            role = "quantization parameters"
        elif arr.ndim <= 1 and arr.dtype.kind == "i" and arr.dtype.itemsize == 4:
            role = "int32 biases"
        elif arr.ndim <= 1:
            role = "vectors (biases, shapes)"
        parts[f"{role} ({arr.dtype})" if role == "weights" else role] += arr.nbytes
    names = sum(len(n.name) + sum(len(x) for x in n.input) + sum(len(x) for x in n.output) for n in g.node)
    names += sum(len(i.name) for i in g.initializer) + sum(len(v.name) for v in list(g.value_info) + list(g.input) + list(g.output))
    parts["names"] = names
    parts["metadata"] = sum(len(p.key) + len(p.value) for p in model.metadata_props)
    parts["graph and framing"] = path.stat().st_size - sum(parts.values())
    return dict(parts)


def tflite_parts(path: Path) -> dict[str, int]:
    import numpy as np
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    parts: collections.Counter = collections.Counter()
    seen = set()
    for sg in model.subgraphs:
        for t in sg.tensors:
            parts["names"] += len(t.name or b"")
            q = t.quantization
            if q is not None:
                for arr, width in ((q.scale, 4), (q.zeroPoint, 8), (q.min, 4), (q.max, 4)):
                    if arr is not None:
                        parts["quantization parameters"] += len(arr) * width
            buf = model.buffers[t.buffer]
            if t.buffer in seen or buf.data is None:
                continue
            seen.add(t.buffer)
            nbytes = np.asarray(buf.data).nbytes
            dtype = {0: "float32", 2: "int32", 9: "int8", 3: "uint8", 4: "int64", 1: "float16"}.get(t.type, str(t.type))
            role = "int32 biases" if dtype == "int32" and len(t.shape) == 1 else f"weights ({dtype})"
            parts[role] += nbytes
    parts["metadata"] = sum(np.asarray(model.buffers[m.buffer].data).nbytes for m in (model.metadata or [])
                            if model.buffers[m.buffer].data is not None)
    parts["graph and framing"] = path.stat().st_size - sum(parts.values())
    return dict(parts)


RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--name", help="also write results/NAME.json and .md")
    args = ap.parse_args()
    bases: dict[tuple, Path] = {}
    out, lines = {}, []
    for f in args.files:
        base = bases.setdefault((f.parent, f.suffix), f)
        size, base_size = f.stat().st_size, base.stat().st_size
        parts = onnx_parts(f) if f.suffix == ".onnx" else tflite_parts(f)
        out[str(f)] = {"size": size, "of": str(base), "parts": parts}
        lines += [f"`{f}`: {size:,} B, {size / base_size:.3f}x `{base.name}`", "",
                  f"| part | bytes | share of file | x `{base.name}` |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v:,} | {v / size:.1%} | {v / base_size:.4f} |"
                  for k, v in sorted(parts.items(), key=lambda kv: -kv[1])] + [""]
    print("\n".join(lines))
    if args.name:
        cmd = "python benchmarks/size_breakdown.py " + " ".join(map(str, args.files)) + f" --name {args.name}"
        (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": cmd, "files": out}, indent=1) + "\n")
        (RESULTS / f"{args.name}.md").write_text("# Where the bytes go\n\n`" + cmd + "`\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
