"""Training steps at the paper's width: LLaVA-1.5-7B's and SD 2.1 base's configs with random weights,
the LLM cut to a few of its 32 layers, the generator whole. For stage 1 and stage 2 (LoRA), with the
data as `prepare-data --cache-latents` gives it:

- step time, ours against the bare frozen parts doing the same work (the LLM forward and backward on
  the same tokens to its input embeddings, the UNet forward and backward to its conditioning input),
  interleaved in one process: the same ratio as train_overhead.py, at real width (target <= 1.10);
- peak memory a step adds, measured in a fresh process, against `train --plan`'s estimate for the
  same model and batch; on a GPU also the step's whole peak (torch.cuda.max_memory_allocated: weights,
  optimizer state, activations) against the plan's total;
- tokens per second, and on a GPU the model-FLOPs utilisation: the FLOPs torch's FLOP counter counts
  in one step (matrix products, convolutions, attention; forward and backward) per second of the
  step, over the device's dense bf16 peak (--peak-tflops for a device not in PEAK_TFLOPS).

    python benchmarks/scale.py                                   # CPU: 2 of 32 layers, 256 tokens, fp32
    python benchmarks/scale.py --layers 32 --length 2560 --precision bf16   # on a GPU: the full model
    python benchmarks/scale.py --tiny --length 128                # tiny:llava and tiny:sd: the script itself

The weights are written once (bf16; built on the GPU where there is one) under --cache (default
/tmp/minigpt5-scale). --json FILE also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from minigpt5_cli.recipe import PRECISIONS  # noqa: E402

RECIPES = {1: REPO / "recipes" / "cc3m_stage1.yaml", 2: REPO / "recipes" / "vist_stage2_lora.yaml"}
# Dense bf16 tensor-core peaks (TFLOP/s), by a name in the device's: the first found wins.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0}


def backbones(cache: Path, layers: int) -> tuple[str, str]:
    """Folders with random weights in the paper's shapes: LLaVA-1.5-7B with `layers` decoder layers,
    SD 2.1 base whole."""
    from accelerate.utils import set_seed
    from diffusers import DiffusionPipeline
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from minigpt5_cli import hub

    llm, sd = cache / f"llava-1.5-7b-{layers}-layers", cache / "sd-2.1-base"
    set_seed(0)
    if not (llm / "config.json").is_file() or not list(llm.glob("*.safetensors")):
        shapes = hub.resolve("paper:llava-1.5-7b", shapes_only=True)
        config = AutoConfig.from_pretrained(shapes)
        config.text_config.num_hidden_layers = layers
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # 7B initialised in seconds there
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(llm)
        del model
        torch.cuda.empty_cache()  # the children measure the device's memory
        AutoProcessor.from_pretrained(shapes).save_pretrained(llm)
    if not (sd / "model_index.json").is_file() or not list(sd.glob("unet/*.safetensors")):
        from minigpt5_cli.modeling.generators import _from_configs

        shapes = hub.resolve("paper:sd-2.1-base", shapes_only=True)
        index = DiffusionPipeline.load_config(shapes)
        skip = {"safety_checker": None, "requires_safety_checker": False}
        parts = _from_configs(shapes, index, torch.bfloat16, skip)
        DiffusionPipeline.from_pretrained(shapes, **parts, **skip).save_pretrained(sd)
    return str(llm), str(sd)


def load_recipe(stage: int, llm: str, sd: str, args):
    from minigpt5_cli import recipe as R

    return R.load(RECIPES[stage], [f"model.llm={llm}", f"model.generator={sd}", f"data.max_length={args.length}",
                                   f"train.batch_size={args.batch}", f"train.mixed_precision={args.precision}",
                                   f"train.gradient_checkpointing={str(args.checkpointing).lower()}",
                                   "train.init_from=none"])


def cached(model, batch: dict) -> dict:
    """The batch as cached data gives it: VAE posteriors in place of pixels, caption conditionings in
    place of captions."""
    batch = dict(batch)
    with torch.no_grad():
        pixels = batch.pop("target_pixels")
        dist = model.generator.vae.encode(pixels.to(model.generator.vae.dtype)).latent_dist
        batch["latent_mean"], batch["latent_logvar"] = dist.mean.float(), dist.logvar.float()
        if "captions" in batch:
            batch["caption_embeds"] = model.generator.encode(batch.pop("captions"))[0]
    return batch


def timing(stage: int, llm: str, sd: str, args) -> dict:
    """Child process: median step times of ours and bare, interleaved."""
    from torch.utils.flop_counter import FlopCounterMode
    from train_overhead import interleaved  # beside this file

    from minigpt5_cli.training.plan import forward_autocast, plan_batch
    from minigpt5_cli.training.train import make_optimizer, model_for

    recipe = load_recipe(stage, llm, sd, args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = model_for(recipe).to(device)
    model.train()
    batch = {k: v.to(device) if torch.is_tensor(v) else v
             for k, v in cached(model, plan_batch(model, recipe, recipe.train.batch_size)).items()}
    optimizer = make_optimizer(model, recipe)
    autocast = forward_autocast(recipe, device)

    def ours():
        with autocast():
            loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    images = batch["latent_mean"].shape[0]
    length, width = model.generator.cond_shape
    denoiser = model.generator.denoiser
    embed = model.llm.get_input_embeddings()
    inputs = {k: v for k, v in batch.items() if k in ("attention_mask", "pixel_values", "image_sizes")}
    latents = model.generator.scale(batch["latent_mean"]).to(denoiser.dtype)

    def bare():
        with autocast():
            embeds = embed(batch["input_ids"]).detach().requires_grad_(True)
            logits = model.llm(inputs_embeds=embeds, **inputs).logits
            text = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                     batch["labels"][:, 1:].flatten(), ignore_index=-100)
            cond = torch.randn(images, length, width, device=device, dtype=denoiser.dtype, requires_grad=True)
            t = torch.randint(0, 1000, (images,), device=device)
            loss = text + denoiser(latents, t, encoder_hidden_states=cond).sample.float().pow(2).mean()
        loss.backward()

    medians = interleaved({"ours": ours, "bare": bare}, args.steps, 1, device)
    with FlopCounterMode(display=False) as flops:
        ours()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"device": device, "name": name, "tokens": batch["input_ids"].numel(), "flops": flops.get_total_flops(),
            **medians}


def child(what: str, stage: int, llm: str, sd: str, args) -> dict:
    from minigpt5_cli.training.plan import child_environment

    cmd = [sys.executable, __file__, "--child", what, "--stage", str(stage), "--llm", llm, "--sd", sd,
           "--layers", str(args.layers), "--length", str(args.length), "--batch", str(args.batch),
           "--precision", args.precision, "--steps", str(args.steps)] + (["--checkpointing"] if args.checkpointing else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_environment() if what == "memory" else None)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_tflops(name: str, precision: str, given: float | None) -> float | None:
    """The device's dense peak for the run's precision: --peak-tflops, or PEAK_TFLOPS's bf16 figure
    (fp16 alike); none for fp32 or an unknown device."""
    if given or precision == "no":
        return given
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="LLM decoder layers, of 32")
    parser.add_argument("--length", type=int, default=256, help="data.max_length")
    parser.add_argument("--batch", type=int, default=2, help="micro-batch")
    parser.add_argument("--precision", default="no", choices=PRECISIONS)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--stages", default="1,2")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/minigpt5-scale"))
    parser.add_argument("--tiny", action="store_true", help="tiny:llava and tiny:sd in place of the paper's shapes")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak for MFU, TFLOP/s")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", choices=["time", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--llm", help=argparse.SUPPRESS)
    parser.add_argument("--sd", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "time":
        print(json.dumps(timing(args.stage, args.llm, args.sd, args)))
        return
    if args.child == "memory":
        from minigpt5_cli.training.plan import measured_growth

        growth = measured_growth(load_recipe(args.stage, args.llm, args.sd, args), args.batch)
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None  # over the measured step
        print(json.dumps({"growth": growth, "peak": peak}))
        return

    from minigpt5_cli.training.plan import measure

    llm, sd = ("tiny:llava", "tiny:sd") if args.tiny else backbones(args.cache, args.layers)
    rows = []
    for stage in map(int, args.stages.split(",")):
        plan = measure(load_recipe(stage, llm, sd, args))
        planned = plan.activations(args.batch, args.checkpointing)
        t = child("time", stage, llm, sd, args)
        m = child("memory", stage, llm, sd, args)
        peak = peak_tflops(t["name"], args.precision, args.peak_tflops) if t["device"] == "cuda" else None
        rows.append({"stage": stage, **t, "tokens_per_s": t["tokens"] / t["ours"],
                     "mfu": t["flops"] / t["ours"] / (peak * 1e12) if peak else None, "step_plan": planned,
                     "step_measured": m["growth"], "peak_plan": plan.total(args.batch, args.checkpointing, False),
                     "peak_measured": m["peak"]})
        print(f"stage {stage}: ours {t['ours']:.2f} s, bare {t['bare']:.2f} s, ratio {t['ours'] / t['bare']:.3f}; "
              f"{t['tokens'] / t['ours']:.0f} tokens/s; step memory planned {planned / 2**30:.2f} GiB, "
              f"measured {m['growth'] / 2**30:.2f} GiB", flush=True)
    device = rows[0]["name"]
    shapes = "tiny:llava and tiny:sd" if args.tiny else \
        f"LLaVA-1.5-7B width, {args.layers} of 32 layers; SD 2.1 base whole"
    settings = (f"micro-batch {args.batch}; data.max_length {args.length}; precision {args.precision}; "
                f"checkpointing {'on' if args.checkpointing else 'off'}; cached latents")
    print(f"\ndevice {device}; {shapes}; {settings}")
    print("\n| stage | step, ours (s) | step, bare (s) | ours / bare | tokens/s | MFU | step memory, plan (GiB) | "
          "measured (GiB) | peak, plan (GiB) | measured (GiB) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        peak = f"{r['peak_measured'] / 2**30:.2f}" if r["peak_measured"] is not None else "n/a"
        print(f"| {r['stage']} | {r['ours']:.2f} | {r['bare']:.2f} | {r['ours'] / r['bare']:.3f} | "
              f"{r['tokens_per_s']:.0f} | {mfu} | {r['step_plan'] / 2**30:.2f} | {r['step_measured'] / 2**30:.2f} | "
              f"{r['peak_plan'] / 2**30:.2f} | {peak} |")
    command = f"python benchmarks/scale.py {' '.join(sys.argv[1:])}".rstrip()
    print(f"\nreproduce: {command}")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "shapes": shapes, "settings": settings, "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
