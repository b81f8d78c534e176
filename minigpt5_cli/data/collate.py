"""The collator: samples to one batch of model inputs, labels and targets.

A prompt is written in one of three forms, `data.prompt_format`: the paper's `###Human: ...
###Assistant:` text, the model's own chat template (`auto`: the template when the model has one), or
the released MiniGPT-5's templates (`official`, tokenised as its slow tokenizer did: `legacy_ids`,
after its BOS), and goes through the model's own processor (image-text LLMs) or tokenizer, identically
with and without images. A family whose processor puts image tokens before the text (BLIP-2) gets them
where each image is, and its pixels from its image processor alone (or, `data.image_preprocessing`, as
the released model prepared them). Every tensor the processor returns goes to the model: per-token
tensors padded to the batch width (and carried on over the target tokens), per-image tensors
concatenated along the image axis, with their masks. Only target tokens carry labels.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from minigpt5_cli.data import prompts
from minigpt5_cli.data.samples import Sample
from minigpt5_cli.errors import UserError
from minigpt5_cli.images import clip_pixels
from minigpt5_cli.modeling.llm_families import Quirks
from minigpt5_cli.modeling.runner import continued
from minigpt5_cli.modeling.vokens import voken_tokens


@dataclass(kw_only=True)
class Collator:
    """Tokenises samples into one right-padded batch; only target tokens carry labels."""

    tokenizer: object
    processor: object | None
    first_voken: int
    n_vokens: int
    max_length: int
    prompt_format: str = "paper"  # paper, chat, auto or official
    image_preprocessing: str = "processor"  # processor, official or official_pad
    story_system: str = ""  # the official format's system prompts (empty: none)
    dialogue_system: str = ""
    quirks: Quirks = field(default_factory=Quirks)
    _layout: dict | None = field(default=None, init=False, repr=False)
    _marker: str | None = field(default=None, init=False, repr=False)  # image_marker, read once

    @classmethod
    def for_model(cls, model, data) -> "Collator":
        """The collator that tokenises samples for a MiniGPT5 model, in training and generation alike, as
        the recipe's `data` section says (max_length, prompt_format, image_preprocessing, the system prompts)."""
        quirks = model.runner.quirks
        if data.image_preprocessing != "processor" and not quirks.images_in_place:
            raise UserError(f"data.image_preprocessing={data.image_preprocessing} is the released MiniGPT-5's, for a "
                            "BLIP-2 LLM; this LLM's processor prepares its own images: use processor")
        if data.prompt_format == "official" and model.processor is not None and not quirks.images_in_place:
            raise UserError("data.prompt_format=official writes images as a BLIP-2 LLM reads them; this LLM's "
                            "processor writes its own: use paper, chat or auto")
        return cls(tokenizer=model.tokenizer, processor=model.processor, first_voken=model.first_voken,
                   n_vokens=model.vokens.n, max_length=data.max_length, prompt_format=data.prompt_format,
                   image_preprocessing=data.image_preprocessing, story_system=data.story_system,
                   dialogue_system=data.dialogue_system, quirks=quirks)

    @property
    def chat(self) -> bool:
        """Whether prompts are written with the model's chat template."""
        if self.prompt_format in ("paper", "official"):
            return False
        template = getattr(self.processor or self.tokenizer, "chat_template", None)
        if self.prompt_format == "chat" and not template:
            raise UserError("data.prompt_format is chat, but the LLM has no chat template; use paper (or auto)")
        return bool(template)

    # -- the prompt's text

    def _render(self, sample: Sample, history: list) -> tuple[str, list]:
        if sample.prompt is not None:
            return sample.prompt, []
        self._plain(text for text, _ in history)
        take = self.processor is not None  # a text-only LLM never sees the images
        images = [img for _, img in history if img is not None and take]
        if images and self._marker is None:
            self._marker = image_marker(self.processor, self.quirks.images_in_place)
        if self.prompt_format == "official":
            steps = [(text, img is not None and take) for text, img in history]
            return prompts.official(steps, self._marker, self.story_system, self.dialogue_system), images
        if self.chat and self.processor is not None:
            parts = []
            for text, img in history:
                parts += ([{"type": "text", "text": text}] if text else []) + \
                    ([{"type": "image"}] if img is not None and take else [])
            text = self.processor.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                                      add_generation_prompt=True)
            return text, images
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": "\n".join(t for t, _ in history)}],
                                                      tokenize=False, add_generation_prompt=True), []
        marker = self._marker if images else ""
        lines = [f"{text} {marker}".strip() if img is not None and take else text for text, img in history]
        return prompts.dialogue(lines), images

    def _encode(self, text: str, images: list) -> dict[str, torch.Tensor]:
        """The model inputs of one prompt, batch dimension 1, as the model's processor gives them."""
        special = {"add_special_tokens": False} if self.chat else {}  # a chat template writes its own BOS
        if self.prompt_format == "official":
            ids = torch.tensor([[self.tokenizer.bos_token_id, *legacy_ids(self.tokenizer, text, self._specials())]])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **self._pixels(images)}
        if self.quirks.images_in_place:
            enc = self.tokenizer(text, return_tensors="pt", **special)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], **self._pixels(images)}
        if self.processor is None:
            enc = self.tokenizer(text, return_tensors="pt", **special)
            return {k: enc[k] for k in self.tokenizer.model_input_names if k in enc}
        if not images and self.quirks.text_only is not None:  # a processor that refuses prompts without images
            enc = self.tokenizer(self.quirks.text_only(text, self.tokenizer), return_tensors="pt",
                                 add_special_tokens=False)
            ids = enc["input_ids"]  # all of it prompt: token type 0, as the processor writes a prompt
            return {"input_ids": ids, "attention_mask": enc["attention_mask"], "token_type_ids": torch.zeros_like(ids)}
        enc = self.processor(text=[text], images=images or None, return_tensors="pt", **special)
        return {k: v for k, v in enc.items() if torch.is_tensor(v) and k != "labels"}  # our labels, not its

    def _plain(self, texts) -> None:
        """Refuse story text holding the image token of a family that puts image features at its positions:
        the text would take an image's place."""
        token = str(getattr(self.processor, "image_token", "") or "") if self.quirks.images_in_place else ""
        for text in texts:
            if token and token in text:
                raise UserError(f"a story step's text holds {token}, the LLM's image token, which would take an "
                                f"image's place: {text[:80]!r}; remove it from the text")

    def _specials(self) -> list[str]:
        """The tokens the released model's tokenizer splits its text at: the image token and the vokens."""
        image = str(getattr(self.processor, "image_token", "") or "")
        return [*([image] if image else []), *voken_tokens(self.n_vokens)]

    def _pixels(self, images: list) -> dict[str, torch.Tensor]:
        """The pixels of a prompt's images (none without), for a family that encodes them apart."""
        if not images:
            return {}
        images_out = self.processor.image_processor
        if self.image_preprocessing == "processor":
            out = images_out(images, return_tensors="pt")
            return {k: v for k, v in out.items() if torch.is_tensor(v)}
        size = images_out.size.get("height") or images_out.size["shortest_edge"]
        pad = self.image_preprocessing == "official_pad"
        return {"pixel_values": torch.stack([clip_pixels(img, size, square=pad) for img in images])}

    def prompt(self, sample: Sample, room: int, keep_end: bool = False) -> dict[str, torch.Tensor]:
        """The model inputs of the prompt, dropping the oldest steps to fit `room` tokens. `keep_end`
        (generation) cuts the history from its start word by word instead of whole steps, so a step
        longer than `room` keeps its last words and the prompt its assistant's cue."""
        history = list(sample.history)
        while True:
            text, images = self._render(sample, history)
            enc = self._encode(text, images)
            if enc["input_ids"].shape[1] <= room or not history:
                break
            if keep_end and sample.prompt is None:
                history, keep_end = self._tail(history, room), False  # fits now, or nothing does
            else:
                history.pop(0)  # the oldest step goes first
        length = enc["input_ids"].shape[1]
        if length > room:
            if room < 1 or not all(per_token(v, length) for v in enc.values()):  # images cannot be cut
                raise UserError(f"a sample does not fit data.max_length={self.max_length}; raise it")
            enc = {k: v[:, :room] for k, v in enc.items()}
        return enc

    def fits(self, sample: Sample, room: int) -> bool:
        """Whether the whole prompt fits `room` tokens: `prompt` drops nothing of it."""
        return self._encode(*self._render(sample, list(sample.history)))["input_ids"].shape[1] <= room

    def _tail(self, history: list, room: int) -> list:
        """The end of `history` that fits `room` tokens: the oldest steps dropped, then the oldest one
        left cut from its start, at a word's start (inside a word only when no whole word fits)."""
        def fits(steps: list) -> bool:
            return self.fits(Sample(history=steps), room)

        def first(cuts: list[int], make) -> int:  # the first cut that fits; the last one does
            lo, hi = 0, len(cuts) - 1
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if fits(make(cuts[mid])) else (mid + 1, hi)
            return cuts[lo]

        history = list(history)
        while history:
            (text, image), rest = history[0], history[1:]
            if not fits([("", image)] + rest):
                history = rest
                continue

            def make(c: int) -> list:
                return [(text[c:], image)] + rest

            starts = [m.start() for m in re.finditer(r"\S+", text)]
            cut = first(starts + [len(text)], make)
            if cut == len(text) and starts:  # no whole word fits: the end of the last one may
                cut = first(list(range(starts[-1], len(text) + 1)), make)
            return make(cut)
        return history

    # -- targets

    def _target_ids(self, sample: Sample) -> list[int]:
        self._plain([sample.target])
        vokens = self.tokenizer.convert_ids_to_tokens(list(range(self.first_voken, self.first_voken + self.n_vokens)))
        if self.prompt_format == "official":  # "{text} [IMG0]..[IMG7] ###", no eos, as the released model learnt
            text = " ".join([*([sample.target] if sample.target else []), *(["".join(vokens)] if sample.vokens else []),
                             prompts.END])
            return legacy_ids(self.tokenizer, text, self._specials())
        text = sample.target
        if sample.vokens:
            text = (text + " " if text else "") + "".join(vokens)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def extend(self, enc: dict[str, torch.Tensor], ids: list[int]) -> dict[str, torch.Tensor]:
        """`enc` with tokens `ids` appended: per-token tensors carried on over them (`continued`)."""
        length = enc["input_ids"].shape[1]
        last = {k: v[:, -1:] for k, v in enc.items() if k != "input_ids" and per_token(v, length)}
        more = continued(last, len(ids), self.quirks.target_token_type)
        more["input_ids"] = torch.tensor([ids], dtype=enc["input_ids"].dtype)
        return {k: torch.cat([v, more[k]], dim=1) if k in more else v for k, v in enc.items()}

    def encode(self, sample: Sample) -> tuple[dict[str, torch.Tensor], list[int]]:
        target = self._target_ids(sample)
        enc = self.prompt(sample, self.max_length - len(target))
        labels = [-100] * enc["input_ids"].shape[1] + [
            -100 if self.first_voken < t < self.first_voken + self.n_vokens else t for t in target
        ]  # [IMG0] is supervised; the rest of the group is forced at inference
        return self.extend(enc, target), labels

    # -- batches

    def layout(self) -> dict[str, str]:
        """Which processor tensors carry a batch axis before their image axis ("batch"), and which list
        images (or their patches) on their first axis ("flat"): read once from the processor's own
        output for a prompt with two images."""
        if self._layout is None:
            self._layout = {}
            if self.processor is not None:
                from PIL import Image

                two = [Image.new("RGB", (40, 30), (128, 64, 32))] * 2
                enc = self._encode(*self._render(Sample(history=[("a", two[0]), ("b", two[1])]),
                                                 [("a", two[0]), ("b", two[1])]))
                length = enc["input_ids"].shape[1]
                self._layout = {k: "batch" if v.shape[0] == 1 else "flat" for k, v in enc.items()
                                if not per_token(v, length)}
        return self._layout

    def merge(self, encodings: list[dict[str, torch.Tensor]], left: bool = False) -> dict[str, torch.Tensor]:
        """One batch from per-sample model inputs: per-token tensors padded (on the right, or on the left
        for decoding), per-image ones concatenated, zeros where a sample has no image."""
        layout = self.layout()
        width = max(e["input_ids"].shape[1] for e in encodings)
        batch = {}
        for key in dict.fromkeys(k for e in encodings for k in e):
            values = [e.get(key) for e in encodings]
            given = [v for v in values if v is not None]
            if key in ("input_ids", "attention_mask") or all(per_token(v, e["input_ids"].shape[1])
                                                               for v, e in zip(values, encodings) if v is not None):
                # Padding is written as the model's own tokens: PaliGemma's bidirectional prefix (type 0)
                # would otherwise take a row's padding into its block.
                fill = self.tokenizer.pad_token_id if key == "input_ids" else \
                    self.quirks.target_token_type if key == "token_type_ids" else 0
                trailing = _largest([v.shape[2:] for v in given])
                rows = [_pad(v if v is not None else torch.full((1, e["input_ids"].shape[1], *trailing), fill,
                                                                dtype=given[0].dtype),
                             (width, *trailing), fill, left) for v, e in zip(values, encodings)]
                batch[key] = torch.cat(rows)
            elif layout.get(key, "flat") == "batch":
                shape = _largest([v.shape[1:] for v in given])
                batch[key] = torch.cat([_pad(v if v is not None else torch.zeros(1, *[0] * len(shape),
                                                                                  dtype=given[0].dtype), shape, 0)
                                        for v in values])
            else:
                shape = _largest([v.shape[1:] for v in given])
                batch[key] = torch.cat([_pad(v, shape, 0) for v in given])
        return batch

    def __call__(self, samples: list[Sample]) -> dict:
        encoded = [self.encode(s) for s in samples]
        batch = self.merge([enc for enc, _ in encoded])
        width = batch["input_ids"].shape[1]
        batch["labels"] = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in encoded])
        targets = [s for s in samples if s.vokens]  # in order: one per voken group
        cached = [s for s in targets if s.latent is not None]
        if cached and len(cached) < len(targets):
            raise UserError("some target images have cached latents and some do not; prepare the data again")
        if cached:
            batch["latent_mean"] = torch.stack([s.latent[0] for s in cached])
            batch["latent_logvar"] = torch.stack([s.latent[1] for s in cached])
        else:
            batch["target_pixels"] = torch.stack([s.image for s in targets]) if targets else torch.zeros(0, 3, 1, 1)
        # The caption loss needs a caption for every target image of the batch.
        captions = [s.caption for s in targets if s.caption is not None]
        if len(captions) < len(targets):
            captions = []
        if captions and all(s.caption_embed is not None for s in targets):
            batch["caption_embeds"] = torch.stack([s.caption_embed for s in targets])
            if all(s.caption_pooled is not None for s in targets):
                batch["caption_pooled"] = torch.stack([s.caption_pooled for s in targets])
        elif captions:
            batch["captions"] = captions  # encoded by the generator's own text encoders
        return batch


