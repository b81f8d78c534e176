"""`minigpt5 prepare-data`: CC3M, VIST or MMDialog as people have them on disk, into one dataset.

The output folder is a Hugging Face dataset (`datasets.load_from_disk(DIR)`), one row per pair,
story or conversation:

    id     string
    steps  list of {"text": string, "image": Image or None}
    target {"text", "image"}                 only with --continuation: the step to predict
    and, with --cache-latents, in each step: latent_mean, latent_logvar (the generator's VAE
    posterior at its resolution) and caption_embed (its text encoder's last hidden state)

beside `summary.json` (counts kept and rejected by reason, the input, the settings) and
`rejects.jsonl` (one line per dropped record). Everything is written to a temporary folder and
moved into place at the end, so an interrupted run leaves nothing under DIR.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from minigpt5_cli import readers
from minigpt5_cli.errors import UserError

FORMATS = ("cc3m", "vist", "mmdialog", "toy")
SUMMARY_FILE = "summary.json"
REJECTS_FILE = "rejects.jsonl"


@dataclass
class Settings:
    split: str = "train"
    images: str = ""  # image folder, where the format keeps it apart from the annotations
    image_mapping: str = ""  # VIST derived form: {image_id: relative path}
    clean_captions: bool = True  # CC3M: the original's caption cleaning
    continuation: bool = False  # VIST: steps 1-4 in `steps`, step 5 in `target`
    strict: bool = False  # the first rejected record ends the run
    num_proc: int = 1
    image_size: int = 512  # longer images are downscaled so their short side is this
    cache_latents: bool = False
    generator: str = ""  # with cache_latents: the generator whose VAE and text encoder are cached
    cache_dtype: str = "float32"
    cache_batch_size: int = 8


def read(fmt: str, path: Path, s: Settings):
    """(layout, items) from the format's reader."""
    images = Path(s.images) if s.images else None
    if fmt == "cc3m":
        return readers.read_cc3m(path, images, clean=s.clean_captions)
    if fmt == "vist":
        return readers.read_vist(path, images, split=s.split, mapping=Path(s.image_mapping) if s.image_mapping else None)
    if fmt == "mmdialog":
        return readers.read_mmdialog(path, images)
    raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _encode_image(source, size: int) -> dict:
    """Decode fully (a truncated file fails here), downscale, and re-encode deterministically."""
    from PIL import Image

    data = source.read_bytes() if isinstance(source, Path) else source
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        fmt = img.format
        rgb = img.convert("RGB")
    scale = size / min(rgb.size)
    if scale >= 1 and fmt in ("JPEG", "PNG") and img.mode == "RGB":
        return {"bytes": data, "path": None}  # already small enough: keep the original bytes
    if scale < 1:
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BICUBIC)
    out = io.BytesIO()
    if fmt == "JPEG":
        rgb.save(out, format="JPEG", quality=95)
    else:
        rgb.save(out, format="PNG")
    return {"bytes": out.getvalue(), "path": None}


def process(item, size: int):
    """Worker: a reader item to a dataset row, or a Reject."""
    if isinstance(item, readers.Reject):
        return item
    steps = []
    for k, step in enumerate(item.steps):
        image = None
        if step.image is not None:
            try:
                image = _encode_image(step.image, size)
            except FileNotFoundError:
                return readers.Reject(item.id, "missing_image", f"step {k + 1}")
            except Exception as e:  # PIL raises many kinds for broken files
                return readers.Reject(item.id, "corrupt_image", f"step {k + 1}: {type(e).__name__}")
        steps.append({"text": step.text, "image": image})
    return {"id": item.id, "steps": steps, "extra_media": item.extra_media}


def _process_star(args):
    return process(*args)


def features(continuation: bool, cache: dict | None = None, decode: bool = True, captions: bool = False):
    import datasets

    step = {"text": datasets.Value("string"), "image": datasets.Image(decode=decode)}
    if captions:  # a caption of the step's image, beside its text: a stage-2 caption-loss target
        step["caption"] = datasets.Value("string")
    if cache:
        latent, embed, dtype = tuple(cache["latent_shape"]), tuple(cache["cond_shape"]), cache["dtype"]
        step.update(latent_mean=datasets.Array3D(latent, dtype), latent_logvar=datasets.Array3D(latent, dtype),
                    caption_embed=datasets.Array2D(embed, dtype))
    feats = {"id": datasets.Value("string"), "steps": datasets.List(step)}
    if continuation:
        feats["target"] = {"text": datasets.Value("string"), "image": datasets.Image(decode=decode)}
        if captions:
            feats["target"]["caption"] = datasets.Value("string")
    return datasets.Features(feats)


