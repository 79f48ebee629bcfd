"""One call on an accelerator: parity, encoder, decoder, evaluation, annotation and training
against the official code, written as one JSON and one markdown table.

    python scripts/device_check.py                 # on the GPU machine: b+ at 1024, bf16
    python scripts/device_check.py --smoke         # the same code on CPU: t at 256, about a minute

Output goes to `--out`, else `$OUT`, else `./device_check_out`: `device_check.json` (every
number, the settings and versions, each section's error if it failed) and `device_check.md`
(the tables for docs/performance.md). A section that fails is recorded and the next one runs.

Sections (ours: p2s_jax's jitted programs; official: the `sam2` package on the same device,
same random weights; on a GPU the official side runs under `torch.autocast(bfloat16)`):
1. parity: ours in float32 and in bf16 against the official float32 model on a real photo
   (image embedding, low-res logits, masks of seeded prompts);
2. encoder: images/s at each batch, ours (`encode_images`, MFU from XLA's FLOP count against
   `--peak-tflops`) and official (`set_image_batch`);
3. decoder: N people of one image, ours in one call against the official per-person loop and
   the official batched call;
4. evaluation: `run_dataset` on a generated dataset, images/s and the projected wall time for
   COCO val2017's 2693 person images;
5. annotate: `scripts/benchmark_annotate.py`, `p2s annotate` on a keypoint-only generated
   dataset against the official per-person loop on the same prompts;
6. training: `scripts/benchmark_train.py` (the paper step against the official `SAM2Train`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
from support import reference  # noqa: E402  (official model builder, torchvision stubs)
from benchmark_model import best_of  # noqa: E402

COCO_VAL_PERSON_IMAGES = 2693
PROFILES = {
    "full": {"model": "b+", "image_size": 1024, "dtype": "bfloat16", "encoder_batches": (1, 8, 32),
             "people": (1, 32, 128), "eval_images": 256, "eval_people": 8, "repeats": 5,
             "train": ["--device", "gpu", "--model", "b+", "--image-size", "1024", "--images",
                       "8", "--dtype", "bfloat16", "--warmup", "3", "--steps", "10"]},
    "smoke": {"model": "t", "image_size": 256, "dtype": "bfloat16", "encoder_batches": (1, 2),
              "people": (1, 4), "eval_images": 4, "eval_people": 3, "repeats": 1,
              "train": ["--device", "cpu", "--model", "t", "--image-size", "128", "--images",
                        "1", "--objects", "2", "--points", "2", "--warmup", "1", "--steps", "1",
                        "--malloc", "default"]},
}


class Context:
    """What every section shares: settings, the two models with the same weights, the device."""

    def __init__(self, profile: dict, peak_tflops: float):
        import jax
        import jax.numpy as jnp

        from p2s_jax.model.configs import get_config
        from p2s_jax.model.sam2 import abstract_model
        from weights_conversion import from_state_dict

        self.torch = reference.import_torch()
        self.jax, self.jnp = jax, jnp
        self.profile, self.peak = profile, peak_tflops * 1e12
        self.on_gpu = jax.default_backend() == "gpu" and self.torch.cuda.is_available()
        self.device = "cuda" if self.on_gpu else "cpu"
        self.name = get_config(profile["model"]).name
        size = profile["image_size"]
        official = reference.official_model(self.name, size)
        state = reference.official_state_dict(official)
        self.official = official.to(self.device)
        self.models = {}
        for dtype in ("float32", profile["dtype"]):
            model = abstract_model(get_config(self.name, size), getattr(jnp, dtype))
            from_state_dict(model, state)
            self.models[dtype] = model
        from skimage import data

        self.image = data.astronaut()

    def official_autocast(self):
        return self.torch.autocast(self.device, dtype=self.torch.bfloat16,
                                   enabled=self.on_gpu and self.profile["dtype"] == "bfloat16")

    def sync(self):
        if self.on_gpu:
            self.torch.cuda.synchronize()


def prompts(image: np.ndarray, people: int, seed: int = 0):
    h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    coords = rng.uniform([0.1 * w, 0.1 * h], [0.9 * w, 0.9 * h], (people, 3, 2))
    return coords.astype(np.float32), np.ones((people, 3), np.int32)


def section_parity(ctx: Context) -> dict:
    from p2s_jax.inference.predictor import Predictor

    theirs = reference.official_predictor(ctx.official)
    theirs.set_image(ctx.image)
    embed = theirs._features["image_embed"][0].permute(1, 2, 0).float().cpu().numpy()
    coords, labels = prompts(ctx.image, 8, seed=1)
    reference_out = [theirs.predict(c, l, multimask_output=False) for c, l in zip(coords, labels)]
    with ctx.torch.autocast(ctx.device, dtype=ctx.torch.bfloat16):  # the official bf16's own
        theirs.set_image(ctx.image)                                  # agreement, for scale
        autocast_out = [theirs.predict(c, l, multimask_output=False)
                        for c, l in zip(coords, labels)]
    rows = {"official bf16 autocast": {
        "embed_rel_error": None, "logits_max_abs_error": float(max(
            np.abs(a[2][0] - r[2][0]).max() for a, r in zip(autocast_out, reference_out))),
        "iou_max_abs_error": float(max(abs(a[1][0] - r[1][0])
                                       for a, r in zip(autocast_out, reference_out))),
        "mask_agreement_min": float(min((a[0][0] == r[0][0]).mean()
                                        for a, r in zip(autocast_out, reference_out)))}}
    for dtype, model in ctx.models.items():
        ours = Predictor(model)
        ours.set_image(ctx.image)
        out = ours.predict(coords, labels)
        ours_embed = np.asarray(ours._features.image_embed, np.float32)
        rows[dtype] = {
            "embed_rel_error": float(np.abs(ours_embed - embed).max() / np.abs(embed).max()),
            "logits_max_abs_error": float(max(np.abs(out.low_res_logits[i, 0] - r[2][0]).max()
                                              for i, r in enumerate(reference_out))),
            "iou_max_abs_error": float(max(abs(out.iou[i, 0] - r[1][0])
                                           for i, r in enumerate(reference_out))),
            "mask_agreement_min": float(min((out.masks[i, 0] == r[0][0]).mean()
                                            for i, r in enumerate(reference_out))),
        }
    return rows


def section_encoder(ctx: Context) -> list:
    from flax import nnx

    from p2s_jax.hardware import xla_cost
    from p2s_jax.inference.predictor import encode_images, preprocess_images
    from p2s_jax.inference.preprocess import canvas_hw
    from p2s_jax.utils.images import pad_to_canvas

    jax, jnp = ctx.jax, ctx.jnp
    graphdef, state = nnx.split(ctx.models[ctx.profile["dtype"]])
    canvas = pad_to_canvas(ctx.image, canvas_hw(ctx.image.shape[:2]))
    size = ctx.profile["image_size"]
    theirs = reference.official_predictor(ctx.official)
    rows = []
    for batch in ctx.profile["encoder_batches"]:
        images = jnp.asarray(np.repeat(canvas[None], batch, 0))
        hw = jnp.asarray(np.repeat([ctx.image.shape[:2]], batch, 0), jnp.int32)
        pixels = preprocess_images(images, hw, size)
        compiled = encode_images.lower(graphdef, state, pixels).compile()
        flops = float(xla_cost(compiled).get("flops", float("nan")))
        ours = best_of(lambda: jax.block_until_ready(compiled(state, pixels)),
                       ctx.profile["repeats"])

        def official():
            with ctx.official_autocast():
                theirs.set_image_batch([ctx.image] * batch)
            ctx.sync()

        theirs_s = best_of(official, ctx.profile["repeats"])
        rows.append({"batch": batch, "ours_images_per_s": batch / ours,
                     "official_images_per_s": batch / theirs_s, "ratio": theirs_s / ours,
                     "gflop_per_image": flops / batch / 1e9,
                     "mfu": flops / ours / ctx.peak if ctx.on_gpu else None})
    return rows


def section_decoder(ctx: Context) -> list:
    from p2s_jax.inference.predictor import Predictor

    ours = Predictor(ctx.models[ctx.profile["dtype"]])
    ours.set_image(ctx.image)
    theirs = reference.official_predictor(ctx.official)
    with ctx.official_autocast():
        theirs.set_image(ctx.image)
    rows = []
    for people in ctx.profile["people"]:
        coords, labels = prompts(ctx.image, people, seed=people)

        def loop():
            with ctx.official_autocast():
                for c, l in zip(coords, labels):
                    theirs.predict(c, l, multimask_output=False)
            ctx.sync()

        def batched():
            with ctx.official_autocast():
                theirs.predict(coords, labels, multimask_output=False)
            ctx.sync()

        t_ours = best_of(lambda: ours.predict(coords, labels), ctx.profile["repeats"])
        t_loop = best_of(loop, ctx.profile["repeats"])
        t_batched = best_of(batched, ctx.profile["repeats"])
        rows.append({"people": people, "ours_s": t_ours, "official_loop_s": t_loop,
                     "official_batched_s": t_batched, "vs_loop": t_loop / t_ours,
                     "vs_batched": t_batched / t_ours})
    return rows


def section_evaluation(ctx: Context) -> dict:
    from benchmark_eval import make_dataset, run_ours

    from p2s_jax.evaluation.config import EvalConfig

    with tempfile.TemporaryDirectory() as root:
        coco, images, poses = make_dataset(Path(root), ctx.profile["eval_images"],
                                           ctx.profile["eval_people"], 480, 640)
        output, warmup = run_ours(ctx.models[ctx.profile["dtype"]], coco, images, poses,
                                  EvalConfig())
    rate = output.report.images_per_second
    return {"images": output.report.num_images, "masks": output.report.num_results,
            "images_per_s": rate, "warmup_s": warmup,
            "projected_coco_val2017_s": COCO_VAL_PERSON_IMAGES / rate}


def section_annotate(ctx: Context) -> dict:
    from benchmark_annotate import run

    profile = ctx.profile
    result = run(profile["model"], profile["image_size"], profile["eval_images"],
                 profile["eval_people"], 0, True, profile["dtype"])
    return {key: result.get(key) for key in (
        "images", "persons", "ours_images_per_s", "official_images_per_s",
        "ratio_official_over_ours", "warmup_s")}


def section_training(ctx: Context) -> dict:
    with tempfile.TemporaryDirectory() as root:
        out = Path(root) / "train.json"
        command = [sys.executable, str(HERE / "benchmark_train.py"), *ctx.profile["train"],
                   "--json", str(out)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"benchmark_train.py failed ({done.returncode}):\n"
                               f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        result = json.loads(out.read_text())
    run = result["runs"][0]
    return {"image_size": run["image_size"], "ours_images_per_s": run["ours"]["images_per_s"],
            "official_images_per_s": (run["official"] or {}).get("images_per_s"),
            "ratio": run["ratio_ours_over_official"], "settings": result["settings"]}


SECTIONS = {"parity": section_parity, "encoder": section_encoder, "decoder": section_decoder,
            "evaluation": section_evaluation, "annotate": section_annotate,
            "training": section_training}


def markdown(report: dict) -> str:
    """The tables of docs/performance.md."""
    s = report["sections"]
    head = (f"{report['date']}, {report['device']}, {report['model']} at "
            f"{report['image_size']}, {report['dtype']}; jax {report['versions']['jax']}, "
            f"torch {report['versions']['torch']}")
    lines = [f"### Device check ({head})", ""]

    def fmt(value, pattern="{:.3g}"):
        return "-" if value is None else pattern.format(value)

    if "rows" in s.get("parity", {}):
        lines += ["| against official float32 | embed rel. error | logits max abs | IoU max abs | min mask agreement |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {d} | {fmt(r['embed_rel_error'])} | {fmt(r['logits_max_abs_error'])} | "
                  f"{fmt(r['iou_max_abs_error'])} | {r['mask_agreement_min']:.5f} |"
                  for d, r in s["parity"]["rows"].items()]
        lines.append("")
    if "rows" in s.get("encoder", {}):
        lines += ["| encoder batch | ours img/s | official img/s | ours / official | GFLOP/img | MFU |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['batch']} | {r['ours_images_per_s']:.2f} | "
                  f"{r['official_images_per_s']:.2f} | {r['ratio']:.2f}x | "
                  f"{r['gflop_per_image']:.0f} | {fmt(r['mfu'], '{:.1%}')} |"
                  for r in s["encoder"]["rows"]]
        lines.append("")
    if "rows" in s.get("decoder", {}):
        lines += ["| people | ours (s) | official loop (s) | official batched (s) | vs loop | "
                  "vs batched |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['people']} | {r['ours_s']:.4f} | {r['official_loop_s']:.4f} | "
                  f"{r['official_batched_s']:.4f} | {r['vs_loop']:.1f}x | "
                  f"{r['vs_batched']:.1f}x |" for r in s["decoder"]["rows"]]
        lines.append("")
    if "rows" in s.get("evaluation", {}):
        r = s["evaluation"]["rows"]
        lines += [f"Evaluation: {r['images']} images, {r['masks']} masks, "
                  f"{r['images_per_s']:.2f} images/s; COCO val2017 person images projected "
                  f"{r['projected_coco_val2017_s']:.0f} s.", ""]
    if "rows" in s.get("annotate", {}):
        r = s["annotate"]["rows"]
        lines += [f"Annotation: {r['images']} images, {r['persons']} persons; ours "
                  f"{r['ours_images_per_s']:.2f} images/s, official per-person loop "
                  f"{fmt(r['official_images_per_s'], '{:.2f}')} images/s "
                  f"({fmt(r['ratio_official_over_ours'], '{:.2f}')}x).", ""]
    if "rows" in s.get("training", {}):
        r = s["training"]["rows"]
        lines += [f"Training ({r['image_size']} px): ours {r['ours_images_per_s']:.2f} images/s, "
                  f"official {fmt(r['official_images_per_s'], '{:.2f}')} images/s, "
                  f"{fmt(r['ratio'], '{:.2f}')}x.", ""]
    failed = [f"- {name}: {v['error'].splitlines()[-1]}" for name, v in s.items() if "error" in v]
    if failed:
        lines += ["Failed sections:", *failed, ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="t at 256 on CPU, minimal sizes")
    parser.add_argument("--out", default=None, help="folder (default $OUT or ./device_check_out)")
    parser.add_argument("--peak-tflops", type=float, default=790.0,
                        help="bf16 peak for MFU (790: measured on an H200 here)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    args = parser.parse_args()
    out = Path(args.out or os.environ.get("OUT") or "device_check_out")
    out.mkdir(parents=True, exist_ok=True)
    profile = PROFILES["smoke" if args.smoke else "full"]
    start = time.perf_counter()
    ctx = Context(profile, args.peak_tflops)
    report = {"date": time.strftime("%Y-%m-%d"), "profile": "smoke" if args.smoke else "full",
              "device": ctx.jax.devices()[0].device_kind, "host": platform.machine(),
              "model": ctx.name, "image_size": profile["image_size"], "dtype": profile["dtype"],
              "versions": {"jax": ctx.jax.__version__, "torch": ctx.torch.__version__},
              "sections": {}}
    for name in args.sections:
        began = time.perf_counter()
        try:
            report["sections"][name] = {"rows": SECTIONS[name](ctx)}
        except Exception:  # a failed section is recorded; the others still run
            report["sections"][name] = {"error": traceback.format_exc()}
        report["sections"][name]["seconds"] = time.perf_counter() - began
        print(f"# {name}: {report['sections'][name]['seconds']:.1f} s"
              + (" FAILED" if "error" in report["sections"][name] else ""), flush=True)
    report["seconds"] = time.perf_counter() - start
    (out / "device_check.json").write_text(json.dumps(report, indent=2))
    (out / "device_check.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if any("error" in v for v in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
