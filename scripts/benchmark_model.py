"""Official PyTorch SAM 2.1 vs p2s_jax, same random weights and inputs, one process.

Prints ratios (official time / ours; > 1 means we are faster):
- image encoder (`set_image` of both predictors, preprocessing included) per model size;
- decoding N people on one image: ours batched (one call) vs the official predictor called once
  per person (as BBox-Mask-Pose does) and vs the official batched predict.
On a GPU (`--dtype bfloat16`) the official side runs under bf16 autocast and ours in bf16 compute
with float32 weights; MFU of our encoder comes from XLA's cost analysis.

    python scripts/benchmark_model.py --models t b+ --people 1 8 32 64
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from support import reference  # noqa: E402  (official model builder, torchvision stubs)
from p2s_jax.utils import allocator  # noqa: E402


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["t", "b+"])
    parser.add_argument("--people", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--points", type=int, default=3, help="positive points per person")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--malloc", default="kept", choices=allocator.MODES,
                        help="glibc malloc of both sides (p2s_jax.utils.allocator)")
    return parser.parse_args()


def encoder_rows(name, ours, theirs, image, args, torch, device) -> list[tuple]:
    """The image encoder of both sides (`set_image`), and our MFU on a GPU."""
    import jax
    import jax.numpy as jnp

    from p2s_jax.hardware import xla_cost
    from p2s_jax.inference.predictor import encode_images
    from p2s_jax.inference.preprocess import preprocess_image

    def official_set_image():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            theirs.set_image(image)
        if device == "cuda":
            torch.cuda.synchronize()

    def ours_set_image():
        ours.set_image(image)
        jax.block_until_ready(ours._features)

    t_official = best_of(official_set_image, args.repeats)
    t_ours = best_of(ours_set_image, args.repeats)
    if device == "cuda":
        pixels = jnp.asarray(preprocess_image(image, 1024)[None])
        compiled = encode_images.lower(ours.graphdef, ours.state, pixels).compile()
        flops = xla_cost(compiled).get("flops", float("nan"))
        peak = float(os.environ.get("P2S_PEAK_TFLOPS", "989")) * 1e12  # H100 SXM dense bf16
        print(f"# {name} encoder: {flops / 1e9:.1f} GFLOP, MFU {flops / t_ours / peak:.1%} "
              f"(peak {peak / 1e12:.0f} TFLOP/s)")
    return [(name, "image encoder (set_image)", t_official, t_ours, "official")]


def decode_rows(name, ours, theirs, image, args, rng) -> list[tuple]:
    """N people decoded at once (ours) against the official per-person loop and batched call."""
    h, w = image.shape[:2]
    rows = []
    for n in args.people:
        coords = rng.uniform([0, 0], [w, h], (n, args.points, 2))
        labels = np.ones((n, args.points), np.int64)

        def official_loop():
            for i in range(n):
                theirs.predict(coords[i], labels[i], multimask_output=False)

        def official_batched():
            theirs.predict(coords, labels, multimask_output=False)

        def ours_batched():
            ours.predict(coords, labels)

        t_ours = best_of(ours_batched, args.repeats)
        task = f"decode {n:3d} people"
        rows.append((name, task, best_of(official_loop, args.repeats), t_ours,
                     "official per-person loop"))
        rows.append((name, task, best_of(official_batched, args.repeats), t_ours,
                     "official batched"))
    return rows


def main() -> None:
    args = parse_args()
    allocator.set_mode(args.malloc)
    torch = reference.import_torch()
    import jax
    import jax.numpy as jnp
    from skimage import data

    from p2s_jax.inference.predictor import Predictor
    from p2s_jax.model.configs import get_config
    from p2s_jax.model.sam2 import abstract_model
    from weights_conversion.convert import from_state_dict

    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    print(f"# host {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
          f"on {device}; dtype {args.dtype}")
    image = data.astronaut()
    rng = np.random.default_rng(0)
    rows = []
    for size in args.models:
        name = get_config(size).name
        official = reference.official_model(name).to(device)
        model = abstract_model(get_config(name), dtype)
        from_state_dict(model, reference.official_state_dict(official))
        ours, theirs = Predictor(model), reference.official_predictor(official)
        rows += encoder_rows(name, ours, theirs, image, args, torch, device)
        rows += decode_rows(name, ours, theirs, image, args, rng)
        del official, theirs, ours, model
        reference.official_model.cache_clear()
    print("\n| model | task | official (s) | ours (s) | official / ours | compared with |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, task, t_official, t_ours, against in rows:
        print(f"| {name} | {task} | {t_official:.3f} | {t_ours:.3f} | "
              f"{t_official / t_ours:.2f}x | {against} |")


if __name__ == "__main__":
    main()
