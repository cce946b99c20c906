"""Where one training step's time goes, phase by phase, for edgekd's CPU training loop.

Each step runs the same calls as ``edgekd.distill``'s loop (gather a batch of uint8 images,
augment, normalize, forward, loss, backward, gradient clipping, optimizer, schedule, metrics),
with a clock between phases. On the CPU every call is synchronous, so a phase's time is its own.
A second, untimed pass of the same steps gives the step time without the clocks.

Usage:
    python benchmarks/step_profile.py [--arch seed002_student ...] [--batch 128 256] [--steps 40]
        [--variants eager channels_first compile] [--out NAME]
Images are the shared CIFAR-10 JPEG copy when it is beside the repository, random uint8 pixels of
the same shape otherwise (the speed of these phases does not depend on pixel values).
Results: benchmarks/results/<NAME>.json and .md (default step_profile).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edgekd import losses
from edgekd.data import apply_augment, augment_params, to_unit
from edgekd.distill import GradClipper, InputSpec
from edgekd.native import retained_heap
from edgekd.zoo import build_model, pool_before_activation

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"
PHASES = ("gather", "augment", "normalize", "forward", "loss", "backward", "clip", "optimizer", "schedule", "metrics")


def images(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    if DATA.exists():
        from edgekd.data import load_data

        d = load_data(str(DATA), val_fraction=0.1)
        return d.train_x[:n], d.train_y[:n], "cifar10-jpeg"
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g), "random"


def setup(arch: str, batch: int, steps: int, variant: str):
    torch.manual_seed(0)
    model = build_model(arch, 10, 3, (32, 32))
    channels_last = variant != "channels_first"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    spec = InputSpec(3, (32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9, nesterov=True, fused=variant != "before")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10 * steps)
    clip = GradClipper(model.parameters(), 4.0, torch.device("cpu"))
    forward = torch.compile(model) if variant == "compile" else model
    if variant not in ("before", "compile"):
        forward = pool_before_activation(forward)
    augment = augment_by_indexing if variant == "before" else apply_augment
    return model, forward, spec, opt, sched, clip, variant == "bf16", augment


def augment_by_indexing(x: torch.Tensor, params: torch.Tensor, pad: int) -> torch.Tensor:
    """edgekd's augmentation before the single-gather version (kept here to time the difference)."""
    params = params.long()
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = params[:, 0:1] + torch.arange(h)
    cols = params[:, 1:2] + torch.arange(w)
    x = padded.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    x = x.permute(0, 3, 1, 2)
    return torch.where(params[:, 2].bool()[:, None, None, None], x.flip(-1), x).contiguous()


def run_steps(parts, x_all, y_all, batch: int, steps: int, timed: bool) -> tuple[dict[str, float], float]:
    model, forward, spec, opt, sched, clip, bf16, augment = parts
    model.train()
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(len(x_all), generator=gen)
    params = augment_params(len(x_all), 4, True, gen)
    acc = {p: 0.0 for p in PHASES}
    loss_sum, correct = torch.zeros(()), torch.zeros(())
    clock = time.perf_counter
    t_begin = clock()
    for step in range(steps):
        t = clock()
        idx = perm[(step * batch) % (len(perm) - batch):][:batch]
        x_u8, y = x_all[idx], y_all[idx]
        marks = [clock()] if timed else None
        x = to_unit(augment(x_u8, params[idx], 4))
        timed and marks.append(clock())
        x = spec(x)
        timed and marks.append(clock())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = forward(x)
        timed and marks.append(clock())
        loss = losses.distillation_loss(logits, y, None, alpha=0.0, temperature=1.0)
        timed and marks.append(clock())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        timed and marks.append(clock())
        clip()
        timed and marks.append(clock())
        opt.step()
        timed and marks.append(clock())
        sched.step()
        timed and marks.append(clock())
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(1) == y).sum()
        if timed:
            marks.append(clock())
            for name, a, b in zip(PHASES, [t] + marks[:-1], marks):
                acc[name] += b - a
    total = clock() - t_begin
    float(loss_sum)
    return {k: v / steps for k, v in acc.items()}, total / steps


def profile(arch: str, batch: int, steps: int, variant: str, x_all, y_all, rounds: int) -> dict:
    """One variant's phases; inside ``retained_heap`` as edgekd's loop runs, except ``before`` and ``no_heap``."""
    with contextlib.nullcontext() if variant in ("before", "no_heap") else retained_heap():
        return _profile(arch, batch, steps, variant, x_all, y_all, rounds)


