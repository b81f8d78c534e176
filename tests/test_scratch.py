"""Backbones trained from scratch (stages llm and generator), multi-source data, bundles."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import DEBUG, run_cli
from minigpt5_cli import recipe as recipes
from minigpt5_cli import hub
from minigpt5_cli.builders import tiny
from minigpt5_cli.toyworld import world as toy
from minigpt5_cli.modeling.backbones import load_llm
from minigpt5_cli.modeling.generators import load_generator
from minigpt5_cli.data.collate import Collator
from minigpt5_cli.data.samples import TrainSet
from minigpt5_cli.data.sources import load_sources
from minigpt5_cli.errors import UserError


def _set(stage, history: int) -> dict:
    """TrainSet's settings in these tests: 32 px, no instruction form, images in prompts, turns."""
    return dict(stage=stage, resolution=32, history=history, seed=0, instruction_prob=0.0, images_in_prompt=True,
                tasks=["turn"])


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from minigpt5_cli.data.prepare import prepare_toy

    root = tmp_path_factory.mktemp("toy") / "data"
    prepare_toy(root, seed=0, counts={"pairs": 40, "stories": 8, "stories_test": 3, "dialogs": 4})
    return root


def test_toy_tokenizers_hold_every_toy_word_whole():
    import re

    llm = load_llm("toy:llava")
    gen = load_generator("toy:sd")
    for text in toy.corpus():
        words = re.findall(r"\w+|[^\w\s]", text)
        assert len(llm.tokenizer.tokenize(text)) == len(words), text
        assert len(gen.tokenizer.tokenize(text)) == len(words), text
    assert max(len(gen.tokenizer.tokenize(toy.caption(*c))) for c in toy.combinations()) + 2 <= gen.cond_shape[0]
    assert gen.resolution == toy.SIZE


def test_sources_chain_and_the_llm_stage_captions_one_step_rows(toy_data):
    source = load_sources([str(toy_data / "pairs"), str(toy_data / "dialogs")], "2")
    assert len(source) == 44 and source[40].id == "dialog-train-00000"
    llm = TrainSet(source, **_set("llm", 4))
    tasks = [task for _, _, task in llm.index]
    assert tasks.count("caption") == 40 and tasks.count("turn") == 4 * 3
    assert not any(llm[i].vokens for i in range(len(llm)))
    sample = llm[0]
    assert sample.target == source[0].steps[0].text and sample.history[0][1] is not None
    stage2 = TrainSet(source, **_set("2", 4))
    assert [s for _, _, s in stage2.index] == ["turn"] * 12  # pairs have no turns
    assert sum(stage2[i].vokens for i in range(len(stage2))) == 8


def test_stage2_caption_targets_only_when_every_target_has_one(toy_data):
    gen, llm = load_generator("toy:sd"), load_llm("toy:llava")
    collate = Collator(tokenizer=llm.tokenizer, processor=llm.processor, first_voken=0, n_vokens=0, max_length=256)
    stories = TrainSet(load_sources([str(toy_data / "stories")], "2"), **_set("2", 2))
    batch = collate([stories[i] for i in range(4)])
    steps = [stories.source[r].steps[k] for r, k, _ in stories.index[:4]]
    assert batch["captions"] == [s.caption for s in steps]  # for the generator's own text encoders
    assert gen.encode(batch["captions"])[0].shape == (4, *gen.cond_shape)
    assert all(s.caption not in str(stories[i].history) for i, s in enumerate(steps))  # never in prompts
    plain = dataclasses.replace(stories[0], caption=None)
    assert "captions" not in collate([stories[1], plain])


def _recipe(path, **overrides):
    return recipes.load(path, [f"{k}={v}" for k, v in overrides.items()])


def test_generator_stage_trains_and_saves_a_loadable_pipeline(toy_data, tmp_path):
    from minigpt5_cli.training.train import train

    out = tmp_path / "gen"
    before = load_generator("toy:sd")
    recipe = _recipe(DEBUG.parent / "toy" / "generator.yaml", **{
        "data.train": toy_data / "pairs", "train.output_dir": out, "scratch.vae_steps": 3,
        "train.max_steps": 3, "scratch.eval_every": 3, "scratch.eval_samples": 4, "train.batch_size": 4})
    assert train(recipe) == out
    state = json.loads((out / "scratch_state.json").read_text())
    assert state["vae_steps"] == 3 and state["steps"] == 3
    assert set(state["accuracy"]) == {"colour", "shape", "position"}
    # 3 VAE steps carry few of the world's 162 pictures through the round trip; each wrong one is named.
    assert 0 < len(state["vae_round_trip_wrong"]) <= 162
    assert all(text.startswith(("a ", "an ")) for text in state["vae_round_trip_wrong"])
    gen = load_generator(str(out))
    assert gen.vae.config.scaling_factor != before.vae.config.scaling_factor  # measured on the latents
    for name in ("vae", "unet", "text_encoder"):
        a, b = getattr(gen.pipe, name).state_dict(), getattr(before.pipe, name).state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a), name
    with pytest.raises(UserError, match="not empty"):
        train(recipe)
    with pytest.raises(UserError, match="cannot resume"):
        train(recipe, resume=True)


