"""`minigpt5 generate`: continue stories with interleaved text and images, in one pass, in batches.

Decoding samples text from the LLM. When a row samples `[IMG0]`, the whole voken group is fed in
one forward step on the KV cache; the states at the training positions (the one that predicted
`[IMG0]`, then `[IMG0]..[IMG{n-2}]`) are kept, and decoding goes on, so a response may hold several
images. After decoding, the mapper turns every kept group into a conditioning and one batched
diffusion call renders them, with classifier-free guidance against the mapper's null output.

`mode="two-stage"` is the paper's baseline: the same LLM writes the text with vokens banned, and
the generator's own text encoder renders one image per response from that text.

Randomness is per story and per image (seeded from `--seed` and the story's position in the
input), so a story comes out the same at any batch size, up to float rounding in padded batches.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from minigpt5_cli import recipe as recipes
from minigpt5_cli.backbones import pick_device
from minigpt5_cli.data import NEXT, Collator
from minigpt5_cli.errors import UserError
from minigpt5_cli.model import MiniGPT5, build_model
from minigpt5_cli.stories import STORY_FILE, Story, clashes, folder_name, write_index, write_story

MODES = ("vokens", "two-stage")


@dataclass
class Settings:
    mode: str = "vokens"
    steps: int = 1  # responses to generate per story, each appended to the story before the next
    # None: the model recipe's `sample` section (the paper's values unless the recipe says otherwise)
    max_new_tokens: int | None = None
    top_p: float | None = None
    temperature: float | None = None  # 0 decodes greedily
    repetition_penalty: float | None = None
    min_images: int = 1  # a response that ends with fewer images gets a voken group at its end
    diffusion_steps: int | None = None
    guidance_scale: float | None = None  # 1 or less turns classifier-free guidance off
    image_size: int = 0  # 0: the generator's own resolution
    seed: int = 0
    batch_size: int = 1

    def resolve(self, sample) -> "Settings":
        """These settings with every unset sampling value taken from a recipe's `sample` section."""
        unset = {f.name: getattr(sample, f.name) for f in dataclasses.fields(sample) if getattr(self, f.name) is None}
        done = dataclasses.replace(self, **unset)
        done.check()
        return done

    def check(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        for name in ("steps", "max_new_tokens", "diffusion_steps", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError("--top-p must be in (0, 1]")
        if self.image_size < 0 or self.image_size % 8:
            raise UserError("--image-size must be a positive multiple of 8 (or 0 for the generator's own)")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0 or \
                self.temperature is not None and self.temperature < 0:
            raise UserError("--repetition-penalty must be above 0, and --temperature at least 0")


def derive_seed(*parts: int) -> int:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + p + 1) % (2**63)
    return seed


def load(model: str, precision: str | None = None, device: str | None = None,
         console: Console | None = None) -> tuple[MiniGPT5, dict]:
    """Build the model from a checkpoint (or run) folder written by `train`, or from a recipe's base
    backbones (untrained vokens and mapper: only the two-stage baseline is meaningful then)."""
    from minigpt5_cli.bundle import beside
    from minigpt5_cli.train import checkpoint_folder

    console = console or Console(stderr=True)
    path = Path(model)
    if not path.exists():
        raise UserError(f"model not found: {path} (give a checkpoint folder written by train, or a recipe)")
    folder = None
    if path.is_dir():
        folder = checkpoint_folder(str(path))
        if not (folder / "recipe.yaml").is_file():
            raise UserError(f"{folder} is not a minigpt5 checkpoint (no recipe.yaml)")
        recipe = recipes.load(folder / "recipe.yaml", [])
        m = recipe.model  # a bundle names its backbones as folders inside it
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(
            m, llm=beside(folder, m.llm), generator=beside(folder, m.generator)))
    else:
        recipe = recipes.load(path, [])
    device = pick_device(device)
    precision = precision or recipe.train.mixed_precision
    if precision == "fp16" and not device.startswith("cuda"):
        console.print("[yellow]warning:[/] fp16 needs a GPU; running in fp32")
        precision = "no"
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, mixed_precision=precision))
    net = build_model(recipe)
    if folder is not None:
        net.load_trainables(folder)
    net.to(device).eval()
    info = {"llm": recipe.model.llm, "generator": recipe.model.generator,
            "checkpoint": str(folder) if folder else None, "recipe": None if folder else str(path),
            "precision": precision, "device": device, "trained": folder is not None}
    return net, info


