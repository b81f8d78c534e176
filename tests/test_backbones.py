from pathlib import Path

import pytest
import torch

from minigpt5_cli import hub
from minigpt5_cli.builders import tiny
from minigpt5_cli.modeling.backbones import load_llm
from minigpt5_cli.modeling.generators import load_generator
from minigpt5_cli.errors import UserError


@pytest.mark.parametrize("name", ["tiny:llama", "tiny:llava"])
def test_tiny_llm_saved_and_loaded_through_production_path(name, tmp_path):
    folder = tiny.build(name, tmp_path / "llm")
    assert (tmp_path / "llm" / "config.json").is_file() and (tmp_path / "llm" / "model.safetensors").is_file()
    llm = load_llm(folder)
    assert llm.accepts_images == (name == "tiny:llava")
    assert llm.tokenizer.pad_token is not None
    ids = llm.tokenizer("a red circle", return_tensors="pt").input_ids
    out = llm.model(input_ids=ids, output_hidden_states=True)
    # The last hidden state is after the final norm: the LM head reads it directly.
    torch.testing.assert_close(llm.model.get_output_embeddings()(out.hidden_states[-1]), out.logits)


def test_tiny_generator_conditioning_shape_comes_from_the_pipeline(tmp_path):
    gen = load_generator(tiny.build("tiny:sd", tmp_path / "sd"))
    assert gen.cond_shape == (16, 32)  # deliberately not SD's 77 x 1024
    assert gen.resolution == 32
    ids = gen.tokenizer(["a red circle"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert gen.pipe.text_encoder(ids).last_hidden_state.shape == (1, *gen.cond_shape)
    seq, pooled = gen.encode(["a red circle"])  # the pipeline's own prompt path: the same embedding
    torch.testing.assert_close(seq, gen.pipe.text_encoder(ids).last_hidden_state)
    assert pooled is None and gen.pooled_width is None


def test_tiny_resolve_caches_once():
    first = hub.resolve("tiny:sd")
    assert hub.resolve("tiny:sd") == first
    with pytest.raises(UserError, match="unknown tiny backbone"):
        hub.resolve("tiny:gpt")


def test_resolve_builds_named_backbones_and_passes_other_names_through():
    assert hub.resolve("org/model") == "org/model" and hub.resolve("./tiny:sd") == "./tiny:sd"
    assert (Path(hub.resolve("paper:sd-2.1-base", shapes_only=True)) / "model_index.json").is_file()


def test_offline_hub_id_gives_clear_error():
    with pytest.raises(UserError, match="cannot load the LLM 'no-such-org/no-such-model'.*local folder"):
        load_llm("no-such-org/no-such-model")
    with pytest.raises(UserError, match="cannot load the generator"):
        load_generator("no-such-org/no-such-sd")


def test_non_sd_generator_refused(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(UserError, match="is a DDPMPipeline; minigpt5 needs Stable Diffusion 1.x / 2.x, SDXL, SD3"):
        load_generator(str(tmp_path / "ddpm"))


def test_cold_and_warm_tiny_caches_give_a_run_the_same_initial_weights(tmp_path, monkeypatch):
    """Building a tiny backbone must not touch the caller's RNG: the same seed gives the same mapper and
    LoRA weights whether the tiny backbones were just built (cold cache) or loaded (warm)."""
    from minigpt5_cli import recipe as R
    from minigpt5_cli.training.train import model_for

    from conftest import DEBUG

    recipe = R.load(DEBUG / "stage2_lora.yaml")

    def initial_weights():
        torch.manual_seed(7)
        model = model_for(recipe)
        return {f"{group}.{i}": p.detach().clone() for group, ps in model.trainable_groups().items()
                for i, p in enumerate(ps)}

    monkeypatch.setenv("MINIGPT5_CACHE", str(tmp_path / "cache"))
    cold = initial_weights()
    assert (tmp_path / "cache" / "tiny").is_dir()
    warm = initial_weights()
    assert cold.keys() == warm.keys() and any(k.startswith("adapter") for k in cold)
    assert all(torch.equal(cold[k], warm[k]) for k in cold), [k for k in cold if not torch.equal(cold[k], warm[k])]


def test_torchvision_fallback_warning_is_silenced(tmp_path):
    """transformers warns that image processors fall back to PIL without torchvision; minigpt5 runs
    on a CPU torch without it by design, so that line must not reach users (a fresh process: the
    warning is printed once per process)."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, "-m", "minigpt5_cli", "generate", "--story", "Draw a red circle.",
                           "--output", str(tmp_path / "out"), "--diffusion-steps", "2"], cwd=REPO, text=True,
                          capture_output=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torchvision" not in done.stderr
