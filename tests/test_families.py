"""Every LLM and VLM family people use today, as a tiny random model built from its config class and
saved with its own processor: stage 1, stage 2 with LoRA and with prefix tuning, and a batched
generate whose two prompts hold different numbers of images, all through the real command line."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import families as F
from conftest import DEBUG, run_cli

IMAGES = DEBUG / "data" / "images"
FAST = ["--diffusion-steps", "2", "--max-new-tokens", "12"]


def train(recipe: str, llm, out, *extra) -> list[str]:
    return ["train", "-r", str(DEBUG / recipe), f"model.llm={llm}", f"train.output_dir={out}", "train.max_steps=1",
            "train.save_every=1", "data.max_length=512", *extra]


def stories(folder) -> str:
    """Two stories: one with two images, one with a single image; a batch of 2 pads images and tokens."""
    for name in ("red_circle", "blue_square", "green_circle"):
        shutil.copy(IMAGES / f"{name}.png", folder / f"{name}.png")
    lines = [{"id": "two", "steps": [{"text": "there is a circle.", "image": "red_circle.png"},
                                     {"text": "it turns into a square.", "image": "blue_square.png"}]},
             {"id": "one", "steps": [{"text": "a circle.", "image": "green_circle.png"}, {"text": "it moves."}]}]
    path = folder / "stories.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return str(path)


@pytest.mark.parametrize("family", [*F.TEXT, *F.VISION])
def test_family_trains_both_stages_and_generates_with_images(family, tmp_path):
    llm = F.build(family, tmp_path / family)
    assert run_cli(*train("stage1.yaml", llm, tmp_path / "s1")) == 0
    for kind in ("lora", "prefix"):
        assert run_cli(*train(f"stage2_{kind}.yaml", llm, tmp_path / kind, f"train.init_from={tmp_path / 's1'}")) == 0
    # The adapter file holds the adapter alone: no tensor as long as the vocabulary.
    vocab = json.loads((tmp_path / "s1" / "checkpoint-1" / "minigpt5.json").read_text())["first_voken_id"]
    adapter = load_file(tmp_path / "lora" / "checkpoint-1" / "adapter" / "adapter_model.safetensors")
    assert adapter and not [k for k, v in adapter.items() if vocab in v.shape or vocab + 8 in v.shape]
    out = tmp_path / "out"
    assert run_cli("generate", "-s", stories(tmp_path), "-m", str(tmp_path / "lora"), "-o", str(out), "-b", "2",
                   *FAST) == 0
    for sid in ("two", "one"):
        doc = json.loads((out / sid / "story.json").read_text())
        assert doc["generated"][0]["images"], sid


# BLIP-2's processor puts one image's tokens before the text, whatever the prompt: tests/test_blip2.py
# compares our batches with the model's own forward instead.
VISION_ONLY = [f for f in F.VISION if f != "blip_2"]


@pytest.mark.parametrize("prompt_format", ["auto", "paper"])
@pytest.mark.parametrize("family", VISION_ONLY)
def test_collated_batch_gives_the_logits_of_the_processor_output(family, prompt_format, tmp_path):
    """Our plumbing adds nothing and drops nothing: on a prompt with two images, the model's logits over
    the prompt are the same from our collated batch as from its own processor's output. In the paper's
    prompt format too, each image is written as the family's template writes one, wherever the template
    puts images (LLaVA's puts them before the turn's text)."""
    from PIL import Image

    from minigpt5_cli import recipe as R
    from minigpt5_cli.data.collate import Collator, image_marker
    from minigpt5_cli.data.samples import Sample
    from minigpt5_cli.modeling.runner import TARGETS
    from minigpt5_cli.training.train import model_for

    llm = F.build(family, tmp_path / family)
    recipe = R.load(DEBUG / "stage1.yaml", [f"model.llm={llm}", "data.max_length=512",
                                            f"data.prompt_format={prompt_format}"])
    model = model_for(recipe).eval()
    collate = Collator.for_model(model, recipe.data)
    images = [Image.open(IMAGES / f"{n}.png").convert("RGB") for n in ("red_circle", "blue_square")]
    sample = Sample(history=[("there is a circle.", images[0]), ("it turns into a square.", images[1])],
                    target="it stays.")
    batch = collate([sample])
    text, shown = collate._render(sample, sample.history)
    own = model.processor(text=[text], images=shown, return_tensors="pt",
                          **({"add_special_tokens": False} if collate.chat else {}))
    own.pop("labels", None)
    length = own["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][:, :length], own["input_ids"])
    if prompt_format == "paper":  # the images are in the prompt's text, each as the family writes one
        marker = image_marker(model.processor)
        assert marker and text.count(marker) == 2, (marker, text)
    with torch.no_grad():
        ours = model.llm(**{k: v for k, v in batch.items() if k not in TARGETS}).logits[:, :length]
        theirs = model.llm(**own).logits
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("adapter", ["none", "prefix"])
@pytest.mark.parametrize("family", [*F.TEXT, *F.VISION])
def test_decoded_voken_states_are_the_training_ones(family, adapter, tmp_path):
    """Batched decoding, with left padding and voken groups fed in one step, keeps the hidden states a
    full training forward computes for the same tokens: positions (1-D, PaliGemma's from 1, Qwen2-VL's
    3-D), token types and cross-attention masks carry on as in training."""
    from PIL import Image

    from minigpt5_cli import recipe as R
    from minigpt5_cli.data.collate import Collator
    from minigpt5_cli.data.samples import Sample
    from minigpt5_cli.generation.decoder import Decoder
    from minigpt5_cli.generation.settings import Settings
    from minigpt5_cli.training.train import model_for

    llm = F.build(family, tmp_path / family)
    recipe = R.load(DEBUG / ("stage1.yaml" if adapter == "none" else "stage2_prefix.yaml"),
                    [f"model.llm={llm}", "data.max_length=512", "train.init_from=none"])
    torch.manual_seed(0)
    model = model_for(recipe).eval()
    if adapter == "prefix":
        with torch.no_grad():  # a prefix that matters
            for p in model.llm.prompt_encoder.parameters():
                p.normal_(0, 0.5)
    n, first = model.vokens.n, model.first_voken
    head = model.llm.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: out.index_add(
        -1, torch.tensor([first]), torch.full((*out.shape[:-1], 1), 1e4, dtype=out.dtype)))
    collate = Collator.for_model(model, recipe.data)
    images = [Image.open(IMAGES / f"{name}.png").convert("RGB") for name in ("red_circle", "blue_square")]
    samples = [Sample(history=[("there is a circle.", images[0]), ("it turns into a square.", images[1])]),
               Sample(history=[("a circle.", None)])]
    prompts = [collate.prompt(s, 512) for s in samples]
    settings = Settings(max_new_tokens=n, min_images=0, temperature=0.0).resolve(recipe.sample)
    decoder = Decoder(model, recipe.data, settings)
    segments, states = decoder(prompts, [0, 1])
    handle.remove()
    assert [[seg["image"] for seg in segs] for segs in segments] == [[0], [1]]
    for row, prompt in enumerate(prompts):
        full = collate.merge([collate.extend(prompt, list(range(first, first + n)))])
        with torch.no_grad():
            hidden = model.runner(full).hidden_states[-1]
        expected = model.voken_states(hidden, full["input_ids"])
        torch.testing.assert_close(states[row], expected[0], atol=1e-4, rtol=1e-4)
