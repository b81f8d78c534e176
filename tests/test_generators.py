"""Generators beyond SD 1/2: SDXL, SD3 and FLUX.1, as tiny random pipelines saved with save_pretrained and
loaded through the production path; the losses of every family against their definitions."""

import json

import numpy as np
import pytest
import torch

from conftest import DEBUG, run_cli
from minigpt5_cli.modeling import losses
from minigpt5_cli.modeling.generators import load_generator

FAST = ["--diffusion-steps", "2", "--max-new-tokens", "12"]
FAMILIES = {"tiny:sd": "SD 1.x / 2.x", "tiny:sdxl": "SDXL", "tiny:sd3": "SD3", "tiny:flux": "FLUX.1"}


@pytest.mark.parametrize("generator", list(FAMILIES))
def test_generator_family_trains_both_stages_and_generates(generator, tmp_path):
    common = [f"model.generator={generator}", "train.max_steps=2"]
    assert run_cli("train", "-r", str(DEBUG / "stage1.yaml"), f"train.output_dir={tmp_path / 's1'}", *common) == 0
    assert run_cli("train", "-r", str(DEBUG / "stage2_lora.yaml"), f"train.output_dir={tmp_path / 's2'}",
                   f"train.init_from={tmp_path / 's1'}", *common) == 0
    meta = json.loads((tmp_path / "s2" / "checkpoint-2" / "minigpt5.json").read_text())
    assert meta["pooled"] == load_generator(generator).pooled_width
    for mode in ("vokens", "two-stage"):
        out = tmp_path / mode
        assert run_cli("generate", "-s", str(DEBUG / "data" / "sequences.jsonl"), "-m", str(tmp_path / "s2"), "-o",
                       str(out), "-b", "2", "--mode", mode, *FAST) == 0
        docs = [json.loads(p.read_text()) for p in sorted(out.glob("*/story.json"))]
        assert len(docs) >= 2 and all(d["generated"][0]["images"] for d in docs)


@pytest.mark.parametrize("generator", list(FAMILIES))
def test_rendering_a_conditioning_is_the_pipeline_on_its_prompt(generator):
    """The text encoders' own embedding of a caption, through our rendering path in place of the mapper's
    output, gives the image the pipeline gives for the caption's text, with the same seed: the pooled
    vectors, time ids and guidance reach the generator as the pipeline passes them."""
    gen = load_generator(generator)
    pipe, family = gen.pipe, gen.family
    common = dict(num_inference_steps=3, height=32, width=32)
    seed = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    if family == "FLUX.1":
        # Guidance against "" is the pipeline's true CFG; the embedded guidance stays at its default.
        n = gen.t5_length
        encode = lambda text: pipe.encode_prompt(text, None, device="cpu", max_sequence_length=n)[:2]  # noqa: E731
        (seq, pooled), (negative, negative_pooled) = encode("a red circle"), encode("")
        ours = gen.render(seq, pooled, negative, negative_pooled, guidance_scale=4.0, generator=[seed()], **common)
        theirs = pipe("a red circle", negative_prompt="", true_cfg_scale=4.0, max_sequence_length=n, generator=seed(),
                      **common).images
        unguided = pipe("a red circle", max_sequence_length=n, generator=seed(), **common).images
        assert not np.array_equal(np.asarray(unguided[0]), np.asarray(theirs[0]))  # the guidance acts
    else:
        common["guidance_scale"] = 4.0
        args = ("a red circle", None, None) if family == "SD3" else ("a red circle",)
        kwargs = {"max_sequence_length": gen.t5_length} if family == "SD3" else {}
        if family == "SD 1.x / 2.x":
            seq, negative = pipe.encode_prompt("a red circle", "cpu", 1, True)
            pooled = negative_pooled = None
        else:
            seq, negative, pooled, negative_pooled = pipe.encode_prompt(*args, device="cpu", num_images_per_prompt=1,
                                                                        do_classifier_free_guidance=True, **kwargs)
        ours = gen.render(seq, pooled, negative, negative_pooled, generator=[seed()], **common)
        theirs = pipe("a red circle", generator=seed(), output_type="pil", **kwargs, **common).images
    np.testing.assert_array_equal(np.asarray(ours[0]), np.asarray(theirs[0]))
    assert gen.describe()["family"] == FAMILIES[generator]


def test_every_registered_family_is_tested_here_and_the_base_is_abstract():
    from minigpt5_cli.modeling.generators import FAMILIES as REGISTERED, Generator

    assert sorted(cls.family for cls in REGISTERED.values()) == sorted(FAMILIES.values())
    with pytest.raises(TypeError, match="abstract"):
        Generator(None, "none")


@pytest.mark.parametrize("generator", list(FAMILIES))
def test_fsdp_blocks_are_the_denoisers_own(generator):
    """The blocks a family names for FSDP to wrap are classes of its denoiser that hold most of its
    weights, and classes none of its other networks use (those run for some batches only)."""
    gen = load_generator(generator)
    blocks = gen.blocks()
    assert blocks and blocks <= {type(m).__name__ for m in gen.denoiser.modules()}
    wrapped = {id(p): p.numel() for m in gen.denoiser.modules() if type(m).__name__ in blocks for p in m.parameters()}
    assert sum(wrapped.values()) > 0.5 * sum(p.numel() for p in gen.denoiser.parameters())
    others = {type(m).__name__ for part in gen.parts().values() if part is not gen.denoiser for m in part.modules()}
    assert not blocks & others, blocks & others


