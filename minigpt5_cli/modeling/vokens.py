"""The generative vokens `[IMG0]..[IMG{n-1}]`: added to the tokenizer, and their embedding rows,
the only trained rows of the frozen LLM's input and output embeddings."""

from __future__ import annotations

import torch
from torch import nn

from minigpt5_cli.errors import UserError


def voken_tokens(n: int) -> list[str]:
    return [f"[IMG{i}]" for i in range(n)]


def add_vokens(llm, n: int) -> int:
    """Add the voken tokens to `llm` (a backbones.LLM); initialise their embedding rows to the mean of
    the existing rows. Returns the first voken's id."""
    tok = llm.tokenizer
    tokens = voken_tokens(n)
    tok.add_tokens(tokens, special_tokens=True)
    ids = tok.convert_tokens_to_ids(tokens)
    first = ids[0]
    if ids != list(range(first, first + n)):
        raise UserError(f"the tokenizer of {llm.name!r} gave non-contiguous voken ids {ids}")
    model = llm.model
    if model.get_input_embeddings().num_embeddings < first + n:  # some vocabularies are padded already
        model.resize_token_embeddings(first + n, mean_resizing=False)
    with torch.no_grad():
        for emb in {model.get_input_embeddings(), model.get_output_embeddings()} - {None}:
            emb.weight[first:first + n] = emb.weight[:first].float().mean(0).to(emb.weight.dtype)
    return first


class VokenRows(nn.Module):
    """The only trainable rows of the LLM's input and output embeddings: those of the n vokens.

    Forward hooks splice these rows into the frozen embedding's output and the frozen LM head's
    logits, so no optimizer state exists for the full matrices. One mechanism serves stage 1, LoRA,
    prefix tuning and generation alike (PEFT's trainable tokens do not combine with prefix tuning).
    """

    def __init__(self, llm: nn.Module, first: int, n: int):
        super().__init__()
        self.first, self.n = first, n
        emb_in, emb_out = llm.get_input_embeddings(), llm.get_output_embeddings()
        self.rows_in = nn.Parameter(emb_in.weight[first:first + n].detach().float().clone())
        self.tied = emb_out is None or emb_out.weight is emb_in.weight
        self.rows_out = None if self.tied else nn.Parameter(emb_out.weight[first:first + n].detach().float().clone())
        self._head_bias = None if self.tied else getattr(emb_out, "bias", None)
        # Kept out of state_dict: hooks hold the modules, the module tree does not.
        self._handles = [emb_in.register_forward_hook(self._embed_hook)]
        if emb_out is not None:
            self._handles.append(emb_out.register_forward_hook(self._head_hook))

    def _embed_hook(self, module, args, output):
        ids = args[0]
        mask = (ids >= self.first) & (ids < self.first + self.n)
        new = self.rows_in.to(output.dtype)[(ids - self.first).clamp(0, self.n - 1)]
        scale = getattr(module, "embed_scale", None)  # Gemma's embeddings multiply their rows inside forward
        if scale is not None:
            new = new * scale.to(output.dtype) if torch.is_tensor(scale) else new * scale
        return torch.where(mask.unsqueeze(-1), new, output)

    def _head_hook(self, module, args, output):
        rows = self.rows_in if self.tied else self.rows_out
        h = args[0]
        v = h @ rows.to(h.dtype).T
        if self._head_bias is not None:
            v = v + self._head_bias[self.first:self.first + self.n].to(v.dtype)
        return torch.cat([output[..., :self.first], v.to(output.dtype), output[..., self.first + self.n:]], dim=-1)