def prepare(fmt: str, input_path: str | Path, output: str | Path, settings: Settings | None = None,
            overwrite: bool = False, console: Console | None = None) -> dict:
    """Read, check, decode and write; return the summary."""
    import datasets

    s = settings or Settings()
    console = console or Console(stderr=True)
    path, out = Path(input_path), Path(output)
    if s.num_proc < 1 or s.image_size < 8:
        raise UserError("--num-proc must be at least 1 and --image-size at least 8")
    if s.cache_latents and not s.generator:
        raise UserError("--cache-latents needs --generator, the generator whose VAE latents are stored")
    if s.continuation and fmt == "cc3m":
        raise UserError("--continuation applies to VIST stories and MMDialog conversations")
    _check_output(out, overwrite)
    try:
        layout, items = read(fmt, path, s)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None

    counts, kept, extra = Counter(), [0], [0]
    with _staged(out) as tmp:
        with (tmp / REJECTS_FILE).open("w") as rejects, _progress(console) as progress:
            task = progress.add_task(f"{fmt} ({layout})", total=None)

            def rows():
                for result in _results(items, s):
                    progress.advance(task)
                    if isinstance(result, readers.Reject):
                        if s.strict:
                            raise UserError(f"{result.id}: {result.reason.replace('_', ' ')}"
                                            f"{f' ({result.detail})' if result.detail else ''}; --strict stops here")
                        counts[result.reason] += 1
                        rejects.write(json.dumps(asdict(result)) + "\n")
                        continue
                    if s.continuation:
                        result["target"] = result["steps"].pop()
                    kept[0] += 1
                    extra[0] += result.pop("extra_media")
                    yield result

            fingerprint = hashlib.sha256(json.dumps([fmt, str(path.resolve()), asdict(s)]).encode()).hexdigest()[:16]
            try:
                with _quiet_datasets():
                    ds = datasets.Dataset.from_generator(rows, features=features(s.continuation),
                                                         cache_dir=str(tmp / "cache"), fingerprint=fingerprint)
            except datasets.exceptions.DatasetGenerationError as e:
                if isinstance(e.__cause__, (UserError, KeyboardInterrupt)):
                    raise e.__cause__ from None
                if isinstance(e.__cause__, OSError):
                    raise UserError(f"cannot read the input: {e.__cause__}") from None
                raise
            except ValueError:
                if kept[0]:
                    raise
                ds = _empty(features(s.continuation))  # every record was rejected
        cache = None
        if s.cache_latents and len(ds):
            ds, cache = _cache_latents(ds, s, tmp / "cache", console)
        _save(ds, tmp / "data")
        del ds
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        for f in (tmp / "data").iterdir():
            os.replace(f, tmp / f.name)
        (tmp / "data").rmdir()
        summary = {
            "format": fmt, "layout": layout, "input": str(path.resolve()), "kept": kept[0],
            "rejected": dict(sorted(counts.items())), "settings": asdict(s), "cache": cache,
        }
        if fmt == "mmdialog":
            summary["extra_media_dropped"] = extra[0]  # a turn keeps its first image only
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    if not summary["kept"]:
        console.print(f"[yellow]warning:[/] no record was kept; the reasons are in {out / REJECTS_FILE}")
    return summary


# The shapes world's sets: (record kind, split, continuation).
TOY_SETS = {"pairs": ("pairs", "train", False), "stories": ("stories", "train", False),
            "stories_test": ("stories", "test", True), "dialogs": ("dialogs", "train", False)}


def prepare_toy(output: str | Path, seed: int = 0, counts: dict[str, int] | None = None, image_size: int = 0,
                overwrite: bool = False, console: Console | None = None) -> dict:
    """Generate the shapes world (`toy.py`) as four datasets under `output`: pairs, stories, the
    held-out continuation set stories_test (its own random stream) and dialogs."""
    import datasets

    from minigpt5_cli import toy

    counts = {"pairs": 2000, "stories": 1000, "stories_test": 200, "dialogs": 500, **(counts or {})}
    size = image_size or toy.SIZE
    console = console or Console(stderr=True)
    out = Path(output)
    if any(n < 0 for n in counts.values()) or size < 24:
        raise UserError("toy set sizes cannot be negative, and --image-size must be at least 24")
    _check_output(out, overwrite)
    summary = {}
    with _staged(out) as tmp:
        with _progress(console) as progress:
            for name, (kind, split, continuation) in TOY_SETS.items():
                task = progress.add_task(f"toy {name}", total=counts[name])

                def rows(kind=kind, split=split, continuation=continuation, task=task, n=counts[name]):
                    for rec in toy.records(kind, n, seed, size, split):
                        progress.advance(task)
                        row = {"id": rec["id"], "steps": rec["steps"]}
                        if continuation:
                            row["target"] = row["steps"].pop()
                        yield row

                feats = features(continuation, captions=True)
                fingerprint = hashlib.sha256(json.dumps(["toy", name, seed, counts[name], size]).encode()).hexdigest()[:16]
                with _quiet_datasets():
                    ds = datasets.Dataset.from_generator(rows, features=feats, cache_dir=str(tmp / ".cache"),
                                                         fingerprint=fingerprint) if counts[name] else _empty(feats)
                _save(ds, tmp / name)
                summary[name] = {"format": "toy", "layout": kind, "input": None, "kept": len(ds), "rejected": {},
                                 "settings": {"seed": seed, "split": split, "image_size": size,
                                              "continuation": continuation}, "cache": None}
                (tmp / name / SUMMARY_FILE).write_text(json.dumps(summary[name], indent=2))
                (tmp / name / REJECTS_FILE).write_text("")
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
    return summary


