"""The feature mapper: n voken hidden states in, a generator conditioning out: a sequence (length x
width) and, for generators that take one (SDXL, SD3, FLUX), a pooled vector.

Two variants share one class so that `save_pretrained`/`from_pretrained` round-trip either:
- "paper": fc (Linear, GELU, Linear) then an encoder-decoder transformer whose learnable queries
  have the generator's conditioning length; about 123M parameters at SD 2.1's 77 x 1024.
- "compact": fc (one Linear) then one cross-attention of the queries over the vokens.
The pooled vector comes from the same queries' outputs, averaged, through a pooled head.
"""

from __future__ import annotations

import warnings

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class FeatureMapper(ModelMixin, ConfigMixin):
    # Stage 2 may freeze these; everything else keeps training.
    input_modules = ("fc", "queries")

    @register_to_config
    def __init__(self, llm_width: int, cond_len: int, cond_width: int, kind: str = "paper", hidden: int = 0,
                 heads: int = 8, encoder_layers: int = 4, decoder_layers: int = 4, ffn: int = 4096,
                 pooled_width: int = 0):
        super().__init__()
        if kind not in ("paper", "compact"):
            raise ValueError(f"unknown mapper kind {kind!r}")
        width = hidden or cond_width
        if width % heads:
            raise ValueError(f"mapper width {width} is not divisible by {heads} heads")
        if kind == "paper":
            self.fc = nn.Sequential(nn.Linear(llm_width, width), nn.GELU(), nn.Linear(width, width))
            with warnings.catch_warnings():  # nested tensors do not apply with norm_first; nothing to act on
                warnings.simplefilter("ignore", UserWarning)
                self.transformer = nn.Transformer(
                    d_model=width, nhead=heads, num_encoder_layers=encoder_layers,
                    num_decoder_layers=decoder_layers, dim_feedforward=ffn, dropout=0.0, batch_first=True,
                    norm_first=True,
                )
        else:
            width = cond_width
            self.fc = nn.Linear(llm_width, width)
            self.norm = nn.LayerNorm(width)
            self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.queries = nn.Parameter(torch.randn(1, cond_len, width))
        self.out = nn.Linear(width, cond_width) if width != cond_width else nn.Identity()
        self.pooled = nn.Linear(width, pooled_width) if pooled_width else None

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """states (B, n, llm_width) -> (sequence (B, cond_len, cond_width), pooled (B, pooled_width) or None)."""
        x = self.fc(states.to(self.queries.dtype))
        queries = self.queries.expand(x.shape[0], -1, -1)
        if self.config.kind == "paper":
            y = self.transformer(x, queries)
        else:
            x = self.norm(x)
            y = queries + self.attn(queries, x, x, need_weights=False)[0]
        return self.out(y), (self.pooled(y.mean(1)) if self.pooled is not None else None)
