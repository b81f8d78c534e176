"""Padding and step time of stage-2 micro-batches in random order against length-grouped order
(`data.group_by_length`), on a VIST-shaped prepared dataset.

The data: stories of 5 steps, each a sentence of 3 to 40 words (a median of 10, as VIST's) and a
photo, written as VIST's story-in-sequence JSON and read by `prepare-data vist`. The recipe is
recipes/vist_stage2_lora.yaml (tasks gen, multimodal and understanding, 4 steps of history,
data.max_length 2560, micro-batch 2, 6 accumulation steps) on one process. The LLM is LLaVA-1.5 in
shape but small (its processor and tokenizer's vocabulary, so 576 tokens an image; 2 layers of
width 64), the generator tiny:sd: every sample's length is LLaVA-1.5's, and a step's cost grows
with its padded tokens as the 7B model's does, at a cost this machine can measure.

- padding: the share of padded positions over whole epochs, from each sample's exact token count
  (the collator's), the batches cut as the loader cuts them from each order;
- step time: forward and backward of the same number of micro-batches drawn evenly over one
  epoch of each order, interleaved, so that machine noise hits both alike.

    python benchmarks/padding.py
    python benchmarks/padding.py --stories 400 --timed 120
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("the we our a family went to park beach and it was day fun great first time after all friends "
         "had lot of at party food some then everyone there were many people wedding house city new old "
         "little dog took picture this is view from top end night").split()


def vist_like(folder: Path, stories: int, seed: int) -> Path:
    """A story-in-sequence JSON and its photos under `folder`; returns the prepared dataset's folder."""
    from PIL import Image

    rng = random.Random(seed)
    images, annotations = folder / "images", []
    images.mkdir(parents=True)
    for s in range(stories):
        for k in range(5):
            photo = f"{s * 5 + k}"
            Image.new("RGB", (64, 48), tuple(rng.randrange(256) for _ in range(3))).save(images / f"{photo}.png")
            words = min(40, max(3, round(rng.lognormvariate(2.3, 0.5))))
            text = " ".join(rng.choice(WORDS) for _ in range(words)) + " ."
            annotations.append([{"original_text": text, "text": text, "album_id": "1", "photo_flickr_id": photo,
                                 "story_id": f"s{s}", "worker_arranged_photo_order": k, "storylet_id": f"{s}-{k}",
                                 "tier": "story-in-sequence", "setting": "", "worker_id": "W"}])
    sis = folder / "train.story-in-sequence.json"
    sis.write_text(json.dumps({"images": [], "albums": [], "annotations": annotations}))
    out = folder / "prepared"
    subprocess.run([sys.executable, "-m", "minigpt5_cli", "prepare-data", "vist", "--input", str(sis), "--images",
                    str(images), "--output", str(out)], check=True, capture_output=True)
    return out


