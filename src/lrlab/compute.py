"""Where and how lrlab computes: device, autocast dtype and memory layout, chosen once.

:class:`Compute` is the one object the loops receive: ``Compute.choose("auto", "auto")`` picks
CUDA when available, bfloat16 autocast on CPUs where bf16 matrix products are faster than float32
ones (measured once, :func:`cpu_bf16_is_faster`) and on CUDA, float32 elsewhere; channels_last on
CPUs and under autocast. Its :meth:`Compute.forward_batches` is the single "run the model over batches
in eval mode under autocast" loop behind evaluation, prediction and the CAM faithfulness test.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

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


def matmul_gflops(dtype: torch.dtype, n: int = 4096, reps: int = 5) -> float:
    """Best GFLOP/s (2 n^3 FLOPs per product) of ``reps`` timed n x n x n matrix products in ``dtype`` on the CPU,
    after one untimed product; the "matmul peak" every lrlab speed figure is set against."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


@lru_cache(maxsize=None)
def cpu_bf16_is_faster() -> bool:
    """True when this CPU has native bf16 (:func:`cpu_supports_bf16`) and a 1024^3 bf16 matrix product runs
    faster than a float32 one (~0.1 s, measured once per process).

    The flags alone mislead: AVX-512 BF16 without AMX (or with AMX hidden by a hypervisor) computes bf16
    products at about half the float32 rate (a 2-core Xeon VM: 156 vs 276 GFLOP/s at n = 4096, FastNet
    trained ~13% faster in float32), while with AMX bf16 runs 3-4x faster than float32.
    """
    if not cpu_supports_bf16():
        return False
    return matmul_gflops(torch.bfloat16, 1024, 3) > matmul_gflops(torch.float32, 1024, 3)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``, or None for plain float32.

    precision: "auto" (bf16 on CPUs where it is faster than float32, :func:`cpu_bf16_is_faster`; on CUDA :func:`cuda_autocast_dtype`; else float32),
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
        return torch.bfloat16 if cpu_bf16_is_faster() else None
    if device.type == "cuda":
        return cuda_autocast_dtype(torch.cuda.get_device_capability(device))
    return None


def cuda_autocast_dtype(capability: tuple[int, int]) -> torch.dtype:
    """The "auto" autocast dtype of a CUDA GPU of compute ``capability`` (major, minor).

    bfloat16 only where the tensor cores compute it natively (Ampere and later, capability >= 8.0);
    float16, trained with a ``torch.amp.GradScaler``, on older GPUs (T4 7.5, V100 7.0), where
    ``torch.cuda.is_bf16_supported()`` is also True but bf16 runs through slow emulation.
    """
    return torch.bfloat16 if capability >= (8, 0) else torch.float16


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


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule of ``model`` in eval mode; restore each one's own flag on exit
    (also after an exception), so a partly frozen model keeps its mixed modes."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, training in modes:
            m.training = training


@dataclass(frozen=True)
class Compute:
    """Device, autocast dtype (None: float32) and memory layout of every model call.

    Weights always stay float32; only activations and matrix products run in ``dtype``.
    ``channels_last`` applies to 4-d (N, C, H, W) image batches and to the model.
    """

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype | None = None
    channels_last: bool = False

    @classmethod
    def choose(cls, device: str = "auto", precision: str = "auto") -> Compute:
        """The choice for this machine: :func:`pick_device` and :func:`autocast_dtype`; channels_last
        on every CPU and whenever autocast is on (oneDNN's and cuDNN's low-precision convolutions are fastest
        in that layout, and so are oneDNN's float32 ones: on a 2-core Xeon VM float32 training steps ran
        1.2-1.7x faster in channels_last for FastNet, ResNet18 and EfficientNet-Lite0).

        Raises:
            LrlabError: an unavailable device or fp16 without CUDA.
        """
        dev = pick_device(device)
        dtype = autocast_dtype(dev, precision)
        return cls(dev, dtype, channels_last=dtype is not None or dev.type == "cpu")

    @property
    def dtype_name(self) -> str:
        """"bfloat16", "float16" or "float32", for summaries and reports."""
        return str(self.dtype).removeprefix("torch.") if self.dtype is not None else "float32"

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device (float32 weights) in the chosen memory format; on a
        CPU also keep freed memory in the process (:func:`retain_freed_memory`)."""
        if self.device.type == "cpu":
            retain_freed_memory()
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A ``torch.amp.GradScaler`` for training, enabled only under float16 autocast (whose
        small gradients underflow without loss scaling); disabled, it passes everything through."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def autocast(self):
        """A ``torch.autocast`` context for this dtype and device; a no-op for float32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the device; a 4-d batch also in the chosen memory format."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def forward_batches(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                        forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Run ``model`` over ``batches`` in eval mode, without gradients, under autocast.

        Args:
            model: the network, on this device; every submodule's train/eval flag is restored
                when the iteration ends (or is abandoned).
            batches: ``(x, y)`` pairs, x (B, C, H, W) float, y (B,) labels, on any device.
            forward: ``forward(model, x) -> (B, K)`` tensor; default ``model(x)``.

        Yields:
            (out, y): ``out`` the float32 (B, K) output on the device, ``y`` on the device.
        """
        forward = forward or (lambda m, x: m(x))
        with eval_mode(model), torch.inference_mode():
            for x, y in batches:
                with self.autocast():
                    out = forward(model, self.to_device(x))
                yield out.float(), torch.as_tensor(y).to(self.device, non_blocking=True)

