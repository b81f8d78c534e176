"""`minigpt5 generate`: continue stories with interleaved text and images, in one pass, in batches.

The decoder (`decoder.py`) samples each batch's text, voken groups included; the mapper turns every
kept group into a conditioning and the renderer (`renderer.py`) draws them in one diffusion call.

`mode="two-stage"` is the paper's baseline: the same LLM writes the text with vokens banned, and
the generator's own text encoder renders one image per response from that text.

Randomness is per story and per image (seeded from `--seed` and the story's position in the
input), so a story comes out the same at any batch size, up to float rounding in padded batches.

Batch k holds the input's stories k*B to k*B+B-1, whatever the number of processes (`Shard`), and runs
whole while one of them is still to do: a story's batch-mates, hence its float rounding, are those of a
one-process run, so N processes, N `--shard` runs, or a run stopped and run again, write the same files
as one uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import timedelta
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from minigpt5_cli import display, files, processes
from minigpt5_cli import recipe as recipes
from minigpt5_cli.data.prompts import NEXT
from minigpt5_cli.data.samples import Sample
from minigpt5_cli.errors import UserError
from minigpt5_cli.generation.decoder import Decoder
from minigpt5_cli.generation.output import (INDEX, clashes, finished, folder_name, index_clash, read_record, stamp,
                                            write_index, write_story)
from minigpt5_cli.generation.renderer import Renderer
from minigpt5_cli.generation.settings import Settings, check_precision
from minigpt5_cli.generation.stories import Job, unknown_words
from minigpt5_cli.hub import pick_device
from minigpt5_cli.modeling import checkpoint
from minigpt5_cli.modeling.model import MiniGPT5, build_model, run_precision
from minigpt5_cli.recipe import DataConfig, SampleConfig
from minigpt5_cli.seeds import derive_seed
from minigpt5_cli.story import Story


@dataclasses.dataclass
class Loaded:
    """A model ready to generate, with the sections of its recipe that go with it."""

    net: MiniGPT5
    data: DataConfig  # how its prompts are written
    sample: SampleConfig  # generate's defaults for it
    info: dict  # what each story's record says of the model


def load(model: str, precision: str | None = None, device: str | None = None,
         console: Console | None = None, trust_remote_code: bool = False) -> Loaded:
    """Build the model from a checkpoint (or run) folder written by `train`, or from a recipe's base
    backbones (untrained vokens and mapper: only the two-stage baseline is meaningful then). A folder's
    LLM runs code of its own only with `trust_remote_code` (the user's --trust-remote-code); a recipe
    file is the user's own, and says so itself."""
    from minigpt5_cli.modeling.backbones import remote_code
    from minigpt5_cli.modeling.bundle import located

    check_precision(precision)
    console = console or Console(stderr=True)
    path = Path(model)
    if not path.exists():
        raise UserError(f"model not found: {path} (give a checkpoint folder written by train, or a recipe)")
    folder = None
    if path.is_dir():
        folder = checkpoint.checkpoint_folder(path)
        if not (folder / "recipe.yaml").is_file():
            raise UserError(f"{folder} is not a minigpt5 checkpoint (no recipe.yaml)")
        recipe = recipes.load(folder / "recipe.yaml", [])
        m = recipe.model
        trusted = remote_code(folder, m.trust_remote_code, trust_remote_code, m.llm)
        m = located(folder, recipe).model  # local backbones are named relative to the folder
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(m, trust_remote_code=trusted))
    else:
        recipe = recipes.load(path, [])
        recipes.check_found(recipe, where=path)  # the user's own recipe: paths from the current folder
    device = pick_device(device)
    precision = run_precision(precision or recipe.train.mixed_precision, device, console)
    import torch

    with torch.random.fork_rng(devices=[]):  # a recipe's untrained parts are the same in every run and process
        torch.manual_seed(0)
        net = build_model(recipe.model, recipe.adapter, precision=precision)
    if folder is not None:
        checkpoint.load(net, folder)
    net.to(device).eval()
    info = {"name": model_name(folder or path), "llm": recipe.model.llm, "generator": recipe.model.generator,
            "checkpoint": str(folder) if folder else None, "recipe": None if folder else str(path),
            "precision": precision, "device": device, "trained": folder is not None}
    return Loaded(net, recipe.data, recipe.sample, info)