def test_generator_stage_counts_steps_from_epochs_and_accumulates(toy_data, tmp_path, monkeypatch):
    """With max_steps 0 the UNet trains for train.epochs passes over the images, train.grad_accum
    micro-batches per step; neither is silently ignored."""
    from minigpt5_cli.training.train import train

    recipe = _recipe(DEBUG.parent / "toy" / "generator.yaml", **{
        "data.train": toy_data / "pairs", "train.output_dir": tmp_path / "gen", "scratch.vae_steps": 1,
        "train.max_steps": 0, "train.epochs": 1, "train.batch_size": 4, "train.grad_accum": 2,
        "scratch.eval_every": 0})
    calls = []
    real = torch.nn.Module.__call__
    monkeypatch.setattr(type(load_generator("toy:sd").denoiser), "__call__",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    train(recipe)
    state = json.loads((tmp_path / "gen" / "scratch_state.json").read_text())
    assert state["steps"] == 5  # 40 pairs / (4 x 2) per step
    assert len(calls) == 10  # every micro-batch ran the UNet


def test_llm_stage_learns_the_toy_text(toy_data, tmp_path):
    from minigpt5_cli.training.train import train

    def loss_of(name):
        llm = load_llm(name)
        data = TrainSet(load_sources([str(toy_data / "pairs")], "2"), **_set("llm", 4))
        batch = Collator(tokenizer=llm.tokenizer, processor=llm.processor, first_voken=0,
                         n_vokens=0, max_length=256)([data[i] for i in range(16)])
        with torch.no_grad():
            return llm.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")},
                             labels=batch["labels"]).loss.item()

    out = tmp_path / "llm"
    recipe = _recipe(DEBUG.parent / "toy" / "llm_vision.yaml", **{
        "data.train": toy_data / "pairs", "data.extra": f"[{toy_data / 'stories'}]", "train.output_dir": out,
        "train.max_steps": 40, "train.batch_size": 8, "train.warmup_steps": 2})
    train(recipe)
    assert json.loads((out / "scratch_state.json").read_text())["step"] == 40
    assert loss_of(str(out)) < 0.6 * loss_of("toy:llava")


def test_stage2_without_stage1_starts_fresh(tmp_path):
    from minigpt5_cli.training.train import train

    recipe = _recipe(DEBUG / "stage2_lora.yaml", **{"train.init_from": "none", "train.output_dir": tmp_path / "s2",
                                                    "train.max_steps": 1})
    assert (train(recipe) / "vokens.safetensors").is_file()


def test_bundle_runs_from_anywhere_like_its_checkpoint(tmp_path, monkeypatch):
    from minigpt5_cli.generation.stories import read_stories

    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    assert run_cli("train", "-r", str(DEBUG / "stage1.yaml"), f"train.output_dir={s1}", "train.max_steps=2") == 0
    assert run_cli("train", "-r", str(DEBUG / "stage2_lora.yaml"), f"train.output_dir={s2}",
                   f"train.init_from={s1}", "train.max_steps=2") == 0
    full, half = tmp_path / "full", tmp_path / "half"
    assert run_cli("bundle", str(s2), str(full), "--fp32") == 0
    assert run_cli("bundle", str(s2), str(half)) == 0
    assert run_cli("bundle", str(s2), str(half)) == 2  # exists
    assert run_cli("bundle", str(tmp_path), str(tmp_path / "x")) == 2  # not a checkpoint
    assert recipes.load(full / "recipe.yaml").model.llm == "llm"
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*.safetensors"))  # noqa: E731
    assert size(half) < 0.7 * size(full)
    moved = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(full, moved)
    monkeypatch.chdir(tmp_path / "elsewhere")
    story = json.dumps({"id": "s", "steps": [{"text": "there is a circle.", "image": None}]})
    (tmp_path / "story.json").write_text(story)
    args = ["generate", "-s", str(tmp_path / "story.json"), "--diffusion-steps", "2", "--max-new-tokens", "12"]
    assert run_cli(*args, "-m", str(s2), "-o", str(tmp_path / "a")) == 0
    assert run_cli(*args, "-m", "bundle", "-o", str(tmp_path / "b")) == 0
    a, b = (json.loads((tmp_path / d / "story.json").read_text()) for d in "ab")
    assert a["generated"] == b["generated"]
    assert (tmp_path / "a" / "image-1.png").read_bytes() == (tmp_path / "b" / "image-1.png").read_bytes()
    assert read_stories(str(tmp_path / "story.json"))[0].id == "s"