def _empty(feats):
    import datasets

    return datasets.Dataset.from_dict({name: [] for name in feats}, features=feats)


def _save(ds, folder: Path) -> None:
    with _quiet_datasets():
        ds.save_to_disk(str(folder), num_shards=None if len(ds) else 1)  # an empty set needs its one shard


def _written_by_us(folder: Path) -> bool:
    """A dataset folder of ours, or a shapes-world folder holding only its sets."""
    if (folder / SUMMARY_FILE).is_file():
        return True
    entries = list(folder.iterdir())
    return bool(entries) and all(e.name in TOY_SETS and (e / SUMMARY_FILE).is_file() for e in entries)


def _check_output(out: Path, overwrite: bool) -> None:
    """--overwrite replaces only what prepare-data wrote: never a folder of other files."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it")
        if not _written_by_us(out):
            raise UserError(f"{out} holds files prepare-data did not write; --overwrite only replaces its own output")


@contextmanager
def _staged(out: Path):
    """A temporary folder beside `out`, moved into its place when the block ends without error."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _results(items, s: Settings):
    """Processed items in input order; decoding runs in `num_proc` processes."""
    if s.num_proc == 1:
        for item in items:
            yield process(item, s.image_size)
        return
    # fork starts workers at once; they only decode images, never touch torch.
    context = get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(s.num_proc) as pool:
        yield from pool.imap(_process_star, ((item, s.image_size) for item in items), chunksize=32)


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


class _quiet_datasets:
    """datasets' own tqdm bars would interleave with ours."""

    def __enter__(self):
        import datasets

        self.was = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()

    def __exit__(self, *exc):
        import datasets

        if self.was:
            datasets.utils.logging.enable_progress_bar()


def _cache_latents(ds, s: Settings, cache_dir: Path, console: Console):
    """Add each step's VAE posterior and caption embedding, computed with the generator's frozen parts."""
    import numpy as np
    import torch

    from minigpt5_cli.backbones import load_generator
    from minigpt5_cli.data import to_pixels

    gen = load_generator(s.generator)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen.vae.to(device).eval()
    gen.text_encoder.to(device).eval()
    res = gen.resolution
    factor = 2 ** (len(gen.vae.config.block_out_channels) - 1)
    latent_shape = (gen.vae.config.latent_channels, res // factor, res // factor)
    cache = {"generator": s.generator, "resolution": res, "latent_shape": list(latent_shape),
             "cond_shape": list(gen.cond_shape), "dtype": s.cache_dtype}
    dtype = np.dtype(s.cache_dtype)

    @torch.no_grad()
    def encode(batch):
        # Images arrive undecoded ({"bytes", "path"}) and go back untouched: no re-encoding.
        steps = batch["steps"]
        flat = [(r, k) for r, row in enumerate(steps) for k, st in enumerate(row) if st["image"] is not None]
        for r, row in enumerate(steps):
            for st in row:
                st.update(latent_mean=None, latent_logvar=None, caption_embed=None)
        if flat:
            pixels = torch.stack([to_pixels(_decode(steps[r][k]["image"]), res) for r, k in flat]).to(device)
            dist = gen.vae.encode(pixels.to(gen.vae.dtype)).latent_dist
            ids = gen.tokenizer([steps[r][k]["text"] for r, k in flat], padding="max_length", truncation=True,
                                max_length=gen.cond_shape[0], return_tensors="pt").input_ids.to(device)
            embeds = gen.text_encoder(ids).last_hidden_state
            for i, (r, k) in enumerate(flat):
                steps[r][k].update(latent_mean=dist.mean[i].float().cpu().numpy().astype(dtype),
                                   latent_logvar=dist.logvar[i].float().cpu().numpy().astype(dtype),
                                   caption_embed=embeds[i].float().cpu().numpy().astype(dtype))
        return batch

    console.print(f"caching latents with {s.generator} ({res}px, latents {latent_shape}) on {device}")
    with _quiet_datasets():
        ds = ds.cast(features(s.continuation, decode=False))
        ds = ds.map(encode, batched=True, batch_size=s.cache_batch_size,
                    features=features(s.continuation, cache, decode=False),
                    cache_file_name=str(cache_dir / "latents.arrow"), desc="latents")
        ds = ds.cast(features(s.continuation, cache))
    return ds, cache


def _decode(image: dict):
    from PIL import Image

    with Image.open(io.BytesIO(image["bytes"])) as img:
        return img.convert("RGB")
