"""Which class activation map points at what the model uses? Keep / delete test per CAM method.

    python benchmarks/cam_faithfulness.py RUN_DIR [--images 200] [--methods gradcam,scorecam]
        [--layer block2] [--data PATH] [--out DIR] [section.key=value ...]

Loads RUN_DIR's config.yaml and checkpoints/best.pt (RUN_DIR is only read), takes a
class-balanced subset of ``--images`` test images (seed 0) and, for each CAM method, ranks the
pixels by the map of the predicted class. It prints a Markdown table: the drop in the mean
probability of the predicted class (percentage points) when only the top 10/25/50% of the
pixels are kept (the rest set to the dataset mean), the areas under the keep curve (higher is
better) and the delete curve (lower is better), the ROAD scores (imputation instead of the mean;
MoRF lower is better, LeRF higher is better) and the map time per image; the last row is a
random smooth map of the same area. The bf16 matmul peak of the machine is measured first, so
that the times can be compared across machines. See lrlab/interpret/faithfulness.py for the method and references.
With ``--out DIR`` the curves are also written as DIR/faithfulness.json and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lrlab import pipeline
from lrlab.interpret import CAM_METHODS, cam_faithfulness, format_table, predict
from lrlab.run_folder import RunFolder
from time_to_accuracy import matmul_peak


def load_best(model: torch.nn.Module, run: RunFolder) -> dict:
    """Load the run's best model state. A checkpoint written before a layer gained a bias loads
    with that bias at zero, which is the same function (said on stderr); anything else must match."""
    state = run.load_checkpoint("best_checkpoint")
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if unexpected or any(not k.endswith(".bias") for k in missing):
        model.load_state_dict(state["model"])  # raises with torch's full message
    current = model.state_dict()
    for key in missing:
        current[key].zero_()
    if missing:
        print(f"note: {run.file('best_checkpoint')} predates the bias(es) {', '.join(missing)}; loaded them as zeros", file=sys.stderr)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--images", type=int, default=200, help="test images (class-balanced subset, seed 0)")
    parser.add_argument("--methods", default=",".join(CAM_METHODS.names()), help="comma-separated CAM methods")
    parser.add_argument("--layer", help="target layer (comma-separated to fuse); default: the run's")
    parser.add_argument("--data", type=Path, help="data path instead of the run's data.path")
    parser.add_argument("--out", type=Path, help="also write the faithfulness table and figure into this folder")
    args, overrides = parser.parse_known_args()
    peak_bf16 = matmul_peak(torch.bfloat16)
    if args.data is not None:
        overrides.append(f"data.path={args.data.resolve()}")
    if args.layer:
        layers = args.layer.split(",")
        overrides.append(f"explain.target_layer={layers[0] if len(layers) == 1 else '[' + ', '.join(layers) + ']'}")
    source = RunFolder.open(args.run_dir)
    config = source.load_config(overrides)
    start = time.perf_counter()
    setup = pipeline.prepare(config, range_test=False, train=False, explain=True, init_from_data=False)
    model, compute = setup.model, setup.compute
    state = load_best(model, source)
    layer = pipeline.cam_layer(config, model)
    sample = setup.data.test.subset(min(args.images, len(setup.data.test)), seed=0)
    x = torch.cat([xb for xb, _ in pipeline.eval_loader(setup, sample)]).contiguous()
    pred = predict(model, pipeline.eval_loader(setup, sample), compute)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    result = cam_faithfulness(model, x, compute, target_layer=layer, methods=methods,
                              progress=lambda m: print(f"measuring {m} ...", file=sys.stderr))
    wall = time.perf_counter() - start
    print(f"run {args.run_dir} (best.pt, epoch {state.get('epoch', '?')}); {len(x)} test images "
          f"({100 * pred.accuracy:.1f}% top-1 on them, no TTA); layer {layer}; {compute.device}, "
          f"autocast {compute.dtype_name}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
          f"bf16 matmul peak {peak_bf16:.0f} GFLOP/s; "
          f"mean p(predicted) on intact images {result.intact_confidence:.3f}; {wall:.0f} s")
    print()
    print(format_table(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        RunFolder(args.out).save_faithfulness(result)


if __name__ == "__main__":
    main()
