"""edgekd checkpoints: a state dict plus everything needed to rebuild and feed the model.

Files are written to a temporary name and renamed, so an interrupted write never leaves a
half checkpoint, and read with ``weights_only=True``, so a checkpoint can never run code.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from edgekd.errors import EdgeKDError
from edgekd.files import atomic_write_bytes
from edgekd.zoo import build_model
import edgekd.rundir as rundir

FORMAT = "edgekd.checkpoint/1"
MODEL_KEYS = ("arch", "arch_kwargs", "classes", "in_channels", "input_size", "mean", "std")


def save_checkpoint(path: Path, model: nn.Module, meta: dict, **extra: Any) -> None:
    """Write ``meta`` (see ``MODEL_KEYS``), the model's state dict and ``extra`` atomically."""
    missing = [k for k in MODEL_KEYS if k not in meta]
    if missing:
        raise ValueError(f"checkpoint meta lacks {missing}")
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    payload = {"format": FORMAT, **{k: meta[k] for k in MODEL_KEYS}, "state_dict": state, **extra}
    save_atomic(path, payload)


def save_atomic(path: str | Path, obj: Any) -> None:
    """``torch.save`` through memory, then an atomic write: on a full disk torch's zip writer raises
    an opaque RuntimeError, a plain file write raises OSError(ENOSPC), which the CLI reports in one line."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(Path(path), lambda tmp: tmp.write_bytes(buf.getbuffer()))


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint with ``weights_only=True``; refuse anything else with a clear message."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise EdgeKDError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise EdgeKDError(
            f"{path} needs arbitrary unpickling, which edgekd refuses (it can run code); "
            "give an edgekd checkpoint, or export the model to TorchScript or ONNX"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated zips, wrong magic numbers, ...
        raise EdgeKDError(f"{path} is corrupt or not a PyTorch file ({exc.__class__.__name__}); re-create it") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise EdgeKDError(f"{path} is not an edgekd checkpoint (no {FORMAT!r} header); train it with edgekd")
    return ckpt


def model_meta(ckpt: dict) -> dict:
    return {k: ckpt[k] for k in MODEL_KEYS}


def build_from_meta(meta: dict) -> nn.Module:
    kwargs = {k: v for k, v in meta["arch_kwargs"].items() if k != "pretrained" and k != "weights_path"}
    return build_model(meta["arch"], len(meta["classes"]), meta["in_channels"], tuple(meta["input_size"]), **kwargs)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved in an edgekd checkpoint, in eval mode.

    Example:
        >>> model, meta = load_model("runs/distill/best.pt")  # doctest: +SKIP
        >>> meta["classes"][:2]  # doctest: +SKIP
        ['airplane', 'automobile']
    """
    ckpt = load_checkpoint(path)
    meta = model_meta(ckpt)
    model = build_from_meta(meta)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise EdgeKDError(f"{path}: weights do not fit architecture {meta['arch']!r} ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval(), meta


def chosen_input_size(ckpt: str | Path) -> tuple[int, int] | None:
    """The input size a checkpoint's run chose on purpose (``model.input_size`` in the config.json beside
    it, e.g. 48 px for an ImageNet backbone on 32 px data): resizing to it is intended, not a mismatch."""
    size = rundir.recorded_config(ckpt).get("model", {}).get("input_size")
    return (size, size) if isinstance(size, int) else None


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