def test_a_scratch_stage_names_its_local_backbone_relative_to_its_folder(tmp_path, monkeypatch):
    """As train does: the recipe saved with the trained backbone names the one it started from relative to
    itself, so the two move together."""
    from minigpt5_cli.training import scratch

    (tmp_path / "runs" / "toy" / "llm_vision").mkdir(parents=True)
    (tmp_path / "runs" / "toy" / "llm").mkdir()
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(DEBUG.parent / "toy" / "llm.yaml")
    assert recipe.model.llm == "runs/toy/llm_vision"
    scratch._save(Path("runs/toy/llm"), lambda folder: None, recipe, {})
    assert recipes.load(tmp_path / "runs/toy/llm/recipe.yaml").model.llm == "../llm_vision"


def test_tiny_names_resolve_to_distinct_folders():
    assert len({hub.resolve(n) for n in tiny.NAMES}) == len(tiny.NAMES)


def test_sampling_defaults_come_from_the_model_recipe():
    from minigpt5_cli.generation.settings import Settings

    toy_recipe = recipes.load(DEBUG.parent / "toy" / "stage2_lora.yaml")
    settled = Settings(top_p=0.5).resolve(toy_recipe.sample)
    assert (settled.temperature, settled.repetition_penalty, settled.top_p) == (0.0, 1.0, 0.5)
    paper = Settings().resolve(recipes.load(None).sample)
    assert (paper.temperature, paper.repetition_penalty, paper.diffusion_steps, paper.guidance_scale) == \
        (1.0, 2.0, 50, 7.5)
    with pytest.raises(UserError, match="top-p"):
        Settings(top_p=0.0).resolve(toy_recipe.sample)


def test_quick_chain_runs_from_nothing(tmp_path):
    """The shapes-world chain as CI runs it: every command of recipes/toy/chain.sh, tiny step counts."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "QUICK": "1", "PYTHON": sys.executable}  # no `minigpt5` script needed on PATH
    done = subprocess.run(["bash", str(DEBUG.parent / "toy" / "chain.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((tmp_path / "runs/toy/test/metrics.json").read_text())["metrics"]
    assert {m: metrics[m]["n"] for m in ("toy_colour", "toy_shape", "toy_position", "toy_text")} == \
        dict.fromkeys(("toy_colour", "toy_shape", "toy_position", "toy_text"), 6)
    assert recipes.load(tmp_path / "runs/toy/bundle/recipe.yaml").model.llm == "llm"
    assert recipes.load(tmp_path / "runs/toy/stage1/checkpoint-2/recipe.yaml").model.llm == "../../llm"


def test_default_model_continues_held_out_stories_offline(tmp_path):
    """`generate` without --model runs the shipped shapes-world bundle, offline. On unseen stories its
    text and pictures follow the story, the colour (never named in the text) taken from the story's
    images; a plain-text drawing request gets the picture it asks for."""
    from PIL import Image

    from minigpt5_cli.modeling.bundle import default_model

    assert (default_model() / "recipe.yaml").is_file()
    rows, truth = [], []
    for rec in toy.records("stories", 12, seed=99, split="test"):
        for k, step in enumerate(rec["steps"][:4]):
            step["image"].save(tmp_path / f"{rec['id']}-{k}.png")
        rows.append({"id": rec["id"], "steps": [{"text": s["text"], "image": f"{rec['id']}-{k}.png"}
                                                for k, s in enumerate(rec["steps"][:4])]})
        truth.append((rec["steps"][4]["text"], rec["attributes"][4]))
    (tmp_path / "stories.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    assert run_cli("generate", "--story", str(tmp_path / "stories.jsonl"), "--output", str(out), "-b", "6") == 0
    texts, images = [], []
    for row in rows:
        doc = json.loads((out / row["id"] / "story.json").read_text())
        texts.append(doc["generated"][0]["segments"][0].get("text"))
        images.append(Image.open(out / row["id"] / "image-1.png"))
    assert sum(t == want for t, (want, _) in zip(texts, truth)) >= 11
    assert all(v >= 0.8 for v in toy.accuracy(images, [a for _, a in truth]).values())
    assert (out / "index.html").is_file()

    request = tmp_path / "request"
    assert run_cli("generate", "--story", "Draw a blue triangle on the right.", "--output", str(request)) == 0
    doc = json.loads((request / "story.json").read_text())
    assert doc["generated"][0]["segments"][0]["text"] == "Here is a blue triangle on the right."
    assert toy.read_attributes(Image.open(request / "image-1.png")) == ("blue", "triangle", (1, 2))
    assert 'src="image-1.png"' in (request / "story.html").read_text()
