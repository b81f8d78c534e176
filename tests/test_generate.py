import json
import logging
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from minigpt5_cli.generation import generate as G
from minigpt5_cli.generation.stories import Job, read_stories
from minigpt5_cli.story import Step, Story

from conftest import DEBUG, run_cli

IMAGES = DEBUG / "data" / "images"
FAST = ["--diffusion-steps", "2", "--max-new-tokens", "24"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Debug checkpoints: stage 1, then stage 2 with LoRA and with prefix tuning."""
    root = tmp_path_factory.mktemp("runs")
    data = DEBUG / "data"
    assert run_cli("train", "--recipe", str(DEBUG / "stage1.yaml"), f"data.train={data / 'pairs.jsonl'}",
                   f"train.output_dir={root / 's1'}", "train.max_steps=2") == 0
    for kind in ("lora", "prefix"):
        assert run_cli("train", "--recipe", str(DEBUG / f"stage2_{kind}.yaml"), f"data.train={data / 'sequences.jsonl'}",
                       f"train.output_dir={root / kind}", f"train.init_from={root / 's1'}", "train.max_steps=2") == 0
    return root


@pytest.fixture
def story_file(tmp_path):
    shutil.copy(IMAGES / "red_circle.png", tmp_path / "a.png")
    path = tmp_path / "story.json"
    path.write_text(json.dumps({"id": "s1", "steps": [
        {"text": "there is a circle.", "image": "a.png"},
        {"text": "it turns into a <script>alert(1)</script> square."},
    ]}))
    return path


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generate_writes_story_folder(runs, story_file, tmp_path):
    out = tmp_path / "out"
    assert run_cli("generate", "--story", str(story_file), "--model", str(runs / "lora"), "--output", str(out),
                   "--seed", "3", *FAST) == 0
    doc = json.loads((out / "story.json").read_text())
    assert doc["id"] == "s1" and doc["mode"] == "vokens" and doc["seed"] == 3
    assert doc["model"]["llm"] == "tiny:llava" and doc["model"]["checkpoint"].endswith("checkpoint-2")
    assert doc["settings"]["guidance_scale"] == 7.5 and doc["settings"]["top_p"] == 0.9
    assert doc["input"][0]["image"] == "input-1.png" and (out / "input-1.png").is_file()
    images = [name for step in doc["generated"] for name in step["images"]]
    assert images, "the default --min-images 1 gives every response an image"
    for name in images:
        assert Image.open(out / name).size == (32, 32)  # tiny:sd's resolution
    page = (out / "story.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert all(f'src="{name}"' in page for name in images + ["input-1.png"])
    assert '<meta name="viewport"' in page
    md = (out / "story.md").read_text()
    assert all(f"]({name})" in md for name in images)
    assert "<script>" not in md and r"&lt;script&gt;alert\(1\)&lt;/script&gt;" in md  # Markdown passes raw HTML on
    assert not (out / ".partial").exists()


def tokens(ids: list[int]) -> dict:
    """A prompt's model inputs, as the collator gives them."""
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}


def boost_img0(model):
    """Make [IMG0] the overwhelming next token, wherever the model is."""
    head = model.llm.get_output_embeddings()
    first = model.first_voken

    def hook(module, args, output):
        output = output.clone()
        output[..., first] += 1e4
        return output

    return head.register_forward_hook(hook)


