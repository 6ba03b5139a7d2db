"""Training-step throughput of a model on synthetic batches, with and without keeping freed memory.

    python benchmarks/step_throughput.py [--model fastnet] [--width 0.5] [--kwargs '{"whiten_kernel": 2}']
        [--batch 512] [--size 32] [--steps 16] [--precision auto|bf16|fp32]
        [--layout auto|channels_last|contiguous] [--compile]

Runs forward + backward + SGD step under the device's autocast (``Compute.choose``: bf16 where it is
the faster, channels_last on CPUs; ``--layout`` overrides the memory layout) and prints images/s twice, each in a fresh process: with glibc's default allocator
behaviour and with ``lrlab.compute.retain_freed_memory()`` (what lrlab's training does).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F


def seconds_per_step(model, compute, size: int, batch: int, steps: int, warmup: int) -> float:
    """Seconds per training step (forward + backward + SGD Nesterov step, under the device's
    autocast) of ``model`` on one synthetic (batch, 3, size, size) batch, after ``warmup`` steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = compute.to_device(torch.randn(batch, 3, size, size))
    y = torch.randint(0, 10, (batch,), device=compute.device)

    def step():
        with compute.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def measure(model_name: str, width: float, batch: int, steps: int, retain: bool, precision: str = "auto",
            extra: dict | None = None, compile_model: bool = False, layout: str = "auto", size: int = 32) -> float:
    from lrlab.compute import Compute, retain_freed_memory
    from lrlab.models import build

    if retain:
        retain_freed_memory()
    compute = Compute.choose(precision=precision)
    if layout != "auto":
        compute = replace(compute, channels_last=layout == "channels_last")
    kwargs = {**({"width": width} if model_name == "fastnet" else {}), **(extra or {})}
    model = build(model_name, 10, **kwargs).to(compute.device)  # not compute.prepare: it retains memory
    if compute.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        model.compile()  # torch.compile (inductor); compiled during the warm-up steps
    return batch / seconds_per_step(model, compute, size, batch, steps, warmup=max(2, steps // 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fastnet")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--kwargs", default="{}", help="more model kwargs, a JSON object")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (not timed: warm-up)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="compute.precision (auto: bf16 autocast where it is faster than float32)")
    parser.add_argument("--layout", default="auto", choices=["auto", "channels_last", "contiguous"],
                        help="memory layout (auto: lrlab's choice, channels_last on CPUs and under autocast)")
    parser.add_argument("--child", choices=["default", "retain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(measure(args.model, args.width, args.batch, args.steps, args.child == "retain", args.precision,
                      json.loads(args.kwargs), args.compile, args.layout, args.size))
        return
    for mode in ("default", "retain"):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--width", str(args.width),
                              "--batch", str(args.batch), "--steps", str(args.steps), "--child", mode,
                              "--precision", args.precision, "--kwargs", args.kwargs, "--layout", args.layout,
                              "--size", str(args.size),
                              *(["--compile"] if args.compile else [])],
                             check=True, capture_output=True, text=True).stdout
        label = "glibc default" if mode == "default" else "retain_freed_memory()"
        print(f"{args.model} x{args.width} {args.kwargs} batch {args.batch}, {args.precision}, {args.layout}"
              f"{', compiled' if args.compile else ''}, {label}: "
              f"{float(out):,.0f} images/s")


if __name__ == "__main__":
    main()