def check(settings: Settings, output: Path, model: Path) -> None:
    """What `generate` refuses of its settings and output folder (one that cannot be written, or lies
    inside the model's folder), to call before the model loads; `load` checks the precision first thing."""
    settings.check()
    check_output(output, model)


def check_output(output: Path, model: Path) -> None:
    """Refuse an output folder that cannot be written, or one inside the model's own folder (a checkpoint,
    its run, a bundle, the model that ships with the package): generate never writes among a model's files."""
    files.writable_folder(output, "--output")
    path = Path(model)
    folder = checkpoint.checkpoint_folder(path) if path.is_dir() else None
    if folder is None or not (folder / "recipe.yaml").is_file():  # not a model folder: load refuses it
        return
    owners = {*checkpoint.owners(path), *checkpoint.owners(folder)}
    for owner in sorted(owners, key=lambda f: len(f.parts)):  # the run before its checkpoint
        if files.inside(output, owner):
            raise UserError(f"--output {output} is inside the model folder {owner}; write the stories elsewhere")


def model_name(path: Path) -> str:
    """A short name for pages: a run's checkpoint as RUN/checkpoint-N, else the folder or file name."""
    path = Path(path).resolve()
    return f"{path.parent.name}/{path.name}" if path.name.startswith("checkpoint-") else path.name


def history(job: Job, tasks: list[str], keep: int, images: bool = True) -> list[tuple[str, object]]:
    """The prompt's steps, as in training: the last `keep` of the input and the generated responses,
    as (text, decoded image or None); closed by the "next scene" instruction when the model was
    trained with it rather than on bare turns. `images=False` (a text-only LLM) leaves images out."""
    steps = [(s.text, s.image) for s in job.story.steps]
    for response in job.responses:
        text = " ".join(seg["text"] for seg in response if "text" in seg)
        steps.append((text, next((seg["image"] for seg in response if "image" in seg), None)))
    steps = steps[max(0, len(steps) - keep):]
    steps = [(text, (image.open() if hasattr(image, "open") else image) if images else None)
             for text, image in steps]
    if "multimodal" in tasks and "turn" not in tasks:
        steps.append((NEXT, None))
    return steps


def run_batch(settings: Settings, jobs: list[Job], decoder: Decoder, renderer: Renderer,
              progress: Progress | None = None) -> None:
    """Generate `settings.steps` responses for each job, appended to its responses."""
    tokens = progress.add_task("tokens", total=None) if progress else None
    images = progress.add_task("diffusion", total=None) if progress else None
    data, reads_images = decoder.data, decoder.model.processor is not None
    for k in range(settings.steps):
        prompts = [decoder.collator.prompt(Sample(history=history(s, data.tasks, data.history, reads_images)),
                                           data.max_length, keep_end=True)  # a story too long loses its start
                   for s in jobs]
        seeds = [derive_seed(settings.seed, s.index, k) for s in jobs]
        budget = settings.max_new_tokens * len(jobs)
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
        seeds = [derive_seed(settings.seed, jobs[r].index, k, j + 1) for r, j, _ in wanted]
        on_step = (lambda: progress.advance(images)) if progress else None
        if captions is not None:
            pictures = renderer(seeds, captions=captions, on_step=on_step)
        else:
            pictures = renderer(seeds, states=states[[seg["image"] for _, _, seg in wanted]], on_step=on_step)
        for (_, _, seg), picture in zip(wanted, pictures):
            seg["image"] = picture
        for job, segs in zip(jobs, segments):
            job.responses.append(segs)
    if progress:
        progress.remove_task(tokens)
        progress.remove_task(images)


