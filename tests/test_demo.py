import json
import socket
from pathlib import Path

import pytest
from PIL import Image

from minigpt5_cli.demo.app import check_port, turn
from minigpt5_cli.errors import UserError
from minigpt5_cli.generation.settings import Settings

from conftest import run_cli

FAST = {"diffusion_steps": 2, "max_new_tokens": 16}


def test_a_port_in_use_is_refused_and_a_free_one_taken():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is in use; pick another with --port"):
            check_port("127.0.0.1", port)
    check_port("127.0.0.1", port)  # closed: free again
    with pytest.raises(UserError, match="not an address of this machine"):
        check_port("no-such-host.invalid", port)


@pytest.fixture(scope="module")
def loaded():
    from minigpt5_cli.generation import generate as G
    from minigpt5_cli.modeling.bundle import default_model

    return G.load(str(default_model()))


def test_a_step_is_what_generate_writes_for_the_same_story(loaded, tmp_path):
    """The demo runs generate itself: its first response is generate's, text and pixels."""
    step = "Draw a red circle at the top left."
    chat, steps, cut = turn(loaded, tmp_path, step, None, [], [], Settings(**FAST))
    assert chat[0] == {"role": "user", "content": step} and not cut
    shown = [m["content"]["path"] for m in chat if m["role"] == "assistant" and isinstance(m["content"], dict)]
    assert len(shown) == 1
    out = tmp_path / "cli"
    assert run_cli("generate", "-s", step, "-o", str(out), "--diffusion-steps", "2", "--max-new-tokens", "16") == 0
    doc = json.loads((out / "story.json").read_text())
    assert [m["content"] for m in chat[1:] if isinstance(m["content"], str)] == \
        [s["text"] for s in doc["generated"][0]["segments"] if "text" in s]
    assert Image.open(shown[0]).tobytes() == Image.open(out / doc["generated"][0]["images"][0]).tobytes()
    assert steps == [{"text": step, "image": None}, {"text": doc["generated"][0]["text"], "image": shown[0]}]


def test_the_story_so_far_goes_into_the_next_step(loaded, tmp_path):
    from minigpt5_cli.toyworld.world import render

    chat, steps, _ = turn(loaded, tmp_path, "Draw a red circle at the top left.", None, [], [], Settings(**FAST))
    render("green", "triangle", (2, 2)).save(tmp_path / "mine.png")
    markup = "It moves. <script>alert(1)</script>"
    chat, steps, _ = turn(loaded, tmp_path, markup, str(tmp_path / "mine.png"), chat, steps, Settings(**FAST))
    assert len(steps) == 4 and steps[2] == {"text": markup, "image": str(tmp_path / "mine.png")}
    # The second step's generate record: every earlier step, the first response included, as its input.
    folder = Path(steps[3]["image"]).parent
    doc = json.loads((folder / "story.json").read_text())
    assert [s["text"] for s in doc["input"]] == [s["text"] for s in steps[:3]]
    assert [bool(s["image"]) for s in doc["input"]] == [False, True, True]
    user = [m["content"] for m in chat if m["role"] == "user"]
    assert user[1] == "It moves. &lt;script&gt;alert(1)&lt;/script&gt;"  # shown as written
    assert user[2] == {"path": str(tmp_path / "mine.png")}
    assert sum(1 for m in chat if m["role"] == "assistant" and isinstance(m["content"], dict)) == 2


def test_a_step_longer_than_the_prompt_keeps_its_end(loaded, tmp_path, monkeypatch):
    """Past data.max_length the story loses its start: the model reads its last words and the assistant's cue."""
    from minigpt5_cli.generation.decoder import Decoder

    fed, decode = [], Decoder.__call__

    def spy(self, prompts, *args, **kwargs):  # the model's inputs, as generate gives them
        fed.extend(prompts)
        return decode(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Decoder, "__call__", spy)
    step = "Draw a blue square at the bottom right. " * 60 + "Then draw a red circle at the top left."
    chat, steps, cut = turn(loaded, tmp_path, step, None, [], [], Settings(**FAST))
    assert cut and steps[0]["text"] == step and chat[0]["content"] == step  # the story keeps the whole step
    ids = fed[0]["input_ids"][0]
    prompt = loaded.net.tokenizer.decode(ids, skip_special_tokens=True)
    room = loaded.data.max_length
    assert len(ids) <= room and len(ids) > room - 16  # the end of the story, as much of it as fits
    assert prompt.startswith("###Human: ")
    assert prompt.endswith("at the bottom right. Then draw a red circle at the top left. ###Assistant: ")


