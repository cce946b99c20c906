"""Distillation under torchrun, and the parts of the loop that only a GPU or several processes exercise
(device moves, loss scaling, CUDA RNG, precision), tested through their CPU-side logic."""

import importlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgekd import DistillConfig, ModelConfig, RecipeConfig, train
from edgekd.checkpoint import load_checkpoint, save_atomic, save_checkpoint
from edgekd.cli import app
from edgekd.distill import (EpochOrder, Runtime, TeacherCache, _batch_views, _check_finite, _load_resume_state,
                            _resume_state, same_config, _teacher_logits, _wait_for_cache, resolve_precision)
from edgekd.errors import EdgeKDError
from edgekd.teachers import ForeignInput, FunctionTeacher

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _torchrun(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``script`` in two CPU processes (gloo) on a free port, as `test_torchrun_two_processes_gloo` does."""
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


DISTILL_SCRIPT = """
    import importlib, json, os, sys
    from pathlib import Path
    import torch
    distill = importlib.import_module("edgekd.distill")
    from edgekd.config import DistillConfig, KDConfig, ModelConfig, RecipeConfig
    from tests.conftest import prototype_data

    torch.set_num_threads(1)
    teacher, out = sys.argv[1], Path(sys.argv[2])
    calls = {"built": 0, "read": []}
    build, read = distill.build_teacher_cache, distill._read_cache

    def counting_build(*args, **kwargs):
        calls["built"] += 1
        return build(*args, **kwargs)

    def recording_read(path, key):
        cache = read(path, key)
        if cache is not None:
            calls["read"].append(str(path))
        return cache

    distill.build_teacher_cache, distill._read_cache = counting_build, recording_read
    cfg = DistillConfig(model=ModelConfig(arch="seed002_student"),
                        recipe=RecipeConfig(epochs=2, optimizer="adam", lr=3e-3, batch_size=32, augment_pad=1, augment_flip=True),
                        kd=KDConfig(teachers=(teacher,), cache_views=2))
    result = distill.train(cfg, out, data=prototype_data())
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps({**calls, "test_acc": result.test_acc}))
"""


def test_torchrun_distills_with_one_teacher_cache_built_by_rank_zero(teacher_run, tmp_path):
    out = tmp_path / "ddp"
    proc = _torchrun(DISTILL_SCRIPT, str(teacher_run.out_dir / "best.pt"), str(out), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [str(p) for p in (out / "teacher_cache").glob("teacher-*.pt")]
    rank0, rank1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(files) == 1
    assert rank0["built"] == 1 and rank0["read"] == []  # built it, as nothing was there
    assert rank1["built"] == 0 and rank1["read"] == files  # read rank 0's file, built nothing
    result = json.loads((out / "result.json").read_text())
    assert result["test_acc"] > 50 and result["epochs"] == 2 and rank1["test_acc"] == result["test_acc"]


FINITE_SCRIPT = """
    import sys
    import torch
    import torch.distributed as dist
    from edgekd.distill import Runtime, _check_finite
    from edgekd.errors import EdgeKDError

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rt = Runtime(torch.device("cpu"), rank, dist.get_world_size())
    _check_finite(torch.tensor(1.0 + rank), rt, 1, 1)  # finite everywhere: no error anywhere
    try:
        _check_finite(torch.tensor(float("nan") if rank == 1 else 0.5), rt, 3, 7)
        message = "no error"
    except EdgeKDError as exc:
        message = str(exc)
    with open(f"{sys.argv[1]}/rank{rank}.txt", "w") as f:
        f.write(message)
    dist.destroy_process_group()
