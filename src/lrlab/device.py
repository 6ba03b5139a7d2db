"""Device and numeric-precision choices, made once at the top of a run."""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch

from lrlab.errors import LrlabError


def pick_device(name: str = "auto") -> torch.device:
    """Return the torch device for ``name`` ("auto", "cpu", "cuda", "cuda:1", "mps").

    "auto" picks CUDA when available, else CPU.

    Raises:
        LrlabError: when the named device is not available on this machine.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LrlabError(f"device {name!r} is not a valid torch device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LrlabError(f"device {name!r} was asked for but CUDA is not available; use auto or cpu")
    return device


@lru_cache(maxsize=None)
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 arithmetic (x86 AVX-512 BF16 or AMX, Arm BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16", " bf16"))


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``, or None for plain float32.

    precision: "auto" (bf16 on bf16-capable CPUs and on CUDA with bf16, else float32),
    "bf16", "fp16" (CUDA only) or "fp32". Weights always stay float32; only activations
    and matrix products run in the lower precision.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise LrlabError("precision 'fp16' needs a CUDA device; use auto, bf16 or fp32")
        return torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A ``torch.autocast`` context for ``dtype`` on ``device``; a no-op when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@lru_cache(maxsize=None)
def retain_freed_memory() -> bool:
    """Make glibc keep freed memory in the process instead of returning it to the OS.

    Training frees and re-allocates the same activation buffers (tens of MB each) every
    step. By default glibc serves blocks above its mmap threshold with fresh ``mmap``
    pages and unmaps them on free, so each step pays page faults and kernel zeroing of all
    that memory again: on the 2-core CI machine this cost 27% of a FastNet x0.5 step
    (1,672-1,696 vs 2,287-2,318 images/s at batch 512, benchmarks/step_throughput.py). This calls
    ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)`` once, the
    runtime equivalents of the MALLOC_MMAP_MAX_ / MALLOC_TRIM_THRESHOLD_ environment
    variables (glibc manual, "Memory Allocation Tunables"); the price is that the resident
    size stays at its peak. Returns True when applied, False where glibc is not the
    allocator (macOS, Windows, musl), where nothing is changed.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False