@dataclasses.dataclass(frozen=True)
class Shard:
    """The share of a generate job this process does: of the batches, every `count`-th from the `index`-th.
    `launched`: a process of an accelerate launch, whose processes agree on what is left to do and wait
    for each other; otherwise a run of its own (`--shard K/N`, or the whole job)."""

    index: int = 0
    count: int = 1
    launched: bool = False

    @property
    def main(self) -> bool:
        """Whether this process speaks for the job: it prints, shows progress and writes the index."""
        return self.index == 0 or not self.launched

    def share(self, batches: list[list[Job]]) -> list[list[Job]]:
        """This shard's batches, out of `batches` (the input's, those with no story to do emptied).
        A launch's processes look at the folder at one moment: they deal out what is left, so they stay
        even however much an earlier run did. Separate --shard runs may run hours apart, while the
        folder fills: they deal out the input's batches, which stay the same between them."""
        if self.launched:
            return [b for b in batches if b][self.index::self.count]
        return [b for b in batches[self.index::self.count] if b]


def find_shard(shard: str | None) -> Shard:
    """This process's share: `--shard K/N`, or its place among the processes of an accelerate launch
    (its process group joined), or the whole job. Refuses a malformed --shard, and one under a launch."""
    if processes.launched() > 1:
        with processes.alike():
            if shard is not None:
                raise UserError("--shard runs one shard in a process started by hand; under accelerate launch "
                                "each process takes its own shard already: leave --shard out")
            # A process done with its share waits at the end for the others' last batches, however long.
            joined = processes.join(timeout=timedelta(hours=24))
        return Shard(joined.index, joined.count, launched=True)
    if shard is None:
        return Shard()
    parts = re.fullmatch(r"([0-9]+)/([0-9]+)", shard.strip())
    if not parts:
        raise UserError(f"--shard {shard}: give K/N, shard K of N (e.g. --shard 1/2)")
    k, n = int(parts[1]), int(parts[2])
    if not 1 <= k <= n:
        raise UserError(f"--shard {shard}: K must be from 1 to N")
    return Shard(k - 1, n)


def generate(stories: list[Story], loaded: Loaded, settings: Settings, out: Path, nested: bool,
             overwrite: bool = False, console: Console | None = None, shard: Shard = Shard()) -> list[Path]:
    """Generate every story of `shard` and write its folder; finished stories already under `out` are kept.
    Unset `settings` come from the model's recipe. Returns the folders of the job's finished stories; the
    index lists them once every story is finished."""
    model, info = loaded.net, loaded.info
    console = console or Console(stderr=True, quiet=not shard.main)
    with processes.alike():
        settings = settings.resolve(loaded.sample)  # checked as it is resolved
        check_output(out, Path(info["checkpoint"] or info["recipe"]))
        decoder, renderer = Decoder(model, loaded.data, settings), Renderer(model, settings)  # these check the settings
    if settings.mode == "vokens" and not info["trained"]:
        console.print("[yellow]warning:[/] no checkpoint: the vokens and the mapper are untrained")
    if model.processor is None and any(s.image is not None for st in stories for s in st.steps):
        console.print("[yellow]warning:[/] the LLM is text-only: images in the stories are dropped from its prompts")
    jobs = [Job(story, index) for index, story in enumerate(stories)]
    folders = {st.id: out / folder_name(st.id) if nested else out for st in stories}
    if nested and len(set(folders.values())) < len(folders):
        folders = {job.story.id: out / f"{job.index:05d}-{folder_name(job.story.id)}" for job in jobs}
    plan, error = None, None
    if shard.main:  # under a launch, the main process reads the folder before any process writes in it
        try:
            plan = _plan(jobs, folders, out, nested, overwrite, console)
        except UserError as e:
            error = e
    with processes.alike():
        before = processes.broadcast(plan, error)  # {index: stamp} of the stories to do
    _warn_unknown(model, [jobs[i].story for i in before], console)  # after the refusals: an error stays one line
    size = settings.batch_size
    # A batch with a story to do runs whole: one a stopped run wrote in part gives its missing stories the
    # batch-mates, and the float rounding, of an uninterrupted run; its finished stories are not rewritten.
    grid = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    mine = shard.share([batch if any(job.index in before for job in batch) else [] for batch in grid])
    ours = {job.index for batch in mine for job in batch if job.index in before}
    others = [jobs[i] for i in before if i not in ours] if shard.main else []  # counted as their story.json appear
    new = _new_folders([out] + [folders[jobs[i].story.id] for i in ours])
    out.mkdir(parents=True, exist_ok=True)
    record = {"mode": settings.mode, "settings": dataclasses.asdict(settings),
              "model": {k: info[k] for k in ("name", "llm", "generator", "checkpoint", "recipe", "precision",
                                             "device")}}
    written = 0

    def count() -> int:
        return written + sum(stamp(folders[job.story.id]) != before[job.index] for job in others)

    progress = display.progress(console, disable=not shard.main)
    try:
        with progress:
            task = progress.add_task("stories", total=len(before))
            for batch in mine:
                run_batch(settings, batch, decoder, renderer, progress)
                for job in batch:
                    if job.index in before:
                        write_story(folders[job.story.id], job, {**record, "seed": settings.seed,
                                                                 "index": job.index}, before[job.index])
                        written += 1
                    job.responses = []  # written: a long run holds only its batch's pictures
                progress.update(task, completed=count())
            processes.gather(None)  # every process of a launch done
            if others:
                progress.update(task, completed=count())
    except BaseException:
        _remove_empty(new)
        raise
    done = [folders[job.story.id] for job in jobs if finished(folders[job.story.id], job)]
    if nested and shard.main and len(done) == len(jobs):  # a --shard run that is not the last leaves it
        write_index(out, done)
    return done


