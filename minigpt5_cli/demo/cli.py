"""`minigpt5 demo`: a thin command over app.py (Gradio is imported only when it runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

DEMO_HELP = """A local web page to write a story with a model: type a step, attach an image if you like,
and see the response's text and pictures; each step goes into the prompt with the ones before it.
Sampling settings are in an accordion. Runs offline; listens on 127.0.0.1 unless --host says
otherwise. Needs Gradio: pip install 'minigpt5\\[demo]'.

\b
Examples:
  minigpt5 demo                                  # the shapes-world model that ships with minigpt5
  minigpt5 demo --model runs/vist_lora --port 8080
"""


def demo(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Checkpoint, run or bundle folder. Default: "
                                         "the shapes-world model that ships with minigpt5.", show_default=False),
    port: int = typer.Option(7860, "--port", "-p", min=1, max=65535, help="The port to listen on."),
    host: str = typer.Option("127.0.0.1", help="The address to listen on; 0.0.0.0 opens the demo to the network."),
    precision: Optional[str] = typer.Option(None, help="no, bf16 or fp16; default: the recipe's."),
    device: Optional[str] = typer.Option(None, help="cuda, cpu, ...; default: cuda when available."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Let the model folder's LLM run "
                                           "code of its own, where its recipe asks to; only for a model you trust."),
) -> None:
    from minigpt5_cli.demo.app import serve
    from minigpt5_cli.modeling.bundle import default_model

    serve(str(model or default_model()), port=port, host=host, device=device, precision=precision,
          trust_remote_code=trust_remote_code)
