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
def model():
    from minigpt5_cli.generation import generate as G
    from minigpt5_cli.modeling.bundle import default_model

    return G.load(str(default_model()))


def test_a_step_is_what_generate_writes_for_the_same_story(model, tmp_path):
    """The demo runs generate itself: its first response is generate's, text and pixels."""
    net, info = model
    step = "Draw a red circle at the top left."
    chat, steps = turn(net, info, tmp_path, step, None, [], [], Settings(**FAST))
    assert chat[0] == {"role": "user", "content": step}
    shown = [m["content"]["path"] for m in chat if m["role"] == "assistant" and isinstance(m["content"], dict)]
    assert len(shown) == 1
    out = tmp_path / "cli"
    assert run_cli("generate", "-s", step, "-o", str(out), "--diffusion-steps", "2", "--max-new-tokens", "16") == 0
    doc = json.loads((out / "story.json").read_text())
    assert [m["content"] for m in chat[1:] if isinstance(m["content"], str)] == \
        [s["text"] for s in doc["generated"][0]["segments"] if "text" in s]
    assert Image.open(shown[0]).tobytes() == Image.open(out / doc["generated"][0]["images"][0]).tobytes()
    assert steps == [{"text": step, "image": None}, {"text": doc["generated"][0]["text"], "image": shown[0]}]


def test_the_story_so_far_goes_into_the_next_step(model, tmp_path):
    from minigpt5_cli.toyworld.world import render

    net, info = model
    chat, steps = turn(net, info, tmp_path, "Draw a red circle at the top left.", None, [], [], Settings(**FAST))
    render("green", "triangle", (2, 2)).save(tmp_path / "mine.png")
    markup = "It moves. <script>alert(1)</script>"
    chat, steps = turn(net, info, tmp_path, markup, str(tmp_path / "mine.png"), chat, steps, Settings(**FAST))
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