def _plan(jobs: list[Job], folders: dict[str, Path], out: Path, nested: bool, overwrite: bool,
          console: Console) -> dict[int, int | None]:
    """The stories to do, as {index: their story.json's stamp}, after refusing an output folder that holds
    files of others or another story where one goes; says how many finished ones are kept."""
    if nested and index_clash(out):
        raise UserError(f"{out / INDEX} was not written by minigpt5; pick another --output")
    todo = [job for job in jobs if overwrite or not finished(folders[job.story.id], job)]
    for job in todo:
        folder = folders[job.story.id]
        found = clashes(folder)
        if found:
            raise UserError(f"{folder} already holds {', '.join(found[:3])}, not written by minigpt5; "
                            "pick another --output")
        if read_record(folder) and not overwrite:
            raise UserError(f"{folder} holds another story ({read_record(folder)['id']!r}); pass --overwrite to "
                            "replace it, or pick another --output")
    if len(todo) < len(jobs):
        kept = display.plural(len(jobs) - len(todo), "story", "stories")
        console.print(f"{kept} already under {out} {'is' if len(jobs) - len(todo) == 1 else 'are'} kept; "
                      "--overwrite redoes them")
    return {job.index: stamp(folders[job.story.id]) for job in todo}


def _warn_unknown(model: MiniGPT5, stories: list[Story], console: Console) -> None:
    """One line naming the stories' words the LLM cannot read: the run goes on, but the user learns why the
    pictures may miss what was asked."""
    unknown = unknown_words(model.tokenizer, [s.text for st in stories for s in st.steps])
    if not unknown:
        return
    named = ", ".join(repr(w) for w in unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
    many = len(unknown) > 1
    console.print(f"[yellow]warning:[/] the model does not know the word{'s' if many else ''} {escape(named)}; "
                  f"{'they are' if many else 'it is'} read as unknown", soft_wrap=True)


def _new_folders(folders: list[Path]) -> list[Path]:
    """The folders among `folders` and their parents that do not exist yet, deepest first."""
    new = {p for f in folders for p in (f, *f.parents) if not p.exists()}
    return sorted(new, key=lambda p: len(p.parts), reverse=True)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this run made that are still empty (a run that failed before writing in them);
    a folder holding anything is kept."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass
