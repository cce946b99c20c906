"""Native libraries' own output: TensorFlow, LiteRT and MediaPipe log from C++ straight to the
process's file descriptors, past Python's ``sys.stderr`` and past ``TF_CPP_MIN_LOG_LEVEL`` (absl's
logger in TensorFlow 2.21 ignores it). The only way to keep their lines out of a user's terminal
and ``--json`` output is to point the descriptors elsewhere while they run.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path


@contextmanager
def captured_output(log: Path):
    """Send stdout and stderr to ``log`` (appending), both Python's objects and file descriptors 1
    and 2: TensorFlow's converter prints through both, which would corrupt ``--json`` output on
    stdout, or a notebook's cell output where ``sys.stdout`` is not descriptor 1."""
    with open(log, "ab") as f, _redirected((1, 2), f.fileno()), open(log, "a") as text, \
            redirect_stdout(text), redirect_stderr(text):
        yield


@contextmanager
def quiet_native_logs():
    """Hold back what native code writes to stderr (fd 2) inside the block: TensorFlow's start-up
    lines, LiteRT's "Created TensorFlow Lite XNNPACK delegate", MediaPipe's glog. Kept when the
    block raises: then the text goes to stderr after all, since it may say why."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # still honoured by older TensorFlow builds
    _load_triton_first()
    with tempfile.TemporaryFile() as f:
        try:
            with _redirected((2,), f.fileno()):
                yield
        except BaseException:
            f.seek(0)
            sys.stderr.write(f.read().decode(errors="replace"))
            raise


def _load_triton_first() -> None:
    """Load triton's native libraries (through torch's FLOP counter, which bench uses) before any
    TensorFlow-stack library: with torch 2.14 and TensorFlow 2.21 in one process, importing triton
    after onnx2tf had loaded TensorFlow crashed the interpreter (a segmentation fault in
    ``edgekd.package`` after ``edgekd.quantize``); this order works. Every TensorFlow, onnx2tf,
    Keras, LiteRT and MediaPipe load in edgekd runs inside ``quiet_native_logs``."""
    try:
        import torch.utils.flop_counter  # noqa: F401
    except ImportError:  # a torch without it: nothing to order
        pass


@contextmanager
def _redirected(fds: tuple[int, ...], target: int):
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    try:
        for fd in fds:
            os.dup2(target, fd)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip(fds, saved):
            os.dup2(copy, fd)
            os.close(copy)
