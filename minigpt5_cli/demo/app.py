"""The demo's Gradio app. Each story step runs `generate` itself on the story so far (every earlier
step and response, the prompt keeping the last `data.history` as generate does) into a folder of
its own, and shows the response's text and images from what it wrote.
"""

from __future__ import annotations

import errno
import html
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

from minigpt5_cli.errors import UserError
from minigpt5_cli.story import STORY_FILE, Picture, Step, Story

HOW = ("Write a step of a story, attach an image if you like, and the model continues it with text and "
       "pictures. Each step goes into the prompt with the ones before it; **New story** starts over.")
CUT = "The start of the story was dropped to fit the model's {} tokens: the response follows on from its end."


def vocabulary(net) -> str:
    """A line for under the intro: the words a shapes-world model knows, and requests to try; empty for any
    other model."""
    from minigpt5_cli.generation.stories import EXAMPLES, shapes_only, shapes_vocabulary

    if not shapes_only(net.tokenizer):
        return ""
    kinds = "; ".join(f"{kind}: {', '.join(words)}" for kind, words in shapes_vocabulary().items())
    tries = ", then ".join(f"*{e}*" for e in EXAMPLES)
    return f"This model knows the shapes world's words only ({kinds}); it reads others as unknown. Try {tries}"


def check_port(host: str, port: int) -> None:
    """Refuse a port another program listens on, before the model is loaded."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise UserError(f"--host {host} is not an address of this machine") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: a closed port is free
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is in use; pick another with --port") from None
            raise UserError(f"cannot listen on {host} port {port}: {e.strerror or e}") from None


def respond(loaded, workdir: Path, text: str, image: str | None, steps: list[dict],
            settings) -> tuple[dict, Path, bool]:
    """Generate one response to the story `steps` plus this step; return generate's record, its folder
    and whether the prompt lost the story's start to fit `data.max_length` (generate keeps its end).
    A step is {"text", "image"} with the image a file path or None."""
    from minigpt5_cli.data.collate import Collator
    from minigpt5_cli.data.samples import Sample
    from minigpt5_cli.generation import generate as G
    from minigpt5_cli.generation.stories import Job

    story = Story(id="demo", steps=[Step(text=s["text"], image=Picture(s["image"], path=Path(s["image"]))
                                         if s["image"] else None)
                                    for s in steps + [{"text": text, "image": image}]])
    net, data = loaded.net, loaded.data
    settings = settings.resolve(loaded.sample)  # refused here, before a folder is made for it
    prompt = Sample(history=G.history(Job(story, 0), data.tasks, data.history, net.processor is not None))
    cut = not Collator.for_model(net, data).fits(prompt, data.max_length)
    out = Path(tempfile.mkdtemp(dir=workdir, prefix="step-"))
    G.generate([story], loaded, settings, out, nested=False, overwrite=True)
    return json.loads((out / STORY_FILE).read_text(encoding="utf-8")), out, cut


def turn(loaded, workdir: Path, text: str, image: str | None, chat: list, steps: list[dict],
         settings) -> tuple[list, list[dict], bool]:
    """One story step: the chat and the story's steps with this step and the model's response added,
    and whether the prompt lost the story's start. Texts go into the chat escaped: it renders HTML
    even without Markdown, and a story's markup is to be shown as written, never rendered."""
    doc, out, cut = respond(loaded, workdir, text, image, steps, settings)
    response = doc["generated"][0]
    chat = list(chat or [])
    if text:
        chat.append({"role": "user", "content": html.escape(text)})
    if image:
        chat.append({"role": "user", "content": {"path": image}})
    for seg in response["segments"]:
        chat.append({"role": "assistant", "content": {"path": str(out / seg["image"]), "alt_text": "generated image"}
                     if "image" in seg else html.escape(seg["text"])})
    first = response["images"][0] if response["images"] else None  # a response's first image, as generate's history
    steps = steps + [{"text": text, "image": image},
                     {"text": response["text"], "image": str(out / first) if first else None}]
    return chat, steps, cut