@pytest.mark.parametrize("run", ["s1", "lora", "prefix"])
def test_voken_groups_are_forced_in_one_step_at_training_positions(runs, run):
    loaded = G.load(str(runs / run))
    model = loaded.net
    n = model.vokens.n
    handle = boost_img0(model)
    settings = G.Settings(max_new_tokens=2 * n, min_images=0).resolve(loaded.sample)
    decoder = G.Decoder(model, loaded.data, settings)
    prompt = model.tokenizer("###Human: there is a circle. ###Assistant: ")["input_ids"]
    calls = []  # tokens per forward call of the language model
    count = model.llm.get_input_embeddings().register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
    segments, states = decoder([tokens(prompt)], [0])
    handle.remove()
    count.remove()
    # [IMG0] sampled twice; each time the whole group went in as one forward call of n tokens.
    assert segments == [[{"image": 0}, {"image": 1}]]
    assert calls == [len(prompt), n, n]
    # The kept states are the ones training takes from a full forward over the same tokens.
    ids = torch.tensor([prompt + list(range(model.first_voken, model.first_voken + n)) * 2])
    with torch.no_grad():
        hidden = model.llm(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[-1]
    expected = model.voken_states(hidden, ids)
    assert states.shape == expected.shape == (2, n, model.llm_info.width)
    torch.testing.assert_close(states, expected, atol=1e-4, rtol=1e-4)


def test_two_voken_groups_give_two_images(runs, tmp_path):
    loaded = G.load(str(runs / "lora"))
    handle = boost_img0(loaded.net)
    settings = G.Settings(max_new_tokens=2 * loaded.net.vokens.n, min_images=0, diffusion_steps=2)
    G.generate(read_stories("it moves."), loaded, settings, tmp_path, nested=False)
    handle.remove()
    doc = json.loads((tmp_path / "story.json").read_text())
    assert doc["generated"][0]["images"] == ["image-1.png", "image-2.png"]
    assert not np.array_equal(pixels(tmp_path / "image-1.png"), pixels(tmp_path / "image-2.png"))


def test_min_images_zero_lets_the_model_decide(runs, tmp_path):
    loaded = G.load(str(runs / "lora"))
    model = loaded.net
    head = model.llm.get_output_embeddings()
    ban = head.register_forward_hook(lambda m, a, out: out.index_fill(-1, torch.tensor([model.first_voken]), -1e4))
    for min_images, folder in ((0, tmp_path / "free"), (1, tmp_path / "forced")):
        settings = G.Settings(max_new_tokens=20, min_images=min_images, diffusion_steps=2)
        G.generate(read_stories("it moves."), loaded, settings, folder, nested=False)
    ban.remove()
    free = json.loads((tmp_path / "free" / "story.json").read_text())["generated"][0]
    forced = json.loads((tmp_path / "forced" / "story.json").read_text())["generated"][0]
    assert free["images"] == [] and forced["images"] == ["image-1.png"]


@pytest.mark.parametrize("run", ["lora", "prefix"])
def test_batch_output_equals_one_by_one(runs, tmp_path, run):
    loaded = G.load(str(runs / run))
    shutil.copy(IMAGES / "red_circle.png", tmp_path / "red_circle.png")
    lines = [
        {"id": "a", "steps": [{"text": "there is a circle.", "image": "red_circle.png"}]},
        {"id": "b", "steps": [{"text": "a square."}, {"text": "it moves to the right, far away."}]},
        {"id": "c", "steps": [{"text": "x"}]},
    ]
    path = tmp_path / "stories.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    docs = {}
    for batch in (1, 3):
        settings = G.Settings(max_new_tokens=30, diffusion_steps=2, batch_size=batch, steps=2)
        G.generate(read_stories(str(path)), loaded, settings, tmp_path / str(batch), nested=True)
        docs[batch] = {sid: json.loads((tmp_path / str(batch) / sid / "story.json").read_text()) for sid in "abc"}
    for sid in "abc":
        one, many = docs[1][sid]["generated"], docs[3][sid]["generated"]
        # Same text; images equal up to float rounding in the padded batch (8-bit PNGs: within 2 levels).
        assert [s["text"] for s in one] == [s["text"] for s in many]
        assert [s["images"] for s in one] == [s["images"] for s in many]
        for name in (n for s in one for n in s["images"]):
            diff = np.abs(pixels(tmp_path / "1" / sid / name) - pixels(tmp_path / "3" / sid / name))
            assert diff.max() <= 2, (sid, name, diff.max())
    assert len({docs[1][sid]["generated"][0]["text"] for sid in "abc"}) == 3  # stories get their own seeds


def test_two_stage_mode_from_checkpoint_and_from_recipe(runs, tmp_path):
    for model in (runs / "lora", DEBUG / "stage2_lora.yaml"):
        out = tmp_path / model.stem
        assert run_cli("generate", "--story", "there is a circle.", "--model", str(model), "--output", str(out),
                       "--mode", "two-stage", "--steps", "2", *FAST) == 0
        doc = json.loads((out / "story.json").read_text())
        assert doc["mode"] == "two-stage"
        assert [step["images"] for step in doc["generated"]] == [["image-1.png"], ["image-2.png"]]
        assert [list(seg) for seg in doc["generated"][0]["segments"]][-1] == ["image"]  # the image follows its text


def test_a_recipe_s_untrained_parts_are_the_same_in_every_run(tmp_path, monkeypatch):
    """From a recipe the vokens, mapper and adapter are untrained but drawn alike in every run, so a run
    and its rerun (or another process) write the same files. A single story's temporary files lie inside
    --output, never beside it."""
    from minigpt5_cli import files

    partial, places = files._partial, []
    monkeypatch.setattr(files, "_partial", lambda out: places.append(out.parent) or partial(out))
    outs = [tmp_path / str(k) for k in range(2)]
    for k, out in enumerate(outs):
        torch.manual_seed(k)  # what came before the run differs, as between two processes
        assert run_cli("generate", "--story", "there is a circle.", "--model", str(DEBUG / "stage2_lora.yaml"),
                       "--output", str(out), *FAST) == 0
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir()) and any(n.endswith(".png") for n in names)
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert places and all(place in outs for place in places)