@dataclass
class _Row:
    ids: list[int]  # prompt and response so far, for the repetition penalty
    generator: torch.Generator
    text: list[int] = dataclasses.field(default_factory=list)  # text tokens since the last image
    segments: list[dict] = dataclasses.field(default_factory=list)  # {"text": str} or {"image": i}
    images: int = 0
    new: int = 0  # tokens fed after the prompt
    done: bool = False
    pending: dict | None = None  # the image segment whose voken group is being fed


class Decoder:
    """Batched sampling with voken groups forced in one cached forward step."""

    def __init__(self, model: MiniGPT5, settings: Settings):
        from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                  TopPLogitsWarper)

        settings = settings.resolve(model.recipe.sample)
        self.model, self.s = model, settings
        self.n, self.first = model.vokens.n, model.first_voken
        self.tok = model.tokenizer
        if settings.mode == "vokens" and settings.min_images * self.n > settings.max_new_tokens:
            raise UserError(f"--max-new-tokens {settings.max_new_tokens} leaves no room for --min-images "
                            f"{settings.min_images} groups of {self.n} vokens")
        self.device = model.vokens.rows_in.device
        warpers = [RepetitionPenaltyLogitsProcessor(settings.repetition_penalty)] \
            if settings.repetition_penalty != 1 else []
        if settings.temperature > 0:
            warpers += [TemperatureLogitsWarper(settings.temperature), TopPLogitsWarper(settings.top_p)]
        self.warpers = LogitsProcessorList(warpers)
        self.prefix = model.recipe.adapter.kind == "prefix"
        self.virtual = model.recipe.adapter.virtual_tokens if self.prefix else 0
        # PEFT's prefix forward always rebuilds the cache, so with a cache of our own we call the base model.
        self.forward_fn = model.llm.get_base_model() if self.prefix else model.llm
        base = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
        # transformers renamed `past_key_values` to `cache` during 5.x.
        self.cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self.calls: list[int] = []  # tokens per forward call, for inspection

    def _forward(self, ids, mask, cache, **extra):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = self.forward_fn(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                              output_hidden_states=True, logits_to_keep=1, **{self.cache_arg: cache}, **extra)
        self.calls.append(ids.shape[1])
        return out.logits[:, -1].float(), out.hidden_states[-1], out[self.cache_arg]

    def _pick(self, row: _Row, logits: torch.Tensor) -> int:
        scores = logits[None].clone()
        vokens = slice(self.first, self.first + self.n)
        room = self.s.max_new_tokens - row.new
        if self.s.mode == "two-stage" or room < self.n:
            scores[:, vokens] = float("-inf")
        else:
            scores[:, self.first + 1:self.first + self.n] = float("-inf")  # only [IMG0] opens a group
        scores = self.warpers(torch.tensor([row.ids], device=scores.device), scores)
        if self.s.temperature <= 0:
            return int(scores.argmax(-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _close_text(self, row: _Row) -> None:
        text = self.tok.decode(row.text, skip_special_tokens=True).split("###")[0].strip()
        if text:
            row.segments.append({"text": text})
        row.text = []

    def _stops(self, row: _Row, token: int) -> bool:
        if token == self.tok.eos_token_id:
            return True
        return "###" in self.tok.decode(row.text[-8:] + [token], skip_special_tokens=True)

    @torch.inference_mode()
    def __call__(self, prompts: list[tuple[list[int], torch.Tensor | None]], seeds: list[int],
                 on_tokens=None) -> tuple[list[list[dict]], torch.Tensor]:
        """Decode one response per prompt. Returns each row's segments, whose image entries index
        into the returned voken states (images, n, llm_width)."""
        pad = self.tok.pad_token_id
        width = max(len(ids) for ids, _ in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in prompts], device=self.device)
        rows = [_Row(ids=list(p), generator=torch.Generator(self.device).manual_seed(seed))
                for (p, _), seed in zip(prompts, seeds)]
        extra = {}
        pixels = [pv for _, pv in prompts if pv is not None]
        if pixels:
            extra["pixel_values"] = torch.cat(pixels).to(self.device, self.model.llm.dtype)
        cache = None
        if self.prefix:
            mask = torch.cat([mask.new_ones(len(rows), self.virtual), mask], dim=1)
            cache = self.model.llm.get_prompt(len(rows))
        self.calls = []
        logits, hidden, cache = self._forward(ids, mask, cache, **extra)
        last = hidden[:, -1]
        states: list[torch.Tensor] = []
        vokens = list(range(self.first, self.first + self.n))
        while True:
            chunks: list[list[int]] = []
            for r, row in enumerate(rows):
                if row.done:
                    chunks.append([])
                    continue
                owed = self.n * max(0, self.s.min_images - row.images) if self.s.mode == "vokens" else 0
                room = self.s.max_new_tokens - row.new
                token = self.first if owed and room <= owed else self._pick(row, logits[r])  # the last room is owed
                if self._stops(row, token):
                    if owed:
                        token = self.first  # the response may not end without its images
                    else:
                        row.done = True
                        self._close_text(row)
                        chunks.append([])
                        continue
                if token == self.first:
                    self._close_text(row)
                    row.pending = {"image": None}  # filled once the group's states exist
                    row.segments.append(row.pending)
                    row.images += 1
                    chunks.append(vokens)
                else:
                    row.text.append(token)
                    chunks.append([token])
                row.ids += chunks[-1]
                row.new += len(chunks[-1])
                if row.new >= self.s.max_new_tokens:
                    row.done = True
                    if token != self.first:
                        self._close_text(row)
            if all(row.done and row.pending is None for row in rows):
                break  # nothing left to sample, and no voken group whose states are needed
            if on_tokens:
                on_tokens(sum(map(len, chunks)))
            w = max(map(len, chunks))
            # Shorter chunks are left-padded with masked holes, so every row's newest token is last.
            step = torch.tensor([[pad] * (w - len(c)) + c for c in chunks], device=self.device)
            step_mask = torch.tensor([[0] * (w - len(c)) + [1] * len(c) for c in chunks], device=self.device)
            mask = torch.cat([mask, step_mask], dim=1)
            logits, hidden, cache = self._forward(step, mask, cache)
            for r, row in enumerate(rows):
                if row.pending is not None:  # a voken group fills its chunk: positions 0..n-1
                    states.append(torch.cat([last[r:r + 1], hidden[r, :self.n - 1]]))
                    row.pending["image"], row.pending = len(states) - 1, None
            last = torch.where(step_mask[:, -1:].bool(), hidden[:, -1], last)
        for row in rows:
            if row.text:
                self._close_text(row)
        out = torch.stack(states) if states else hidden.new_zeros(0, self.n, hidden.shape[-1])
        return [row.segments for row in rows], out


class Renderer:
    """One batched diffusion call for many images, each with its own seeded noise."""

    def __init__(self, model: MiniGPT5, settings: Settings):
        self.model, self.s = model, settings.resolve(model.recipe.sample)
        self.pipe = model.gen_info.pipeline()
        self.size = settings.image_size or model.gen_info.resolution
        self.device = model.vokens.rows_in.device

    @torch.inference_mode()
    def __call__(self, seeds: list[int], states: torch.Tensor | None = None, captions: list[str] | None = None,
                 on_step=None) -> list:
        if not seeds:
            return []
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        kwargs = {}
        if captions is not None:
            kwargs["prompt"] = captions
        else:
            mapper = self.model.mapper
            kwargs["prompt_embeds"] = mapper(states.float())
            # The negative condition is the mapper's output for the null (all-zero) voken states.
            kwargs["negative_prompt_embeds"] = mapper(torch.zeros_like(states[:1].float())).expand(len(seeds), -1, -1)

        def callback(pipe, i, t, tensors):
            if on_step:
                on_step()
            return tensors

        return self.pipe(num_inference_steps=self.s.diffusion_steps, guidance_scale=self.s.guidance_scale,
                         height=self.size, width=self.size, generator=generators, output_type="pil",
                         callback_on_step_end=callback, **kwargs).images


def history(story: Story, tasks: list[str], keep: int) -> list[tuple[str, object]]:
    """The prompt's steps, as in training: the last `keep` of the input and the generated responses,
    as (text, image); closed by the "next scene" instruction when the model was trained with it
    rather than on bare turns."""
    steps = [(s["text"], s["image"]) for s in story.steps]
    for g in story.generated:
        text = " ".join(seg["text"] for seg in g["segments"] if "text" in seg)
        steps.append((text, next((seg["image"] for seg in g["segments"] if "image" in seg), None)))
    steps = steps[max(0, len(steps) - keep):]
    if "multimodal" in tasks and "turn" not in tasks:
        steps.append((NEXT, None))
    return steps


def run_batch(model: MiniGPT5, settings: Settings, stories: list[Story], decoder: Decoder, renderer: Renderer,
              collator: Collator, progress: Progress | None = None) -> None:
    """Generate `settings.steps` responses for each story in place."""
    tokens = progress.add_task("tokens", total=None) if progress else None
    images = progress.add_task("diffusion", total=None) if progress else None
    for k in range(settings.steps):
        data = model.recipe.data
        prompts = [collator.prompt({"prompt": None, "history": history(s, data.tasks, data.history)}, data.max_length)
                   for s in stories]
        seeds = [derive_seed(settings.seed, s.index, k) for s in stories]
        budget = settings.max_new_tokens * len(stories)
        if progress:
            progress.reset(tokens, total=budget, description=f"tokens (step {k + 1})")
        segments, states = decoder(prompts, seeds, on_tokens=(lambda n: progress.advance(tokens, n)) if progress else None)
        if progress:
            progress.update(tokens, completed=budget)  # rows that stopped early leave their budget unused
        captions = None
        if settings.mode == "two-stage":  # one image per response, from its own text
            captions = [" ".join(s["text"] for s in segs if "text" in s) for segs in segments]
            for segs in segments:
                segs.append({"image": None})
        wanted = [(r, j, seg) for r, segs in enumerate(segments) for j, seg in enumerate(segs) if "image" in seg]
        if progress:
            progress.reset(images, total=settings.diffusion_steps, description=f"diffusion ({len(wanted)} images)")
        seeds = [derive_seed(settings.seed, stories[r].index, k, j + 1) for r, j, _ in wanted]
        on_step = (lambda: progress.advance(images)) if progress else None
        if captions is not None:
            pictures = renderer(seeds, captions=captions, on_step=on_step)
        else:
            pictures = renderer(seeds, states=states[[seg["image"] for _, _, seg in wanted]], on_step=on_step)
        for (_, _, seg), picture in zip(wanted, pictures):
            seg["image"] = picture
        for story, segs in zip(stories, segments):
            story.generated.append({"segments": segs})
    if progress:
        progress.remove_task(tokens)
        progress.remove_task(images)


def generate(stories: list[Story], model: MiniGPT5, info: dict, settings: Settings, out: Path, nested: bool,
             overwrite: bool = False, console: Console | None = None) -> list[Path]:
    """Generate every story and write its folder; finished stories already under `out` are kept."""
    settings = settings.resolve(model.recipe.sample)
    console = console or Console(stderr=True)
    if settings.mode == "vokens" and not info["trained"]:
        console.print("[yellow]warning:[/] no checkpoint: the vokens and the mapper are untrained")
    if model.processor is None and any(s["has_image"] for st in stories for s in st.steps):
        console.print("[yellow]warning:[/] the LLM is text-only: images in the stories are dropped from its prompts")
    folders = {st.id: out / folder_name(st.id) if nested else out for st in stories}
    if nested and len(set(folders.values())) < len(folders):
        folders = {st.id: out / f"{st.index:05d}-{folder_name(st.id)}" for st in stories}
    todo = [st for st in stories if overwrite or not (folders[st.id] / STORY_FILE).is_file()]
    for st in todo:
        found = clashes(folders[st.id])
        if found:
            raise UserError(f"{folders[st.id]} already holds {', '.join(found[:3])}, not written by minigpt5; "
                            "pick another --output")
    if len(todo) < len(stories):
        console.print(f"{len(stories) - len(todo)} stories already under {out} are kept; --overwrite redoes them")
    out.mkdir(parents=True, exist_ok=True)
    decoder, renderer = Decoder(model, settings), Renderer(model, settings)
    collator = Collator(model.tokenizer, model.processor, model.gen_info.tokenizer, model.first_voken,
                        model.vokens.n, model.recipe.data.max_length)
    record = {"mode": settings.mode, "settings": dataclasses.asdict(settings),
              "model": {k: info[k] for k in ("llm", "generator", "checkpoint", "recipe", "precision", "device")}}
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console)
    with progress:
        task = progress.add_task("stories", total=len(todo))
        for i in range(0, len(todo), settings.batch_size):
            batch = todo[i:i + settings.batch_size]
            for story in batch:
                story.open()
            run_batch(model, settings, batch, decoder, renderer, collator, progress)
            for story in batch:
                write_story(folders[story.id], story, {**record, "seed": settings.seed, "index": story.index})
                story.close()
            progress.advance(task, len(batch))
    done = [folders[st.id] for st in stories if (folders[st.id] / STORY_FILE).is_file()]
    if nested:
        write_index(out, done)
    return done