def build_app(loaded, workdir: Path):
    import gradio as gr

    from minigpt5_cli.generation.settings import MODES, Settings

    net, info, sample = loaded.net, loaded.info, loaded.sample

    def submit(message, chat, steps, mode, max_new_tokens, temperature, top_p, repetition_penalty, min_images,
               diffusion_steps, guidance_scale, seed):
        text = (message or {}).get("text", "").strip()
        files = (message or {}).get("files") or []
        image = files[0] if files else None
        image = image.get("path") if isinstance(image, dict) else image
        if not text and not image:  # nothing to add: the story stays as it is, the box emptied of spaces
            return None, gr.skip(), gr.skip(), gr.skip()
        if image and net.processor is None:
            gr.Warning("This model's language model reads text only: the picture is shown, not read.")
        settings = Settings(mode=mode, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                            top_p=float(top_p), repetition_penalty=float(repetition_penalty),
                            min_images=int(min_images), diffusion_steps=int(diffusion_steps),
                            guidance_scale=float(guidance_scale), seed=int(seed or 0))
        try:
            chat, steps, cut = turn(loaded, workdir, text, image, chat, steps, settings)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None  # told on the page: no traceback
        return None, chat, steps, gr.Markdown(CUT.format(loaded.data.max_length), visible=cut)

    with gr.Blocks(title="MiniGPT-5", analytics_enabled=False) as app:
        gr.Markdown(f"## MiniGPT-5 · {html.escape(info['name'])}\n{HOW}\n\n{vocabulary(net)}")
        chat = gr.Chatbot(label="Story", height=480, render_markdown=False, sanitize_html=True, allow_tags=False,
                          feedback_options=None, buttons=[], elem_id="story")
        box = gr.MultimodalTextbox(placeholder="The next step of the story; attach an image if you like",
                                   file_types=["image"], file_count="single", sources=["upload"], show_label=False,
                                   autofocus=True, elem_id="step")
        note = gr.Markdown(visible=False, elem_id="note")
        steps = gr.State([])
        with gr.Accordion("Sampling settings", open=False):
            with gr.Row():
                mode = gr.Radio(list(MODES), value="vokens", label="Mode",
                                info="vokens: MiniGPT-5; two-stage: text, then text-to-image")
                seed = gr.Number(0, precision=0, minimum=0, label="Seed")
            with gr.Row():
                # wide enough for the recipe's own values, which may lie past the usual range
                max_new_tokens = gr.Slider(1, max(512, sample.max_new_tokens), value=sample.max_new_tokens, step=1,
                                           label="Tokens per response")
                min_images = gr.Slider(0, max(4, sample.min_images), value=sample.min_images, step=1,
                                       label="Images at least")
            with gr.Row():
                temperature = gr.Slider(0, 2, value=sample.temperature, step=0.05, label="Temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1, value=sample.top_p, step=0.05, label="Top p")
                repetition_penalty = gr.Slider(1, 3, value=sample.repetition_penalty, step=0.05,
                                               label="Repetition penalty")
            with gr.Row():
                diffusion_steps = gr.Slider(1, 100, value=sample.diffusion_steps, step=1, label="Diffusion steps")
                guidance_scale = gr.Slider(1, 15, value=sample.guidance_scale, step=0.5, label="Guidance scale")
        new = gr.Button("New story", variant="secondary")
        settings = [mode, max_new_tokens, temperature, top_p, repetition_penalty, min_images, diffusion_steps,
                    guidance_scale, seed]
        box.submit(submit, [box, chat, steps, *settings], [box, chat, steps, note])
        new.click(lambda: (None, [], [], gr.Markdown(visible=False)), outputs=[box, chat, steps, note])
        chat.clear(lambda: ([], gr.Markdown(visible=False)), outputs=[steps, note])  # its own clear button too
    return app


def css(resolution: int) -> str:
    """Pictures at a readable size; small ones (the shapes world's are 32 pixels a side) as pixels."""
    pixels = "image-rendering:pixelated;" if resolution < 128 else ""
    return f"#story img{{{pixels}object-fit:contain !important;width:16em;height:16em;max-width:100%}}"


def serve(model: str, port: int = 7860, host: str = "127.0.0.1", device: str | None = None,
          precision: str | None = None, trust_remote_code: bool = False) -> None:
    """Load the model and serve the demo until interrupted (`trust_remote_code`: as generate's)."""
    from minigpt5_cli.generation.settings import check_precision

    check_precision(precision)
    check_port(host, port)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry, no version check
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the demo needs Gradio: pip install 'minigpt5[demo]'") from None
    from minigpt5_cli.generation import generate as G

    loaded = G.load(model, precision=precision, device=device, trust_remote_code=trust_remote_code)
    workdir = Path(tempfile.mkdtemp(prefix="minigpt5-demo-"))
    try:
        app = build_app(loaded, workdir)
        app.queue(default_concurrency_limit=1)  # one model: one generation at a time
        app.launch(server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False, quiet=True,
                   allowed_paths=[str(workdir)], footer_links=[], css=css(loaded.net.generator.resolution),
                   mcp_server=False, prevent_thread_lock=True)
        print(f"the demo is at http://{host}:{port} (Ctrl-C stops it)", flush=True)
        if threading.current_thread() is threading.main_thread():  # `kill` stops it as Ctrl-C does
            signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            while app.is_running:
                time.sleep(0.2)
        except KeyboardInterrupt:  # the way to stop it: not an error
            pass
        app.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