def legacy_ids(tokenizer, text: str, specials: list[str]) -> list[int]:
    """The ids of `text` (no BOS) as the slow sentencepiece LLaMA tokenizer of transformers 4.31 (legacy)
    gave them, whatever the loaded tokenizer's own handling of added tokens: the text split at `specials`,
    the whitespace on both sides of each stripped, and every piece between them encoded on its own, so
    each starts as a text's start does (sentencepiece's leading "▁")."""
    parts = re.split("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")", text) \
        if specials else [text]
    ids = []
    for k, part in enumerate(parts):
        if k % 2:
            ids.append(tokenizer.convert_tokens_to_ids(part))
            continue
        part = part.lstrip() if k > 0 else part
        part = part.rstrip() if k < len(parts) - 1 else part
        if part:
            ids += tokenizer(part, add_special_tokens=False)["input_ids"]
    return ids


def image_marker(processor, in_place: bool = False) -> str:
    """How the model writes one image in its text: its chat template's rendering of an image (with the
    family's markers, e.g. Qwen2-VL's <|vision_start|>...<|vision_end|>), else the processor's image
    token; `in_place` (a family whose image tokens we write, BLIP-2's), as many times as the image has
    query tokens. The rendering is what an image adds to a turn, wherever the template puts it: between
    the texts around it, or (LLaVA's templates) before all of the turn's text."""
    repeat = getattr(processor, "num_query_tokens", None) or 1 if in_place else 1
    token = str(getattr(processor, "image_token", None) or "") * repeat
    if not getattr(processor, "chat_template", None):
        return token
    from jinja2 import TemplateError

    def render(content: list) -> str | None:
        try:
            return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
        except (TemplateError, ValueError, TypeError, KeyError):  # a template for other message shapes
            return None

    texts = [{"type": "text", "text": "\x01"}, {"type": "text", "text": "\x02"}]
    with_image = render(texts[:1] + [{"type": "image"}] + texts[1:])
    if with_image is None:
        return token
    start, end = with_image.find("\x01"), with_image.find("\x02")
    if 0 <= start < end and with_image[start + 1:end].strip():
        return with_image[start + 1:end].strip()
    without = render(texts)  # the image went elsewhere: the text it inserted, between the renderings' shared ends
    if without is None:
        return token
    head = len(os.path.commonprefix([with_image, without]))
    tail = len(os.path.commonprefix([with_image[head:][::-1], without[head:][::-1]]))
    return with_image[head:len(with_image) - tail].strip() or token


def per_token(value: torch.Tensor, length: int) -> bool:
    """A tensor of one prompt with a value per token: (1, tokens, ...)."""
    return value.dim() >= 2 and value.shape[0] == 1 and value.shape[1] == length


def _largest(shapes: list) -> tuple:
    return tuple(max(dims) for dims in zip(*shapes)) if shapes else ()


def _pad(value: torch.Tensor, shape: tuple, fill, left: bool = False) -> torch.Tensor:
    """`value` padded with `fill` to `shape` on its axes after the first (the first of them on the left
    when `left`)."""
    pads = []
    for k, (have, want) in enumerate(reversed(list(zip(value.shape[1:], shape)))):
        first = k == len(shape) - 1
        pads += [want - have, 0] if first and left else [0, want - have]
    return F.pad(value, pads, value=fill) if any(pads) else value