def small_llava(folder: Path) -> str:
    """LLaVA-1.5-7B's processor (336 px, patches of 14: 576 tokens an image) and its stand-in tokenizer
    retrained on WORDS (the same word-level splitting: any other word is one <unk>, as there), on 2
    layers of width 64 and a 2-layer vision tower of width 32, random weights. Token counts are those
    of `paper:llava-1.5-7b`; the small vocabulary keeps the output layer from outweighing the layers."""
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    from minigpt5_cli import hub

    if not (folder / "config.json").is_file():
        shapes = hub.resolve("paper:llava-1.5-7b", shapes_only=True)
        processor = AutoProcessor.from_pretrained(shapes)
        tok = processor.tokenizer = processor.tokenizer.train_new_from_iterator([" ".join(WORDS)], len(WORDS) + 16)
        processor.save_pretrained(folder)  # read back, it takes its image token's id from the new tokenizer
        config = AutoConfig.from_pretrained(shapes)
        config.image_token_index = tok.convert_tokens_to_ids("<image>")
        config.text_config.update({"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "hidden_size": 64,
                                   "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "num_key_value_heads": 4})
        config.vision_config.update({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "projection_dim": 32})
        torch.manual_seed(0)
        LlavaForConditionalGeneration(config).save_pretrained(folder)
    return str(folder)


def padding(lengths: list[int], order: list[int], batch: int) -> tuple[int, int]:
    """(real tokens, padded positions) of the micro-batches cut from `order`."""
    real = padded = 0
    for i in range(0, len(order), batch):
        rows = [lengths[j] for j in order[i:i + batch]]
        real += sum(rows)
        padded += len(rows) * max(rows)
    return real, padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stories", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3, help="epochs whose padding is counted")
    parser.add_argument("--timed", type=int, default=60, help="micro-batches timed per order")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/minigpt5-padding"))
    args = parser.parse_args()

    from minigpt5_cli import recipe as R
    from minigpt5_cli.data.batching import grouped, lengths
    from minigpt5_cli.data.collate import Collator
    from minigpt5_cli.data.samples import TrainSet
    from minigpt5_cli.data.sources import load_sources
    from minigpt5_cli.training.train import model_for

    data = args.cache / f"vist-{args.stories}"
    if not (data / "prepared" / "summary.json").is_file():
        data.mkdir(parents=True, exist_ok=True)
        vist_like(data, args.stories, seed=0)
    llm = small_llava(args.cache / "llava-1.5-small")
    recipe = R.load(REPO / "recipes" / "vist_stage2_lora.yaml", [
        f"model.llm={llm}", "model.generator=tiny:sd", f"data.train={data / 'prepared'}", "train.init_from=none",
        "train.mixed_precision=no", "model.mapper.heads=4", "model.mapper.encoder_layers=1",
        "model.mapper.decoder_layers=1", "model.mapper.ffn=64"])
    t, d = recipe.train, recipe.data
    torch.manual_seed(0)
    model = model_for(recipe)
    dataset = TrainSet(load_sources([d.train], "2"), stage="2", resolution=model.generator.resolution,
                       history=d.history, seed=t.seed, instruction_prob=d.instruction_prob,
                       images_in_prompt=model.llm_info.accepts_images, tasks=d.tasks)
    collate = Collator.for_model(model, d)
    start = time.perf_counter()
    estimate = lengths(dataset, collate)
    estimated_in = time.perf_counter() - start
    exact = [len(collate.encode(dataset[i])[1]) for i in range(len(dataset))]
    step = t.batch_size * t.grad_accum
    orders = {e: {"random": torch.randperm(len(dataset), generator=torch.Generator().manual_seed(t.seed + e)).tolist(),
                  "grouped": grouped(estimate, step, t.seed + e)} for e in range(args.epochs)}
    counts = {name: [sum(x) for x in zip(*(padding(exact, o[name], t.batch_size) for o in orders.values()))]
              for name in ("random", "grouped")}

    # Step time: the same number of micro-batches, drawn evenly over epoch 0 of each order.
    n = -(-len(dataset) // t.batch_size)  # micro-batches an epoch
    picks = [round(i * n / args.timed) for i in range(args.timed)]
    batches = {name: [collate([dataset[j] for j in orders[0][name][p * t.batch_size:(p + 1) * t.batch_size]])
                      for p in picks] for name in ("random", "grouped")}
    model.train()
    times = {name: [] for name in batches}
    for i in range(-1, args.timed):  # the first round warms up
        for name in batches:
            torch.manual_seed(i)
            begin = time.perf_counter()
            model(batches[name][max(i, 0)])["loss"].backward()
            if i >= 0:
                times[name].append(time.perf_counter() - begin)
    model.zero_grad(set_to_none=True)

    err = statistics.mean(abs(e - x) / x for e, x in zip(estimate, exact))
    print(f"VIST-shaped data: {args.stories} stories x 5 steps, an image in every step; recipes/vist_stage2_lora.yaml: "
          f"tasks {', '.join(d.tasks)}, history {d.history}, data.max_length {d.max_length}, micro-batch "
          f"{t.batch_size}, {t.grad_accum} accumulation steps, 1 process; LLaVA-1.5's processor and geometry, "
          f"2 layers of width 64; {len(dataset)} samples of {min(exact)} to {max(exact)} tokens; padding over "
          f"{args.epochs} epochs, step time (forward and backward) the mean of {args.timed} micro-batches per order")
    print(f"length estimate: {estimated_in:.2f} s for {len(dataset)} samples, {err:.1%} from the exact counts on average")
    print("\n| batches | padding (share of positions) | positions per micro-batch | step time (s) |\n| --- | --- | --- | --- |")
    means = {}
    for name, (real, padded) in counts.items():
        means[name] = statistics.mean(times[name])
        print(f"| {name} | {1 - real / padded:.1%} | {padded / (args.epochs * n):.0f} | {means[name]:.3f} |")
    ratio = counts["grouped"][1] / counts["random"][1]
    print(f"\ngrouped / random: positions {ratio:.3f}, step time {means['grouped'] / means['random']:.3f}")
    print(f"reproduce: python benchmarks/padding.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
