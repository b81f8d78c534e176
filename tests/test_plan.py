"""`train --plan`: the paper's backbones described offline, the plan's arithmetic, and its measured
activations against a real step on this machine."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt5_cli import recipe as R
from minigpt5_cli.errors import UserError
from minigpt5_cli.training import plan as P

from conftest import DEBUG

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
# Published parameter counts: LLaVA-1.5-7B, and SD 2.1 base's UNet, VAE and text encoder.
LLAVA_7B, SD21 = 7_063_427_072, {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}


def test_paper_shapes_have_the_published_parameter_counts():
    from accelerate import init_empty_weights

    from minigpt5_cli.modeling.backbones import load_llm
    from minigpt5_cli.modeling.generators import load_generator

    with init_empty_weights():
        llm = load_llm("paper:llava-1.5-7b", dtype=torch.bfloat16, empty=True)
        generator = load_generator("paper:sd-2.1-base", dtype=torch.bfloat16, empty=True)
    assert sum(p.numel() for p in llm.model.parameters()) == LLAVA_7B
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in generator.parts().items()} == SD21
    assert generator.cond_shape == (77, 1024) and generator.resolution == 512
    assert llm.processor.image_token_id == 32000 and len(llm.tokenizer) == 32002


def test_plan_of_the_paper_recipe_offline_from_the_hub_cache(tmp_path):
    """The command the README gives, with the two models' files (no weights) in the hub cache, as
    `hf download ... --exclude '*.safetensors' ...` leaves them, and the hub out of reach."""
    from minigpt5_cli import hub

    cache = tmp_path / "hub"
    for repo, name in (("llava-hf/llava-1.5-7b-hf", "paper:llava-1.5-7b"),
                       ("stabilityai/stable-diffusion-2-1-base", "paper:sd-2.1-base")):
        root = cache / ("models--" + repo.replace("/", "--"))
        shutil.copytree(hub.resolve(name, shapes_only=True), root / "snapshots" / ("0" * 40))
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text("0" * 40)
    out = subprocess.run([sys.executable, "-m", "minigpt5_cli", "train", "--recipe", "recipes/vist_stage2_lora.yaml",
                          "--plan", "--gpu-memory", "24GiB", "--num-processes", "4"], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
                                         "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # the title wraps at the table's width
    frozen = (LLAVA_7B + sum(SD21.values())) * 2 / GiB  # bf16, on every device under DDP
    assert f"bfloat16 {frozen:.2f}" in text, text
    assert "data.max_length 2560" in text and "1152 of them image tokens" in text, text  # two 576-token images
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.stdout.splitlines()
            if line.count("│") == 4 and ("DDP" in line or "FSDP" in line)}
    assert rows["DDP"] == "does not fit" and rows["FSDP + checkpointing"] == "fits", text


def _small_llm(folder: Path) -> str:
    from minigpt5_cli.builders import tiny

    with torch.random.fork_rng():
        torch.manual_seed(0)
        tiny._build_llm(folder, {"vision": True, "width": 256, "layers": 3, "heads": 4, "kv_heads": 4,
                                 "vision_width": 32})
    return str(folder)


def test_plan_matches_a_real_step_within_15_percent(tmp_path):
    """Activations, temporaries and gradients of a step: the plan's, from fake tensors, against the
    resident memory a real step adds on this machine (measured in a fresh process)."""
    overrides = [f"model.llm={_small_llm(tmp_path / 'llm')}", f"data.train={DEBUG / 'data' / 'pairs.jsonl'}",
                 "data.max_length=256", "train.batch_size=2", "train.mixed_precision=no"]
    recipe = R.load(DEBUG / "stage1.yaml", overrides)
    estimated = P.measure(recipe).activations(2, False)
    code = ("import json, sys; from minigpt5_cli import recipe as R; from minigpt5_cli.training import plan as P; "
            f"print(json.dumps(P.measured_growth(R.load({str(DEBUG / 'stage1.yaml')!r}, {overrides!r}), 2)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=P.child_environment())
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured > 8 * 2**20  # large enough that the resident set's noise is small against it
    assert abs(estimated / measured - 1) < 0.15, (estimated, measured)


def _plan(processes: int) -> P.Plan:
    steps = {(b, ck): P.Step(tokens=100, image_tokens=0, forward_backward=(b * 2 if ck else b * 5) * GiB,
                             optimizer=GiB // 4) for b in (1, 2) for ck in (False, True)}
    return P.Plan(recipe=R.Recipe(), processes=processes, batch_size=2,
                  weights={"bfloat16": 12 * GiB, "trainable": GiB}, gradients=GiB, optimizer_state=2 * GiB,
                  units=[GiB] * 8 + [2 * GiB], steps=steps, names=("a", "b"))


def test_ddp_keeps_everything_on_every_device():
    one, four = _plan(1).layout(False), _plan(4).layout(False)
    assert one == {"frozen": 12 * GiB, "trainable": GiB, "gradients": GiB, "optimizer": 2 * GiB}
    assert four == {**one, "gradients": 2 * GiB}  # and a bucket per gradient


def test_fsdp_shards_and_gathers_the_largest_layers():
    four = _plan(4).layout(True)
    # A quarter of everything, plus gathered copies: the 3 GiB outside the wrapped layers (13 GiB of
    # weights, 10 in layers) and the two largest layers (2 + 1 GiB).
    assert four == {"frozen": 3 * GiB + 3 * GiB + 3 * GiB, "trainable": GiB // 4, "gradients": GiB // 4,
                    "optimizer": GiB // 2}
    assert _plan(1).layout(True) == _plan(1).layout(False)  # one process: nothing to shard


def test_activations_extrapolate_linearly_and_the_largest_batch_fits():
    plan = _plan(1)
    assert plan.activations(3, False) == 15 * GiB and plan.activations(4, True) == 8 * GiB
    assert plan.activations(1, False) == max(5 * GiB, GiB + GiB // 4)
    memory = 40 * GiB
    best = plan.largest(memory, True, False)
    assert plan.total(best, True, False) <= memory < plan.total(best + 1, True, False)
    assert plan.largest(GiB, False, False) == 0


@pytest.mark.parametrize("text,value", [("24GiB", 24 * GiB), ("80GB", 80 * 10**9), ("40", 40 * GiB),
                                        ("1.5 tib", int(1.5 * 2**40)), ("", None)])
def test_memory_sizes(text, value):
    assert P.parse_memory(text) == value


@pytest.mark.parametrize("text", ["lots", "24 GiB of it", "0GiB", "-3GB", "12XB"])
def test_memory_sizes_refused(text):
    with pytest.raises(UserError, match="is not a size"):
        P.parse_memory(text)
