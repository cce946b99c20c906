"""Native code edgekd has to steer from Python.

Output: TensorFlow, LiteRT and MediaPipe log from C++ straight to the process's file descriptors,
past Python's ``sys.stderr`` and past ``TF_CPP_MIN_LOG_LEVEL`` (absl's logger in TensorFlow 2.21
ignores it). The only way to keep their lines out of a user's terminal and ``--json`` output is to
point the descriptors elsewhere while they run.

Memory: glibc's allocator hands every buffer above its mmap threshold back to the kernel when it is
freed, so a training step's large activations come back as fresh pages that fault in one by one
(``retained_heap``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
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


# glibc's mallopt parameters (malloc.h). On the way out the thresholds go to where glibc's own dynamic
# adjustment settles for large buffers (mmap threshold at most 32 MiB, trim threshold twice that).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_SETTLED_MMAP_BYTES, _SETTLED_TRIM_BYTES = 32 << 20, 64 << 20
_RETAIN_BYTES = 1 << 30
_USER_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


@contextmanager
def retained_heap():
    """Inside the block, glibc keeps freed memory for reuse instead of returning it to the kernel.

    A CPU training step allocates and frees the same large tensors every step (seed 002's teacher:
    tens of MB per activation at batch 256). Above glibc's mmap threshold each one is a fresh
    ``mmap`` whose pages fault in and are zeroed by the kernel, then ``munmap``-ed at free: 100k+
    page faults a step, a quarter of the step time (``benchmarks/results/heap.md``). Raising the
    mmap and trim thresholds keeps those buffers in the heap: the same step faults a few dozen
    times. What PyTorch's CPU tuning guide gets by preloading jemalloc or tcmalloc, without asking
    the user to relaunch the process. The setting is process-wide while the block runs. On exit the
    thresholds go to the values glibc's dynamic adjustment settles at for large buffers (32 MiB and
    64 MiB; after any mallopt call glibc no longer adjusts them itself) and the retained memory is
    released (``malloc_trim``). Nothing changes where the user tuned glibc's allocator
    (``GLIBC_TUNABLES``, ``MALLOC_*_``), or on other C libraries (macOS, musl).

    Our own: no library sets this from inside a running process.
    """
    libc = _glibc()
    if libc is None or any(v in os.environ for v in _USER_SETTINGS) or not (
            libc.mallopt(_M_MMAP_THRESHOLD, _RETAIN_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, _RETAIN_BYTES)):
        yield
        return
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _SETTLED_MMAP_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _SETTLED_TRIM_BYTES)
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _glibc():
    """The process's C library when it is glibc (the one with ``mallopt`` and ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only; musl has mallopt but not this  # noqa: B018
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None