def test_two_stage_never_emits_vokens(runs):
    loaded = G.load(str(runs / "lora"))
    model = loaded.net
    handle = boost_img0(model)
    settings = G.Settings(mode="two-stage", max_new_tokens=12).resolve(loaded.sample)
    segments, states = G.Decoder(model, loaded.data, settings)(
        [tokens(model.tokenizer("###Human: hi ###Assistant: ")["input_ids"])], [0])
    handle.remove()
    assert states.shape[0] == 0 and all("image" not in seg for seg in segments[0])


def test_jsonl_gives_folders_and_index_and_keeps_finished_stories(runs, tmp_path, capsys):
    path = tmp_path / "stories.jsonl"
    path.write_text('{"id": "one/two", "steps": [{"text": "a circle."}]}\n\n{"id": "s2", "steps": [{"text": "b"}]}\n')
    out = tmp_path / "out"
    args = ["generate", "--story", str(path), "--model", str(runs / "lora"), "--output", str(out), "-b", "2", *FAST]
    assert run_cli(*args) == 0
    index = (out / "index.html").read_text()
    assert 'href="one_two/story.html"' in index and 'href="s2/story.html"' in index
    before = (out / "s2" / "story.json").stat().st_mtime_ns
    capsys.readouterr()
    assert run_cli(*args) == 0
    assert "2 stories already under" in capsys.readouterr().err
    assert (out / "s2" / "story.json").stat().st_mtime_ns == before
    assert run_cli(*args, "--overwrite") == 0
    assert (out / "s2" / "story.json").stat().st_mtime_ns != before


def test_off_a_terminal_generate_prints_plain_progress_lines(runs, tmp_path, monkeypatch, capsys):
    """A log file gets `stories DONE/TOTAL (RATE/s)` lines; here every update, not every 30 s."""
    from minigpt5_cli import display

    monkeypatch.setattr(display, "PLAIN_EVERY", 0)
    path = tmp_path / "stories.jsonl"
    path.write_text('{"id": "s1", "steps": [{"text": "a circle."}]}\n{"id": "s2", "steps": [{"text": "b"}]}\n')
    assert run_cli("generate", "--story", str(path), "--model", str(runs / "lora"), "--output", str(tmp_path / "out"),
                   *FAST) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stories ")]
    assert any(line.startswith("stories 1/2 (") for line in lines), lines
    assert lines[-1].startswith("stories 2/2 (") and lines[-1].endswith("/s)"), lines


def test_index_lists_prompts_with_small_thumbnails(runs, tmp_path, capsys):
    path = tmp_path / "stories.jsonl"
    path.write_text('{"id": "s1", "steps": [{"text": "there is a red circle in the middle of the picture."}]}\n')
    out = tmp_path / "out"
    assert run_cli("generate", "--story", str(path), "--model", str(runs / "lora"), "--output", str(out), *FAST) == 0
    assert f"1 story in {out}" in capsys.readouterr().out
    index = (out / "index.html").read_text()
    assert '<a href="s1/story.html">there is a red circle in the middle of the picture.</a>' in index
    assert '<img class="thumb"' in index and "img.thumb{width:6em;min-width:0" in index  # beats img's min-width


def test_help_texts_read_whole(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")
    helps = {}
    for command in ([], ["prepare-data"], ["train"], ["generate"], ["bundle"], ["evaluate"], ["arena", "results"],
                    ["export"], ["judge"], ["scores"], ["import-official", "minigpt5"]):
        run_cli(*command, "--help")
        helps[" ".join(command)] = capsys.readouterr().out
    for command, text in helps.items():
        assert not re.search(r"\w \.(\s|$)", text), command  # "Nucleus sampling .": a default eaten as markup
    rows = [line.split()[1] for line in helps[""].splitlines() if line.startswith("│ ")]
    assert rows == ["--help", "prepare-data", "train", "generate", "bundle", "evaluate", "export", "judge", "scores",
                    "demo", "rate", "arena", "import-official"], rows
    assert "MiniGPT-5's caption<TAB>image_path" in helps["prepare-data"]  # a paragraph is not cut mid-sentence
    assert "cc3m, toy" in " ".join(helps["evaluate"].split())


class Records(logging.Handler):
    """What the loggers of diffusers and transformers would print."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def library_log():
    handler, loggers = Records(), [logging.getLogger("diffusers"), logging.getLogger("transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.lines
    for logger in loggers:
        logger.removeHandler(handler)


def test_two_stage_says_once_how_many_captions_clip_cut(runs, library_log, capsys):
    from rich.console import Console

    from minigpt5_cli import display

    loaded = G.load(str(runs / "lora"))
    model = loaded.net
    renderer = G.Renderer(model, G.Settings(mode="two-stage", diffusion_steps=1).resolve(loaded.sample))
    limit = model.generator.tokenizer.model_max_length
    with display.progress(Console(stderr=True)):
        for _ in range(2):
            renderer([1, 2], captions=["a circle " * limit, "a circle."])
    assert not [line for line in library_log if "truncated" in line or "longer than" in line]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and f"2 captions were cut to CLIP's {limit} tokens" in err, err


def test_a_pipeline_without_safety_checker_says_nothing_of_it(library_log):
    from minigpt5_cli.modeling.generators import load_generator

    gen = load_generator("tiny:sd")
    type(gen.pipe)(**gen.pipe.components)  # as the generator stage builds the pipeline it saves
    assert not [line for line in library_log if "safety checker" in line]


def test_text_only_llm_drops_story_images_with_a_warning(tmp_path, story_file, capsys):
    recipe = yaml.safe_load((DEBUG / "stage1.yaml").read_text())
    recipe["model"]["llm"] = "tiny:llama"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert run_cli("generate", "--story", str(story_file), "--model", str(tmp_path / "r.yaml"),
                   "--output", str(tmp_path / "out"), *FAST) == 0
    err = capsys.readouterr().err
    assert "text-only" in err and "untrained" in err
    assert (tmp_path / "out" / "image-1.png").is_file()


def one_line_error(capsys, *argv) -> str:
    capsys.readouterr()
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_input_gives_one_line_errors(runs, tmp_path, story_file, capsys):
    def gen(story, model=runs / "lora"):
        return one_line_error(capsys, "generate", "--story", str(story), "--model", str(model),
                              "--output", str(tmp_path / "o"), *FAST)

    assert "model not found" in gen(story_file, tmp_path / "nope")
    assert "not a minigpt5 checkpoint" in gen(story_file, tmp_path)
    other = tmp_path / "other"
    shutil.copytree(runs / "lora" / "checkpoint-2", other)
    recipe = yaml.safe_load((other / "recipe.yaml").read_text())
    recipe["model"]["llm"] = "tiny:llama"
    (other / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert "made for other backbones" in gen(story_file, other)
    bad = tmp_path / "bad.json"
    bad.write_text('{"steps": [')
    assert "not valid JSON" in gen(bad)
    bad.write_text('{"steps": [{"text": "a", "image": "missing.png"}]}')
    assert "image not found" in gen(bad)
    bad.write_text('{"steps": [{"text": ""}]}')
    assert "empty" in gen(bad)
    assert "empty" in gen(" ")
    assert "no such file or folder" in gen(tmp_path / "none.jsonl")
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"steps": [{"text": "a"}]}\n{"steps": 3}\n')
    assert "line 2" in gen(lines)
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in one_line_error(capsys, "generate", "--story", "x", "--model", str(runs / "lora"),
                                               "--output", str(tmp_path / "o"), "--device", "cuda")
    assert "--image-size" in one_line_error(capsys, "generate", "--story", "x", "--model", str(runs / "lora"),
                                            "--output", str(tmp_path / "o"), "--image-size", "30")


def test_stories_from_a_prepared_continuation_set(runs, tmp_path):
    from test_prepare import vist_fixture

    data = tmp_path / "vist_test"
    assert run_cli("prepare-data", "vist", "--input", str(vist_fixture(tmp_path / "raw", "test")), "--split", "test",
                   "--continuation", "--output", str(data)) == 0
    out = tmp_path / "out"
    assert run_cli("generate", "--story", str(data), "--model", str(runs / "lora"), "--output", str(out), *FAST) == 0
    doc = json.loads((out / "s1" / "story.json").read_text())
    assert [s["text"] for s in doc["input"]] == [f"Story s1, step {k}." for k in range(4)]  # step 5 stays out
    assert all(s["image"] for s in doc["input"]) and doc["generated"][0]["images"]
    assert (out / "index.html").is_file()


def test_prompt_ends_with_the_instruction_the_model_was_trained_with():
    job = Job(read_stories("there is a circle.")[0], 0)
    assert G.history(job, ["turn"], 4) == [("there is a circle.", None)]
    assert G.history(job, ["gen", "multimodal", "understanding"], 4)[-1] == ("Tell me the next scene with image.", None)


def test_prompt_keeps_the_last_history_steps_as_training_does():
    job = Job(Story("a", [Step(f"step {k}.") for k in range(6)]), 0)
    assert [t for t, _ in G.history(job, ["turn"], 4)] == ["step 2.", "step 3.", "step 4.", "step 5."]
    assert G.history(job, ["turn"], 0) == []


def test_output_folder_files_of_others_are_never_overwritten(runs, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    long_story = "there is a circle in the middle of a very long story. " * 6  # longer than a file name may be
    assert run_cli("generate", "--story", long_story, "--model", str(runs / "lora"), "--output", str(out), *FAST) == 0
    assert (out / "notes.txt").read_text() == "keep me" and (out / "story.json").is_file()
    assert run_cli("generate", "--story", "x", "--model", str(runs / "lora"), "--output", str(out), "--overwrite",
                   *FAST) == 0  # our own story is redone
    other = tmp_path / "theirs"
    other.mkdir()
    (other / "image-1.png").write_bytes(b"someone's picture")
    err = one_line_error(capsys, "generate", "--story", "x", "--model", str(runs / "lora"), "--output", str(other),
                         *FAST)
    assert "not written by minigpt5" in err and (other / "image-1.png").read_bytes() == b"someone's picture"


def test_story_images_are_decoded_only_while_their_batch_runs(runs, story_file, tmp_path, capsys):
    (story,) = read_stories(str(story_file))
    picture = story.steps[0].image
    assert picture.path == story_file.parent / "a.png" and picture.data is None  # nothing decoded yet
    assert picture.open().size == Image.open(story_file.parent / "a.png").size
    (story_file.parent / "a.png").write_bytes(b"not a picture")
    capsys.readouterr()
    assert run_cli("generate", "--story", str(story_file), "--model", str(runs / "lora"), "--output",
                   str(tmp_path / "o"), *FAST) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress display
    assert last.startswith("error: image does not decode")


@pytest.mark.parametrize("run", ["lora", "prefix"])
def test_bf16_generation_runs(runs, tmp_path, run):
    lines = tmp_path / "s.jsonl"
    lines.write_text('{"id": "a", "steps": [{"text": "a circle."}]}\n{"id": "b", "steps": [{"text": "b"}]}\n')
    assert run_cli("generate", "--story", str(lines), "--model", str(runs / run), "--output", str(tmp_path / "o"),
                   "--precision", "bf16", "-b", "2", *FAST) == 0
    doc = json.loads((tmp_path / "o" / "a" / "story.json").read_text())
    assert doc["model"]["precision"] == "bf16" and doc["generated"][0]["images"]


def test_story_page_names_the_model_and_keeps_its_paths_in_story_json(tmp_path):
    from minigpt5_cli.modeling.bundle import default_model

    assert run_cli("generate", "--story", "Draw a red circle.", "--output", str(tmp_path / "o"), *FAST) == 0
    page = (tmp_path / "o" / "story.html").read_text()
    footer = page[page.index("<footer>"):page.index("</footer>")]
    assert str(default_model().parent) not in page and "toy" in footer  # the bundle's name, not its path
    doc = json.loads((tmp_path / "o" / "story.json").read_text())
    assert doc["model"]["name"] == "toy" and doc["model"]["llm"] == str(default_model() / "llm")


def evil_llm(folder, marker):
    """A model folder whose config names code of its own (`auto_map`); importing that code writes `marker`."""
    folder.mkdir(parents=True)
    ran = f"from pathlib import Path\n\nimport transformers\n\nPath({str(marker)!r}).write_text('ran')\n\n\n"
    (folder / "configuration_evil.py").write_text(
        ran + "class EvilConfig(transformers.PretrainedConfig):\n    model_type = 'evil'\n")
    (folder / "modeling_evil.py").write_text(ran + "class EvilModel(transformers.PreTrainedModel):\n    pass\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))


def test_a_model_folder_never_switches_remote_code_on(runs, tmp_path, capsys, monkeypatch):
    """A checkpoint shaped as a bundle whose recipe asks to run its LLM's own code: refused without
    --trust-remote-code, before any of that code runs."""
    marker, model = tmp_path / "ran", tmp_path / "model"
    shutil.copytree(runs / "lora" / "checkpoint-2", model)
    evil_llm(model / "llm", marker)
    recipe = yaml.safe_load((model / "recipe.yaml").read_text())
    recipe["model"].update(llm="llm", trust_remote_code=True)
    (model / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    err = one_line_error(capsys, "generate", "--story", "x", "--model", str(model), "--output", str(tmp_path / "o"),
                         *FAST)
    assert err == (f"error: {model}: its recipe asks to run the code in the LLM 'llm'; pass --trust-remote-code if "
                   "you trust it")
    assert not marker.exists() and not (tmp_path / "o").exists()
    # The folder's code does run once trusted: the refusal is what kept it from running.
    from transformers import AutoConfig, dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    AutoConfig.from_pretrained(str(model / "llm"), trust_remote_code=True)
    assert marker.read_text() == "ran"


def test_a_bundles_backbones_stay_inside_it(tmp_path):
    from minigpt5_cli.errors import UserError
    from minigpt5_cli.modeling.bundle import beside

    bundle = tmp_path / "a" / "bundle"
    (bundle / "llm").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (bundle / "generator").symlink_to(tmp_path / "elsewhere")
    assert beside(bundle, "llm") == str(bundle / "llm")
    assert beside(bundle, "tiny:sd") == "tiny:sd" and beside(bundle, "org/model") == "org/model"  # hub ids
    for name in ("../../elsewhere", "generator", "llm/../../../elsewhere"):
        with pytest.raises(UserError, match="leads outside"):
            beside(bundle, name)


def test_story_images_stay_in_the_story_folder(tmp_path, capsys):
    """`..`, absolute paths and links out of the story's folder are refused, unless --allow-outside-paths."""
    from minigpt5_cli.data.sources import read_jsonl
    from minigpt5_cli.errors import UserError

    folder = tmp_path / "stories"
    folder.mkdir()
    shutil.copy(IMAGES / "red_circle.png", tmp_path / "secret.png")
    (folder / "link.png").symlink_to(tmp_path / "secret.png")
    for image in ("../secret.png", str(tmp_path / "secret.png"), "link.png"):
        story = folder / "story.json"
        story.write_text(json.dumps({"id": "s", "steps": [{"text": "a circle.", "image": image}]}))
        err = one_line_error(capsys, "generate", "--story", str(story), "--model", str(DEBUG / "stage2_lora.yaml"),
                             "--output", str(tmp_path / "o"), *FAST)
        assert err.startswith(f"error: {story}: the image {image!r} of step 1 is outside {folder}"), err
        assert err.endswith("--allow-outside-paths")
        (picture,) = [s.image for s in read_stories(str(story), outside=True)[0].steps]
        assert picture.open().size == Image.open(IMAGES / "red_circle.png").size
        lines = folder / "s.jsonl"
        lines.write_text(json.dumps({"id": "s", "steps": [{"text": "a"}, {"text": "b", "image": image}]}) + "\n")
        with pytest.raises(UserError, match="is outside"):
            read_stories(str(lines))
        with pytest.raises(UserError, match="is outside.*data.allow_outside_paths=true"):  # a training file alike
            read_jsonl(lines, "2")
        assert read_jsonl(lines, "2", outside=True)[0].steps[1].image.open().size == picture.open().size
    assert not (tmp_path / "o").exists()


def test_story_md_has_no_live_link_or_remote_image(tmp_path):
    from markdown_it import MarkdownIt

    from minigpt5_cli.generation.output import write_story

    text = "see [x](javascript:alert(1)) and ![](http://evil/x.png) <img src=http://evil/y.png> [r]\n\n[r]: http://e"
    story = Story("s", [Step(text), Step("[a](http://evil/a)")])
    job = Job(story, 0, [[{"text": text}, {"image": Image.new("RGB", (8, 8))}, {"text": "![b](https://evil/b.png)"}]])
    write_story(tmp_path, job, {}, None)
    page = MarkdownIt("commonmark").render((tmp_path / "story.md").read_text())
    assert "<a " not in page and "javascript:alert(1)" in page  # shown as text
    assert page.count("<img ") == 1 and '<img src="image-1.png"' in page  # only the picture written beside it


def test_output_inside_the_model_folder_is_refused(runs, tmp_path, capsys, monkeypatch):
    from minigpt5_cli.modeling import bundle

    run = tmp_path / "run"
    shutil.copytree(runs / "lora", run)
    shipped = tmp_path / "shipped"
    shutil.copytree(bundle.DEFAULT, shipped)
    monkeypatch.setattr(bundle, "DEFAULT", shipped)
    for model, out in ((run, run / "out"), (run, run / "checkpoint-2" / "out"), (run / "checkpoint-2", run / "o"),
                       (run, run), (None, shipped / "out")):
        argv = ["generate", "--story", "x", "--output", str(out), *FAST] + (["--model", str(model)] if model else [])
        err = one_line_error(capsys, *argv)
        assert err.startswith(f"error: --output {out} is inside the model folder "), err
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in (runs / "lora").iterdir())
    assert not (shipped / "out").exists()


def test_a_failed_generate_leaves_no_folder_it_made(tmp_path, capsys):
    """Only the folders it made, and only while empty: one that was there before stays."""
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "a.png").write_bytes(b"not a picture")  # fails once its batch runs
    story = tmp_path / "s" / "story.json"
    story.write_text(json.dumps({"id": "s", "steps": [{"text": "a circle.", "image": "a.png"}]}))
    (tmp_path / "mine").mkdir()
    for out in (tmp_path / "new" / "out", tmp_path / "mine"):
        capsys.readouterr()
        assert run_cli("generate", "--story", str(story), "--model", str(DEBUG / "stage2_lora.yaml"), "--output",
                       str(out), *FAST) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: image does not decode")
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_words_the_shipped_model_does_not_know_are_named_in_one_line(tmp_path, capsys):
    """A request outside the shapes world still runs, but the user is told which words the model cannot read."""
    capsys.readouterr()
    assert run_cli("generate", "-s", "Draw a pink star in the corner.", "-o", str(tmp_path / "out"), *FAST) == 0
    told = [line for line in capsys.readouterr().err.splitlines() if "does not know" in line]
    assert told == ["warning: the model does not know the words 'pink', 'star', 'corner'; they are read as unknown"]


def test_unknown_words_are_what_the_tokenizer_cannot_hold():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from minigpt5_cli.generation.stories import EXAMPLES, unknown_words
    from minigpt5_cli.modeling.bundle import default_model
    from minigpt5_cli import hub

    # The shipped byte-level tokenizer holds each shapes-world word whole: anything else comes in letters.
    shipped = AutoTokenizer.from_pretrained(default_model() / "llm")
    assert unknown_words(shipped, ["Draw a pink star in the corner.", "A pink moon."]) == \
        ["pink", "star", "corner", "A", "moon"]
    assert unknown_words(shipped, EXAMPLES) == []  # what the help and the demo suggest
    # A word-level tokenizer: the words it maps to its unknown token.
    vocab = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "circle": 2, ".": 3}, unk_token="<unk>"))
    vocab.pre_tokenizer = pre_tokenizers.Whitespace()
    assert unknown_words(PreTrainedTokenizerFast(tokenizer_object=vocab, unk_token="<unk>"),
                         ["a pink circle."]) == ["pink"]
    # An open byte-level vocabulary never yields its unknown token: nothing to tell.
    assert unknown_words(AutoTokenizer.from_pretrained(hub.resolve("tiny:llava")), ["Draw a pink star."]) == []


def test_generate_help_lists_the_shapes_words_and_requests(capsys):
    from minigpt5_cli.generation.stories import EXAMPLES
    from minigpt5_cli.toyworld import world

    capsys.readouterr()
    assert run_cli("generate", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())  # as wrapped to any width
    for words in [*world.PALETTE, *world.SHAPES, *world.PLACES.values(), *EXAMPLES]:
        assert words in text


def test_help_starts_without_torch():
    import subprocess

    # A fresh process: torch takes over a second to import, and no help needs it.
    script = ("import sys\nfrom minigpt5_cli.cli import main\nfor argv in ([], ['generate'], ['rate'], ['demo']):\n"
              "    try:\n        main([*argv, '--help'])\n    except SystemExit:\n        pass\n"
              "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'gradio') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=DEBUG.parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def test_a_missing_path_is_refused_not_read_as_text(tmp_path, monkeypatch):
    from minigpt5_cli.errors import UserError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for arg in ("data/toy/stories_tst", "data/stories_tst", "stories.jsonl", "story.json", "./story"):
        with pytest.raises(UserError, match=f"^--story {arg}: no such file or folder; to use it as text"):
            read_stories(arg)
    # Text stays text: a slash among words or in a word that names no folder, a sentence, a plain word.
    for text in ("a red/blue circle.", "and/or", "red/blue", "Draw a red circle.", "circle"):
        assert [s.text for s in read_stories(text)[0].steps] == [text]