def test_generation_cuts_a_story_from_its_start_and_training_drops_whole_steps(loaded):
    from minigpt5_cli.data.collate import Collator
    from minigpt5_cli.data.samples import Sample
    from minigpt5_cli.toyworld.world import render

    net = loaded.net
    collate = Collator.for_model(net, loaded.data)

    def text(enc):
        assert enc["input_ids"].shape[1] <= 40
        return net.tokenizer.decode(enc["input_ids"][0], skip_special_tokens=True)

    old = " ".join(f"old{i}" for i in range(30))
    story = Sample(history=[(old, None), ("a red circle", None)])
    assert not collate.fits(story, 40)
    assert text(collate.prompt(story, 40)) == "###Human: a red circle ###Assistant: "  # training: as before
    kept = text(collate.prompt(story, 40, keep_end=True))
    assert kept.startswith("###Human: old") and kept.endswith(" old29\na red circle ###Assistant: ")
    # One step longer than the room: its last words stay, with its picture; a single long word is cut inside.
    picture = render("green", "triangle", (2, 2))
    enc = collate.prompt(Sample(history=[(old + " the end", picture)]), 40, keep_end=True)
    assert "pixel_values" in enc and text(enc).split()[-4:] == ["old29", "the", "end", "###Assistant:"]
    word = Sample(history=[("x" * 500 + "yz", None)])
    assert text(collate.prompt(word, 40, keep_end=True)).endswith("xyz ###Assistant: ")


def test_a_refused_setting_is_told_on_the_page_without_a_traceback(loaded, tmp_path):
    import gradio as gr

    from minigpt5_cli.demo.app import build_app

    app = build_app(loaded, tmp_path)
    submit = next(f.fn for f in app.fns.values() if f.fn.__name__ == "submit")
    with pytest.raises(gr.Error, match="--seed") as refused:
        submit({"text": "Draw a red circle.", "files": []}, [], [], "vokens", 16, 1.0, 0.9, 1.0, 1, 2, 7.5, 2**64)
    assert refused.value.print_exception is False


def test_the_page_lists_the_words_a_shapes_model_knows(loaded, tmp_path):
    import gradio as gr
    from transformers import AutoTokenizer

    from minigpt5_cli.demo.app import build_app, vocabulary
    from minigpt5_cli import hub
    from minigpt5_cli.toyworld import world

    intro = [b.value for b in build_app(loaded, tmp_path).blocks.values() if isinstance(b, gr.Markdown)][0]
    for words in [*world.PALETTE, *world.SHAPES, *world.PLACES.values(), "Now make it a square."]:
        assert words in intro
    other = type("Net", (), {"tokenizer": AutoTokenizer.from_pretrained(hub.resolve("tiny:llava"))})
    assert vocabulary(other) == ""  # another world's model: no shapes to list



@pytest.mark.parametrize("least", [0, 2])
def test_the_sliders_start_at_the_models_own_sampling(loaded, tmp_path, least):
    """The images-at-least slider starts at the recipe's sample.min_images (0 for the released model), as
    generate's --min-images does."""
    import dataclasses

    import gradio as gr

    from minigpt5_cli.demo.app import build_app

    model = dataclasses.replace(loaded, sample=dataclasses.replace(loaded.sample, min_images=least))
    app = build_app(model, tmp_path)
    [slider] = [b for b in app.blocks.values() if isinstance(b, gr.Slider) and b.label == "Images at least"]
    assert slider.value == least