def _profile(arch: str, batch: int, steps: int, variant: str, x_all, y_all, rounds: int) -> dict:
    parts = setup(arch, batch, steps, variant)
    t0 = time.perf_counter()
    run_steps(parts, x_all, y_all, batch, 3, timed=False)  # warm-up (and compilation)
    warmup_s = time.perf_counter() - t0
    phase_runs, step_runs = [], []
    for _ in range(rounds):
        phases, _ = run_steps(parts, x_all, y_all, batch, steps, timed=True)
        _, step = run_steps(parts, x_all, y_all, batch, steps, timed=False)
        phase_runs.append(phases)
        step_runs.append(step)
    phases = {p: statistics.median(r[p] for r in phase_runs) for p in PHASES}
    step = statistics.median(step_runs)
    return {"arch": arch, "batch": batch, "variant": variant, "steps": steps, "rounds": rounds,
            "warmup_s": warmup_s, "step_ms": 1000 * step, "images_per_s": batch / step,
            "phase_ms": {p: 1000 * v for p, v in phases.items()},
            "params": sum(p.numel() for p in parts[0].parameters())}


def render(rows: list[dict], source: str, threads: int) -> str:
    lines = [f"# One training step, phase by phase ({source} images, {threads} threads, median of rounds)", "",
             "Command: `python benchmarks/step_profile.py " + " ".join(os.sys.argv[1:]) + "`", "",
             "| arch | batch | variant | img/s | step ms | " + " | ".join(PHASES) + " | warm-up s |",
             "|---|---:|---|---:|---:|" + "---:|" * len(PHASES) + "---:|"]
    for r in rows:
        shares = " | ".join(f"{r['phase_ms'][p]:.2f} ({100 * r['phase_ms'][p] / sum(r['phase_ms'].values()):.0f}%)"
                            for p in PHASES)
        lines.append(f"| {r['arch']} | {r['batch']} | {r['variant']} | {r['images_per_s']:,.0f} | {r['step_ms']:.2f} | "
                     f"{shares} | {r['warmup_s']:.1f} |")
    lines += ["", "Phase cells: milliseconds per step (share of the timed step). `step ms` is the same steps "
              "without the clocks. Variants: `before` = edgekd's loop before this round's changes (activation "
              "before max-pool, per-tensor optimizer, augmentation by indexing then flipping, glibc's default heap); `no_heap` = "
              "`eager` with glibc's default heap (edgekd's default before `native.retained_heap`); `eager` = edgekd's "
              "default (channels-last, eager PyTorch, pool before activation, fused optimizer, `retained_heap`); "
              "`channels_first`; `compile` = `torch.compile` of the model (inductor), compilation in warm-up; "
              "`bf16` = bf16 autocast around the forward pass (" + _bf16_units() + ")."]
    return "\n".join(lines) + "\n"


def _bf16_units() -> str:
    """What this CPU runs bf16 matrix products on: AMX tiles, AVX512-BF16 instructions, or neither."""
    from edgekd.distill import cpu_has_amx

    if cpu_has_amx():
        return "AMX tiles on this CPU"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16; this CPU has no AMX"
    return "this CPU has neither AMX nor AVX512-BF16"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["seed002_teacher", "seed002_student", "edge_resnet_s"])
    ap.add_argument("--batch", nargs="+", type=int, default=[128, 256])
    ap.add_argument("--variants", nargs="+", default=["before", "eager", "channels_first", "compile", "bf16"],
                    choices=["before", "no_heap", "eager", "channels_first", "compile", "bf16"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="step_profile")
    args = ap.parse_args()
    x_all, y_all, source = images(20000)
    rows = []
    for arch in args.arch:
        for batch in args.batch:
            for variant in args.variants:
                rows.append(profile(arch, batch, args.steps, variant, x_all, y_all, args.rounds))
                r = rows[-1]
                print(f"{arch} b{batch} {variant}: {r['images_per_s']:.0f} img/s, step {r['step_ms']:.1f} ms "
                      + " ".join(f"{p}={v:.1f}" for p, v in r["phase_ms"].items()), flush=True)
    out = ROOT / "benchmarks" / "results" / args.out
    meta = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "threads": torch.get_num_threads(), "torch": torch.__version__},
            "images": source, "recorded": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(rows, source, torch.get_num_threads()))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
