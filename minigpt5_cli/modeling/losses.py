"""The training losses: next-token text loss, and the generator's diffusion loss (noise or velocity
prediction with Min-SNR, or flow matching)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def text_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the labelled positions (-100 elsewhere)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def cached_latents(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """A sample of a cached VAE posterior: the same distribution, and the same draw for the same seed,
    as encoding the image now (`vae.encode(x).latent_dist.sample()`)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1)).sample()


def diffusion_loss(unet, sched, cond: torch.Tensor, latents: torch.Tensor, snr_gamma: float,
                   **extra) -> torch.Tensor:
    """The generator's noise-prediction loss on `latents` under conditioning `cond` (and the UNet's
    `extra` inputs: SDXL's pooled vector and time ids), with its own schedule and prediction type,
    Min-SNR weighted when `snr_gamma` > 0."""
    from diffusers.training_utils import compute_snr

    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)  # layout-independent draw
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = sched.add_noise(latents, noise, t)
    kind = sched.config.prediction_type
    target = noise if kind == "epsilon" else sched.get_velocity(latents, noise, t)
    pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=cond.to(unet.dtype), **_cast(extra, unet.dtype)).sample
    mse = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma > 0:  # Min-SNR: weight = min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v
        snr = compute_snr(sched, t).float()
        mse = mse * snr.clamp(max=snr_gamma) / (snr if kind == "epsilon" else snr + 1)
    return mse.mean()


def flow_matching_loss(predict, sched, latents: torch.Tensor) -> torch.Tensor:
    """Flow matching (SD3, FLUX): at a sigma of the pipeline's own schedule, drawn with a logit-normal
    density over its timesteps, the noisy latents are (1 - sigma) x + sigma noise and the target is the
    velocity noise - x, which the scheduler's Euler step integrates. `predict(noisy, t)` is the
    denoiser's velocity, with t on the scheduler's timestep scale."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
    u = compute_density_for_timestep_sampling("logit_normal", latents.shape[0], logit_mean=0.0, logit_std=1.0)
    index = (u * sched.config.num_train_timesteps).long().clamp(max=sched.config.num_train_timesteps - 1)
    t = sched.timesteps[index].to(latents.device)
    sigma = sched.sigmas[index].to(latents.device, latents.dtype).view(-1, *[1] * (latents.dim() - 1))
    noisy = (1 - sigma) * latents + sigma * noise
    return F.mse_loss(predict(noisy, t).float(), (noise - latents).float())


def _cast(inputs: dict, dtype) -> dict:
    """Floating tensors in `inputs` (nested one level) in `dtype`."""
    def one(v):
        return v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v

    return {k: {kk: one(vv) for kk, vv in v.items()} if isinstance(v, dict) else one(v) for k, v in inputs.items()}