"""


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_the_same_error(tmp_path):
    proc = _torchrun(FINITE_SCRIPT, str(tmp_path), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    messages = {(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert len(messages) == 1
    message = messages.pop()
    assert "at epoch 3, step 7" in message and "lower the learning rate" in message and "\n" not in message


def test_finite_check_in_one_process():
    rt = Runtime(CPU)
    _check_finite(torch.tensor(2.5, requires_grad=True) * 2, rt, 1, 1)
    with pytest.raises(EdgeKDError, match=r"^loss became inf at epoch 2, step 5; lower the learning rate \(--lr\)$"):
        _check_finite(torch.tensor(float("inf")), rt, 2, 5)


def _write_cache(path: Path, key: str, value: float) -> None:
    save_atomic(path, {"key": key, "params": torch.zeros(1, 3, 3, dtype=torch.int16),
                       "logits": torch.full((1, 1, 3, 2), value, dtype=torch.float16)})


def test_other_ranks_wait_for_the_cache_file_with_the_right_key(tmp_path):
    path = tmp_path / "teacher-k.pt"
    _write_cache(path, "stale", 1.0)  # an earlier run's file, another key

    def rank_zero():
        time.sleep(0.3)
        _write_cache(path, "k", 2.0)

    writer = threading.Thread(target=rank_zero)
    writer.start()
    t0 = time.monotonic()
    (cache,) = _wait_for_cache([path], ["k"], wait_s=30.0, poll_s=0.02)
    writer.join()
    assert time.monotonic() - t0 >= 0.25 and float(cache.logits[0, 0, 0, 0]) == 2.0


def test_waiting_for_a_cache_that_never_comes_is_one_clear_error(tmp_path):
    with pytest.raises(EdgeKDError, match="same cache directory"):
        _wait_for_cache([tmp_path / "teacher-k.pt"], ["k"], wait_s=0.1, poll_s=0.02)


def test_last_pt_carries_the_grad_scaler_and_cuda_rng_and_resume_restores_them(tmp_path, monkeypatch):
    cuda_rng = torch.arange(16, dtype=torch.uint8)
    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": cuda_rng.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.update(state=state, device=device))
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)  # stands in for CUDA's: same state
    gpu = torch.device("cuda", 1)
    meta = {"arch": "x", "arch_kwargs": {}, "classes": ["a", "b"], "in_channels": 1, "input_size": [1, 3], "mean": [0.0], "std": [1.0]}
    save_checkpoint(tmp_path / "last.pt", model, meta, **_resume_state(optimizer, scheduler, scaler, gpu))
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["scaler"]["scale"] == 1024.0 and torch.equal(ckpt["cuda_rng"], cuda_rng)

    fresh = torch.amp.GradScaler("cpu")
    _load_resume_state(ckpt, optimizer, scheduler, fresh, gpu)
    assert fresh.get_scale() == 1024.0 and fresh.get_growth_interval() == 7
    assert torch.equal(restored["state"], cuda_rng) and restored["device"] == gpu


def test_a_cpu_run_saves_no_cuda_rng_and_its_empty_scaler_state_resumes_on_a_gpu(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    state = _resume_state(optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=False), CPU)
    assert "cuda_rng" not in state and state["scaler"] == {}
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *a: pytest.fail("no CUDA RNG was saved"))
    enabled = torch.amp.GradScaler("cpu", init_scale=8.0)
    _load_resume_state(state, optimizer, scheduler, enabled, torch.device("cuda", 0))
    assert enabled.get_scale() == 8.0


def test_a_run_saved_before_a_config_field_existed_still_resumes():
    cfg = DistillConfig(recipe=RecipeConfig(epochs=3))
    saved = cfg.to_dict()
    del saved["recipe"]["precision"]
    assert same_config(saved, cfg)
    assert not same_config(saved, DistillConfig(recipe=RecipeConfig(epochs=3, precision="bf16")))
    assert not same_config({**saved, "recipe": {**saved["recipe"], "gone": 1}}, cfg)


@pytest.mark.parametrize("precision, amp, device, autocast, scaled", [
    ("auto", True, "cpu", None, False),
    ("auto", True, "cuda:0", torch.float16, True),
    ("auto", False, "cuda:0", None, False),
    ("fp32", True, "cuda:0", None, False),
    ("bf16", True, "cpu", torch.bfloat16, False),
    ("bf16", True, "cuda:0", torch.bfloat16, False),
    ("fp16", False, "cuda:0", torch.float16, True),
])
def test_precision_choices(precision, amp, device, autocast, scaled, monkeypatch):
    monkeypatch.setattr(importlib.import_module("edgekd.distill"), "cpu_has_amx", lambda: False)
    p = resolve_precision(precision, amp, torch.device(device))
    assert (p.autocast, p.scaled) == (autocast, scaled)


def test_auto_precision_is_bf16_on_a_cpu_with_amx_tiles_unless_amp_is_off(monkeypatch):
    distill = importlib.import_module("edgekd.distill")
    monkeypatch.setattr(distill, "cpu_has_amx", lambda: True)
    assert resolve_precision("auto", True, CPU) == distill.Precision(torch.bfloat16, False, "bf16")
    assert resolve_precision("auto", False, CPU).autocast is None  # amp off: fp32
    assert resolve_precision("fp32", True, CPU).autocast is None  # asked for: fp32
    assert resolve_precision("auto", True, torch.device("cuda:0")).name == "fp16"  # CUDA keeps fp16
    monkeypatch.undo()  # the real probe, made to fail: a probe that raises means no AMX
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: (_ for _ in ()).throw(RuntimeError("probe")),
                        raising=False)
    assert distill.cpu_has_amx() is False and resolve_precision("auto", True, CPU).name == "fp32"


def test_fp16_on_the_cpu_is_refused_in_one_line(tmp_path):
    with pytest.raises(EdgeKDError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", True, CPU)
    result = CliRunner().invoke(app, ["train", "--precision", "fp16", "--device", "cpu", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "fp16 needs a CUDA GPU" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["distill", "--precision", "fp8", "-t", "x.pt", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "precision must be one of auto, fp32, bf16, fp16" in result.output


def test_bf16_autocast_trains_on_the_cpu(synth, tmp_path, monkeypatch):
    distill = importlib.import_module("edgekd.distill")

    cfg = DistillConfig(model=ModelConfig(arch="seed002_student"),
                        recipe=RecipeConfig(epochs=1, optimizer="adam", lr=3e-3, batch_size=32, augment_pad=0,
                                            augment_flip=False, precision="bf16"))
    dtypes, build = [], distill._build

    def build_and_watch(*args):
        model, meta = build(*args)
        model.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
        return model, meta

    monkeypatch.setattr(distill, "_build", build_and_watch)
    result = train(cfg, tmp_path, data=synth)
    assert set(dtypes) == {torch.bfloat16, torch.float32}  # bf16 training steps, fp32 evaluation
    assert result.test_acc > 50


def test_teacher_and_cached_logits_move_to_the_training_device():
    """A CUDA run's batches meet CPU answers: numpy runtimes, and the cache kept in CPU memory.
    The "meta" device stands in for the GPU: a missing move leaves the tensor on the CPU."""
    gpu = torch.device("meta")
    teacher = FunctionTeacher("t", lambda x: np.ones((len(x), 4), dtype=np.float32))
    assert _teacher_logits([teacher, teacher], torch.rand(2, 3, 8, 8), gpu).device == gpu
    cache = TeacherCache(torch.zeros(2, 5, 3, dtype=torch.int16), torch.zeros(1, 2, 5, 4, dtype=torch.float16))
    order = EpochOrder(torch.arange(5), torch.tensor([0, 1, 1, 0, 1]), torch.zeros(5, 3, dtype=torch.int16))
    params, logits = _batch_views(cache, order, torch.tensor([4, 2]), gpu, augment=True)
    assert params.device == CPU and logits.device == gpu and logits.dtype == torch.float32 and logits.shape == (1, 2, 4)
    params, logits = _batch_views(None, order, torch.tensor([4, 2]), gpu, augment=True)
    assert params.shape == (2, 3) and logits is None


def test_foreign_input_prepares_any_tensor_as_float32_numpy():
    spec = ForeignInput("NHWC", (4, 4), 3, mean=(0.5,), std=(0.25,))
    x = torch.rand(2, 3, 4, 4)
    want = ((x - 0.5) / 0.25).permute(0, 2, 3, 1).numpy()
    for variant in (x, x.half().float(), x.clone().requires_grad_(), x.double(), x.transpose(2, 3).transpose(2, 3)):
        got = spec.prepare(variant)
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == (2, 4, 4, 3)
        np.testing.assert_allclose(got, ((variant.detach().float() - 0.5) / 0.25).permute(0, 2, 3, 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(spec.prepare(x), want, atol=1e-6)