class Oracle(torch.nn.Module):
    """A denoiser that predicts the true target from the noisy latents it is given and the clean ones it
    knows: a loss of zero is what a perfect model earns."""

    def __init__(self, clean, target):
        super().__init__()
        self.clean, self.target, self.anchor = clean, target, torch.nn.Parameter(torch.zeros(()))

    @property
    def dtype(self):
        return torch.float64

    def forward(self, noisy=None, t=None, timestep=None, hidden_states=None, **kwargs):  # a UNet's or an MM-DiT's
        noisy = noisy if noisy is not None else hidden_states
        out = self.target(noisy, self.clean, t if t is not None else timestep)
        return type("Out", (), {"sample": out})()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddpm_loss_is_zero_for_the_true_target(prediction):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(prediction_type=prediction)
    torch.manual_seed(0)
    clean = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    alphas = sched.alphas_cumprod.double()

    def target(noisy, x, t):
        a = alphas[t].view(-1, 1, 1, 1)
        noise = (noisy - a.sqrt() * x) / (1 - a).sqrt()
        return noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x

    loss = losses.diffusion_loss(Oracle(clean, target), sched, torch.zeros(3, 2, 4), clean, snr_gamma=5.0)
    assert loss.item() < 1e-20
    wrong = losses.diffusion_loss(Oracle(clean, lambda n, x, t: torch.zeros_like(n)), sched, torch.zeros(3, 2, 4),
                                  clean, snr_gamma=5.0)
    assert wrong.item() > 0.01


def test_flow_matching_loss_is_zero_for_the_scheduler_velocity():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    torch.manual_seed(0)
    clean = torch.randn(3, 4, 8, 8, dtype=torch.float64)

    def velocity(noisy, x, t):
        sigma = (t / sched.config.num_train_timesteps).double().view(-1, 1, 1, 1)
        noise = (noisy - (1 - sigma) * x) / sigma
        return noise - x

    assert losses.flow_matching_loss(lambda noisy, t: velocity(noisy, clean, t), sched, clean).item() < 1e-20
    # The target is the velocity the scheduler's own Euler step integrates: from the latents at one
    # sigma, a step with it lands exactly on the latents at the next.
    noise = torch.randn_like(clean)
    sched.set_timesteps(10)
    for i in (0, 4, 8):
        sigma, following = sched.sigmas[i].double(), sched.sigmas[i + 1].double()
        sched._step_index = None
        sched._init_step_index(sched.timesteps[i])
        stepped = sched.step(noise - clean, sched.timesteps[i], (1 - sigma) * clean + sigma * noise).prev_sample
        torch.testing.assert_close(stepped.double(), (1 - following) * clean + following * noise)


@pytest.mark.parametrize("embedded", [True, False], ids=["dev", "schnell"])
def test_flux_loss_is_zero_for_the_velocity_of_packed_latents(embedded):
    """FLUX's transformer sees 2x2-packed latents and timesteps over 1000 (its sigma), beside the embedded
    guidance (dev; schnell has none): a transformer that returns the true velocity in that form earns
    zero through our loss."""
    from types import SimpleNamespace

    gen = load_generator("tiny:flux")
    pipe = gen.pipe
    torch.manual_seed(0)
    clean = torch.randn(2, *gen.latent_shape, dtype=torch.float64)
    packed = pipe._pack_latents(clean, *clean.shape)
    seen = {}

    class PackedOracle(torch.nn.Module):
        config = SimpleNamespace(guidance_embeds=embedded)
        dtype = torch.float64

        def forward(self, hidden_states, timestep, guidance, img_ids, **kwargs):
            seen.update(guidance=guidance, ids=img_ids, shape=hidden_states.shape)
            sigma = timestep.view(-1, 1, 1)
            noise = (hidden_states - (1 - sigma) * packed) / sigma
            return (noise - packed,)

    seq, pooled = gen.encode(["a red circle", "a blue square"])
    pipe.transformer = PackedOracle()
    # zero up to the float32 rounding of the scheduler's timesteps (a wrong packing or scale gives about 1)
    assert gen.loss(seq, pooled, clean, snr_gamma=5.0).item() < 1e-12
    side = gen.latent_shape[1] // 2
    assert seen["shape"] == (2, side * side, 4 * gen.latent_shape[0])
    if embedded:
        assert seen["guidance"].tolist() == [gen.EMBEDDED_GUIDANCE] * 2 == [3.5] * 2  # the pipeline's default
    else:
        assert seen["guidance"] is None
    assert seen["ids"].shape == (side * side, 3) and seen["ids"][-1].tolist() == [0, side - 1, side - 1]


def test_parameter_table_counts_the_mapper_for_sdxl_sd3_and_flux():
    from minigpt5_cli.modeling.mapper import FeatureMapper
    from minigpt5_cli.modeling.params import OTHER_CONDS, mapper_count

    with torch.device("meta"):
        sd3 = FeatureMapper(llm_width=4096, cond_len=333, cond_width=4096, pooled_width=2048)
    assert mapper_count("paper", 333, 4096, 2048) == sum(p.numel() for p in sd3.parameters())
    counts = {name: mapper_count("paper", *cond) for name, cond in OTHER_CONDS.items()}
    sdxl, sd3_count, flux = counts.values()
    # the pooled head and the wider sequence, by their shapes: width x pooled + pooled, queries length x width
    assert sd3_count - mapper_count("paper", 333, 4096) == 4096 * 2048 + 2048
    assert flux - sd3_count == (512 - 333) * 4096 + (4096 + 1) * (768 - 2048)
    assert 300e6 < sdxl < 400e6 and 1.0e9 < sd3_count < 1.2e9 and 1.0e9 < flux < 1.2e9
