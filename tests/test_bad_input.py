"""Bad input, for every command: one line on stderr, exit code 2, no traceback, and the files that were
there before (the user's, and earlier outputs) byte-identical afterwards, with no temporary left.

Each row of CASES builds its input under a fresh folder and returns the command line; the harness runs
it through the real entry point (`minigpt5_cli.cli.main`).
"""

import errno
import hashlib
import json
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from conftest import DEBUG, run_cli

IMAGES = DEBUG / "data" / "images"
TOY = DEBUG.parent / "toy"
PAIRS = DEBUG / "data" / "pairs.jsonl"
SEQS = DEBUG / "data" / "sequences.jsonl"
FAST = ["--diffusion-steps", "2", "--max-new-tokens", "12"]
BINARY = bytes(range(256)) * 4  # not UTF-8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A stage-1 run, a stage-2 LoRA run, a bundle and a generate output folder, made once."""
    root = tmp_path_factory.mktemp("runs")
    assert run_cli("train", "-r", str(DEBUG / "stage1.yaml"), f"train.output_dir={root / 's1'}") == 0
    assert run_cli("train", "-r", str(DEBUG / "stage2_lora.yaml"), f"train.output_dir={root / 's2'}",
                   f"train.init_from={root / 's1'}") == 0
    assert run_cli("bundle", str(root / "s2"), str(root / "bundle")) == 0
    assert run_cli("generate", "-s", str(DEBUG / "data" / "story.json"), "-m", str(root / "s2"), "-o",
                   str(root / "out"), *FAST) == 0
    return root


@dataclass
class Ctx:
    tmp: Path
    runs: Path
    monkeypatch: pytest.MonkeyPatch

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def copy(self, name: str, as_name: str | None = None) -> Path:
        """A copy of one of the module's runs (cases may damage or grow it)."""
        target = self.tmp / (as_name or name)
        shutil.copytree(self.runs / name, target)
        return target

    def read_only(self, name: str) -> Path:
        """A folder nothing can be written to. Root ignores permission bits, so there the check that
        refuses it (os.access) is told the truth the bits would tell anyone else."""
        folder = self.tmp / name
        folder.mkdir()
        folder.chmod(0o555)
        if os.geteuid() == 0:
            real = os.access
            self.monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == folder.absolute() and
                                     mode & os.W_OK else real(p, mode, **kw))
        return folder

    def disk_full(self, target: str, attribute: str) -> None:
        """`target.attribute` (a function that writes) fails as a full disk does."""
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp / "somewhere"))

        self.monkeypatch.setattr(f"{target}.{attribute}", full)


def big_png(width: int, height: int) -> bytes:
    """A PNG whose header says width x height, with almost no data behind it: a few bytes on disk that
    would decode to gigabytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def thin_png() -> bytes:
    import io

    out = io.BytesIO()
    Image.new("RGB", (1, 100_000), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()  # about 500 bytes


def story_with_image(c: Ctx, data: bytes) -> Path:
    c.file("s/a.png", data)
    return c.file("s/story.json", json.dumps({"id": "s", "steps": [{"text": "a shape.", "image": "a.png"}]}))


def train_args(c: Ctx, *extra: str, recipe: str = "stage1.yaml") -> list[str]:
    return ["train", "-r", str(DEBUG / recipe), f"train.output_dir={c.tmp / 'run'}", *extra]


def generate_args(c: Ctx, story, *extra: str, model: Path | None = None) -> list[str]:
    return ["generate", "-s", str(story), "-m", str(model or c.runs / "s2"), "-o", str(c.tmp / "out"), *FAST, *extra]


def flux_recipe(c: Ctx) -> Path:
    """The debug stage-2 recipe with tiny FLUX as its generator, whose image sides are multiples of 16."""
    text = (DEBUG / "stage2_lora.yaml").read_text().replace("generator: tiny:sd\n", "generator: tiny:flux\n")
    return c.file("flux.yaml", text)


def evaluate_args(c: Ctx, predictions, references, *extra: str, metrics: str = "rouge_l") -> list[str]:
    return ["evaluate", "-p", str(predictions), "-r", str(references), "-m", metrics, "-o", str(c.tmp / "m.json"),
            *extra]


def nan_loss(c: Ctx) -> list[str]:
    """Training whose loss turns to NaN at step 3: it stops there, checkpoint-2 stays the last."""
    from minigpt5_cli.modeling.model import MiniGPT5

    forward, calls = MiniGPT5.forward, []

    def diverging(self, batch):
        out = forward(self, batch)
        calls.append(1)
        return {**out, "loss": out["loss"] * float("nan")} if len(calls) >= 3 else out

    c.monkeypatch.setattr(MiniGPT5, "forward", diverging)
    return train_args(c, "train.max_steps=4", "train.save_every=2")


def resume_with_damaged(c: Ctx, name: str) -> list[str]:
    run = c.copy("s1", "run")
    (run / "checkpoint-4" / name).write_bytes((run / "checkpoint-4" / name).read_bytes()[:100])
    return train_args(c) + ["--resume"]


def generate_with_damaged_vokens(c: Ctx) -> list[str]:
    run = c.copy("s2", "model")
    (run / "checkpoint-4" / "vokens.safetensors").write_bytes(b"\0" * 10)
    return generate_args(c, "a circle.", model=run)


def prepare_raced(c: Ctx) -> list[str]:
    """Another run finishes the same new output folder while this one writes it."""
    import datasets

    save, out = datasets.Dataset.save_to_disk, c.tmp / "data"

    def save_then_race(self, *args, **kwargs):
        save(self, *args, **kwargs)
        (out / "theirs").mkdir(parents=True, exist_ok=True)
        (out / "theirs" / "summary.json").write_text("{}")

    c.monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_then_race)
    return ["prepare-data", "cc3m", "--input", str(cc3m_tsv(c)), "--output", str(out)]


def generate_raced(c: Ctx) -> list[str]:
    """Another run writes the story while this one renders it."""
    from minigpt5_cli.generation import output

    write = output._write_files

    def racing(tmp, job, record):
        doc = write(tmp, job, record)
        shutil.copy(c.runs / "out" / "story.json", c.tmp / "out" / "story.json")
        return doc

    c.monkeypatch.setattr(output, "_write_files", racing)
    return generate_args(c, DEBUG / "data" / "story.json")


def cc3m_tsv(c: Ctx) -> Path:
    shutil.copy(IMAGES / "red_circle.png", c.tmp / "red.png")
    return c.file("cc3m.tsv", "caption\timage_path\na red circle\tred.png\n")


def over_existing(c: Ctx, name: str) -> Path:
    """An earlier output of the command, copied in: a failing rerun must leave it whole."""
    return c.copy(name)


def stories_jsonl_with_surrogate(c: Ctx) -> Path:
    return c.file("s.jsonl", '{"id": "a\\ud800", "steps": [{"text": "x"}]}\n')


def bundle_over_user_folder(c: Ctx) -> list[str]:
    c.file("mine/notes.txt", "mine")
    return ["bundle", str(c.runs / "s2"), str(c.tmp / "mine"), "--overwrite"]


def bundle_disk_full(c: Ctx) -> list[str]:
    over_existing(c, "bundle")
    c.disk_full("shutil", "copy2")
    return ["bundle", str(c.runs / "s2"), str(c.tmp / "bundle"), "--overwrite"]


def train_on(c: Ctx, line: str, image: bytes | None = None) -> list[str]:
    if image is None:
        shutil.copy(IMAGES / "red_circle.png", c.tmp / "a.png")
    else:
        c.file("a.png", image)
    return train_args(c, f"data.train={c.file('d.jsonl', line)}")


def resume_to_save(c: Ctx) -> list[str]:
    """--resume from checkpoint-2 of a copy of the stage-1 run: it trains on and saves checkpoint-4."""
    shutil.rmtree(c.copy("s1", "run") / "checkpoint-4")
    return train_args(c) + ["--resume"]


def train_disk_full(c: Ctx) -> list[str]:
    c.disk_full("minigpt5_cli.modeling.checkpoint", "save")
    return resume_to_save(c)


def train_disk_full_in_safetensors(c: Ctx) -> list[str]:
    """A full disk as safetensors reports it: its own error, the system's in its message."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    c.monkeypatch.setattr("safetensors.torch.save_file", full)
    return resume_to_save(c)


def deepspeed(c: Ctx) -> list[str]:
    """accelerate set up for DeepSpeed (as its launcher does from a DeepSpeed config)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    c.monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    return train_args(c)


def generate_over_malformed(c: Ctx) -> list[str]:
    c.file("out/story.json", "{not json")
    return generate_args(c, "a circle.", "--overwrite")


def generate_over_another(c: Ctx) -> list[str]:
    over_existing(c, "out")
    return generate_args(c, "a square.")


def generate_disk_full(c: Ctx) -> list[str]:
    over_existing(c, "out")
    c.disk_full("PIL.Image.Image", "save")
    return generate_args(c, DEBUG / "data" / "story.json", "--overwrite")


def generate_elsewhere(c: Ctx, output: Path) -> list[str]:
    return ["generate", "-s", "a circle.", "-m", str(c.runs / "s2"), "-o", str(output), *FAST]


def evaluate_huge(c: Ctx) -> list[str]:
    c.file("big.png", big_png(13000, 13000))
    predictions = c.file("p.jsonl", '{"id": "a", "images": ["big.png"]}\n')
    references = c.file("r.jsonl", '{"id": "a", "text": "x", "images": ["big.png"]}\n')
    return evaluate_args(c, predictions, references, metrics="toy_colour")


def evaluate_is_without_images(c: Ctx, *compat: str) -> list[str]:
    """IS over predictions with no generated image (the network, never reached, stands in)."""
    c.monkeypatch.setattr("minigpt5_cli.evaluation.loaders.load_inception", lambda *a, **k: object())
    lines = c.file("p.jsonl", '{"id": "a_1", "text": "x"}\n{"id": "a_2", "text": "y"}\n')
    return evaluate_args(c, lines, lines, *compat, metrics="is")


def evaluate_disk_full(c: Ctx) -> list[str]:
    """The CSV fails after metrics.json was written: neither old file is replaced."""
    c.file("m.json", "{}")
    c.file("m.samples.csv", "id\n")
    c.disk_full("minigpt5_cli.evaluation.evaluate.csv", "writer")
    lines = c.file("p.jsonl", '{"id": "a", "text": "a red circle"}\n')
    return evaluate_args(c, lines, lines)


def prepare_disk_full(c: Ctx) -> list[str]:
    c.file("data/summary.json", "{}")
    c.disk_full("datasets.Dataset", "save_to_disk")
    return ["prepare-data", "cc3m", "--input", str(cc3m_tsv(c)), "--output", str(c.tmp / "data"), "--overwrite"]


def clip_as_llm(c: Ctx) -> list[str]:
    """A model folder of a kind that is neither a causal LM nor an image-text-to-text model."""
    from transformers import CLIPTextConfig, CLIPTextModel

    CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 vocab_size=100)).save_pretrained(c.tmp / "clip")
    return train_args(c, f"model.llm={c.tmp / 'clip'}")


def processor_missing_a_package(c: Ctx) -> list[str]:
    """A processor that needs a package this machine lacks (as Qwen2-VL's video processor needs torchvision)."""
    import transformers

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")

    c.monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", missing)
    return train_args(c)


def inpainting_generator(c: Ctx, as_text_to_image: bool = False) -> list[str]:
    """An inpainting pipeline, or its 9-channel UNet saved as a text-to-image pipeline."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel

    from minigpt5_cli import hub

    sd = StableDiffusionPipeline.from_pretrained(hub.resolve("tiny:sd"))
    unet = UNet2DConditionModel.from_config({**sd.unet.config, "in_channels": 9})  # latents, mask, masked image
    cls = StableDiffusionPipeline if as_text_to_image else StableDiffusionInpaintPipeline
    cls(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet, scheduler=sd.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(c.tmp / "inpaint")
    return train_args(c, f"model.generator={c.tmp / 'inpaint'}")


def scratch_generator_on_sdxl(c: Ctx) -> list[str]:
    from minigpt5_cli.data.prepare import prepare_toy

    prepare_toy(c.tmp / "toy", counts={"pairs": 4, "stories": 0, "stories_test": 0, "dialogs": 0})
    return ["train", "-r", str(DEBUG.parent / "toy" / "generator.yaml"), "model.generator=tiny:sdxl",
            f"data.train={c.tmp / 'toy' / 'pairs'}", f"train.output_dir={c.tmp / 'gen'}"]


def pixart_generator(c: Ctx) -> list[str]:
    """A text-to-image pipeline of a family minigpt5 does not condition (PixArt-alpha)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from minigpt5_cli.builders.tiny import _t5_tokenizer, _vae

    tok = _t5_tokenizer(16)
    text = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4))
    transformer = PixArtTransformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=4, caption_channels=32, in_channels=4, out_channels=8,
                                           cross_attention_dim=32)
    PixArtAlphaPipeline(tokenizer=tok, text_encoder=text, vae=_vae((8, 16, 16), 4), transformer=transformer,
                        scheduler=DPMSolverMultistepScheduler()).save_pretrained(c.tmp / "pixart")
    return train_args(c, f"model.generator={c.tmp / 'pixart'}")


def with_model(folder: Path, **keys) -> Path:
    """`folder` with its recipe.yaml's model keys replaced, as someone else's model folder might say."""
    import yaml

    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    recipe["model"].update(keys)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder


def image_outside_story(c: Ctx) -> list[str]:
    shutil.copy(IMAGES / "red_circle.png", c.tmp / "a.png")
    story = {"id": "s", "steps": [{"text": "a", "image": "../a.png"}]}
    return generate_args(c, c.file("s/story.json", json.dumps(story)))


def generate_shard_launched(c: Ctx) -> list[str]:
    """--shard in a process of a 2-process accelerate launch (its main one: the one that says why)."""
    c.monkeypatch.setenv("WORLD_SIZE", "2")
    return generate_args(c, "x", "--shard", "1/2")


def output_in_model(c: Ctx) -> list[str]:
    model = c.copy("s2", "model")
    return ["generate", "-s", "a circle.", "-m", str(model), "-o", str(model / "checkpoint-4" / "out"), *FAST]


def bundle_remote_code(c: Ctx) -> list[str]:
    run = c.copy("s2")
    with_model(run / "checkpoint-4", trust_remote_code=True)
    return ["bundle", str(run), str(c.tmp / "b")]


def bundle_leading_out(c: Ctx) -> list[str]:
    (c.tmp / "elsewhere").mkdir()
    return generate_args(c, "a circle.", model=with_model(c.copy("bundle", "m/bundle"), llm="../../elsewhere"))


DEEP = "[" * 100_000  # nested deeper than Python's stack
LAUGHS = "a: &a [x, x, x]\nb: [*a, *a, *a]\n"  # aliases: a few more levels of these expand to gigabytes


def not_utf8(c: Ctx, name: bytes) -> str:
    """A path under the case's folder whose name is not UTF-8, as Python spells such a name."""
    return os.fsdecode(os.fsencode(c.tmp) + b"/" + name)


def sparse(c: Ctx, name: str, size: int) -> Path:
    """A file of `size` bytes that takes no disk."""
    with (c.tmp / name).open("wb") as f:
        f.truncate(size)
    return c.tmp / name


def larger_than_read(c: Ctx, name: str) -> Path:
    """A file of 2 MiB, with the cap on a JSON document set to 1 MiB."""
    from minigpt5_cli import files

    c.monkeypatch.setattr(files, "MAX_DOCUMENT", 2**20)
    return sparse(c, name, 2 * 2**20)


def train_on_long_line(c: Ctx) -> list[str]:
    from minigpt5_cli import files

    c.monkeypatch.setattr(files, "MAX_LINE", 100)
    return train_on(c, f"{PAIR}\n{PAIR:<101}\n")


def train_on_deep_summary(c: Ctx) -> list[str]:
    from minigpt5_cli.data.prepare import prepare_toy

    prepare_toy(c.tmp / "toy", counts={"pairs": 4, "stories": 0, "stories_test": 0, "dialogs": 0})
    (c.tmp / "toy" / "pairs" / "summary.json").write_text(DEEP)
    return train_args(c, f"data.train={c.tmp / 'toy' / 'pairs'}")


def generate_over_deep(c: Ctx) -> list[str]:
    c.file("out/story.json", DEEP)
    return generate_args(c, "a circle.", "--overwrite")


def generate_with_deep_meta(c: Ctx) -> list[str]:
    run = c.copy("s2", "model")
    (run / "checkpoint-4" / "minigpt5.json").write_text(DEEP)
    return generate_args(c, "a circle.", model=run)


def study_with_deep_key(c: Ctx) -> list[str]:
    args = results_args(c)
    (study(c) / "key.json").write_text(DEEP)
    return args


def resume_with_json(c: Ctx, name: str, edit: Callable) -> list[str]:
    """--resume from a copy of the stage-1 run whose last checkpoint's JSON file `name` is `edit`ed."""
    path = c.copy("s1", "run") / "checkpoint-4" / name
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return train_args(c) + ["--resume"]


def resume_with_foreign_pickle(c: Ctx) -> list[str]:
    """A checkpoint of an earlier version (optimizer.bin), holding an object that is neither a tensor
    nor a plain value."""
    import datetime

    import torch

    last = c.copy("s1", "run") / "checkpoint-4"
    for name in ("optimizer.json", "optimizer.safetensors"):
        (last / name).unlink()
    torch.save({"state": {}, "param_groups": [], "saved": datetime.date(2000, 1, 1)}, last / "optimizer.bin")
    return train_args(c) + ["--resume"]


def generate_with(c: Ctx, damage: Callable[[Path], object]) -> list[str]:
    """generate from a copy of the stage-2 run whose last checkpoint `damage` changes."""
    run = c.copy("s2", "model")
    damage(run / "checkpoint-4")
    return generate_args(c, "a circle.", model=run)


def bundle_damaged(c: Ctx) -> list[str]:
    run = c.copy("s2")
    (run / "checkpoint-4" / "vokens.safetensors").write_bytes(b"\0" * 10)
    return ["bundle", str(run), str(c.tmp / "b")]


def in_use(c: Ctx, folder: Path) -> Path:
    """`folder` as a train run holds it, until the case is over: the test takes its lock."""
    import fcntl
    import weakref

    folder.mkdir(parents=True, exist_ok=True)
    lock = (folder / ".lock").open("a")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    weakref.finalize(c, lock.close)
    return folder


def scratch_args(c: Ctx) -> list[str]:
    return ["train", "-r", str(TOY / "llm_vision.yaml"), "model.llm=tiny:llava", f"data.train={SEQS}", "data.extra=[]",
            f"train.output_dir={c.tmp / 'llm'}"]


def image_linked_to(c: Ctx, target: Path | None) -> Path:
    """Output a of story s1 whose image is a link to `target`; with None, a text file in its place."""
    folder = generated(c, "a", ["s1"])
    (folder / "s1" / "image-1.png").unlink()
    if target is None:
        c.file("a/s1/image-1.png", "not an image")
    else:
        (folder / "s1" / "image-1.png").symlink_to(target)
    return folder


def story_linked_out(c: Ctx) -> Path:
    """Output a whose story folder is a link to a generate output elsewhere."""
    generated(c, "elsewhere", ["s1"])
    (c.tmp / "a").mkdir()
    (c.tmp / "a" / "s1").symlink_to(c.tmp / "elsewhere" / "s1")
    return c.tmp / "a"


def image_named(c: Ctx, name: str) -> Path:
    """Output a of story s1 whose story.json names the image `name`."""
    folder = generated(c, "a", ["s1"])
    doc = json.loads((folder / "s1" / "story.json").read_text())
    doc["generated"][0]["images"] = [name]
    doc["generated"][0]["segments"][1] = {"image": name}
    c.file("a/s1/story.json", json.dumps(doc))
    return folder


def study_with_key(c: Ctx, edit: Callable[[dict], object]) -> list[str]:
    """rate results on a study whose key.json `edit` changed, as by hand."""
    args = results_args(c)
    key = json.loads((study(c) / "key.json").read_text())
    edit(key)
    (study(c) / "key.json").write_text(json.dumps(key))
    return args


def old_study(c: Ctx, edit: Callable[[dict], object]) -> list[str]:
    """rate results on a study of the earlier layout (its key, study.json, beside the page, whose seed is the
    study's), the key changed by `edit`."""
    key = json.loads((study(c) / "key.json").read_text())
    models = {m: {"label": Path(v["path"]).name, "path": v["path"], "mode": v["mode"], "model": v["model"]}
              for m, v in key["models"].items()}
    old = {"format": "minigpt5-study", "study": key["study"], "seed": key["page_seed"], "title": key["title"],
           "questions": key["questions"], "models": models, "pairs": key["pairs"]}
    edit(old)
    shutil.copytree(study(c) / "raters", c.tmp / "old")
    c.file("old/study.json", json.dumps(old))
    return ["rate", "results", str(c.tmp / "old"), str(answers(c, study(c)))]


def resume_to_train_with(c: Ctx, edit: Callable[[dict], object]) -> list[str]:
    """--resume from checkpoint-2 of a copy of the stage-1 run (steps 3 and 4 still to train), its
    optimizer.json changed by `edit`."""
    run = c.copy("s1", "run")
    shutil.rmtree(run / "checkpoint-4")
    path = run / "checkpoint-2" / "optimizer.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return train_args(c) + ["--resume"]


def resume_with_large_state(c: Ctx) -> list[str]:
    """trainer_state.json grown past what is read of a JSON file (whitespace: still valid JSON)."""
    from minigpt5_cli import files

    c.monkeypatch.setattr(files, "MAX_DOCUMENT", 4096)
    path = c.copy("s1", "run") / "checkpoint-4" / "trainer_state.json"
    path.write_text(path.read_text() + " " * 8192)
    return train_args(c) + ["--resume"]


def resume_with_recipe(c: Ctx, text: str) -> list[str]:
    c.copy("s1", "run")
    c.file("run/checkpoint-4/recipe.yaml", text)
    return train_args(c) + ["--resume"]


def generate_mistyped_jsonl(c: Ctx) -> list[str]:
    """A bare .jsonl name, no folder in it: a path all the same, never the story's text."""
    c.monkeypatch.chdir(c.tmp)
    return generate_args(c, "stories_tst.jsonl")


def backbones_left_behind(c: Ctx, command: str) -> list[str]:
    """A copy of the stage-2 run whose recipe names its LLM beside the run, where it is not: the run was
    moved without it. From the case's folder, so the current folder holds no such path either."""
    c.monkeypatch.chdir(c.tmp)
    run = c.copy("s2")
    with_model(run / "checkpoint-4", llm="../../llm")
    if command == "bundle":
        return ["bundle", str(run), str(c.tmp / "b")]
    return generate_args(c, "a circle.", model=run)


def recipe_naming_missing(c: Ctx, command: str) -> list[str]:
    c.monkeypatch.chdir(c.tmp)
    if command == "train":
        return train_args(c, f"data.train={PAIRS}", "model.llm=missing/toy/llm")
    recipe = c.file("r.yaml", "model: {llm: missing/toy/llm, generator: tiny:sd}\n")
    return generate_args(c, "a circle.", model=recipe)


def launched(c: Ctx, argv: list[str]) -> list[str]:
    """`argv` in the main process of a 2-process accelerate launch, refused before it waits for the other."""
    c.monkeypatch.setenv("WORLD_SIZE", "2")
    return argv


# prepare-data opening|isg|mmie and export
def benchmark(c: Ctx, fmt: str) -> Path:
    """The benchmark's data file as distributed (the formats tests' fixtures), under {tmp}/raw."""
    from test_benchmark_formats import isg, mmie, opening

    return {"opening": opening, "isg": isg, "mmie": mmie}[fmt](c.tmp / "raw")


def beside(c: Ctx, fmt: str, name: str, content: str) -> Path:
    """The folder of the benchmark's data file, with the file `name` holding `content` beside it."""
    folder = benchmark(c, fmt).parent
    (folder / name).write_text(content)
    return folder


def export_args(c: Ctx, *extra: str, fmt: str = "opening", source: str | None = None) -> list[str]:
    """export into {tmp}/exp from {tmp}/d, the benchmark `source` (`fmt` unless told) prepared, then `extra`."""
    assert run_cli("prepare-data", source or fmt, "--input", str(benchmark(c, source or fmt)), "--output",
                   str(c.tmp / "d")) == 0
    return ["export", "--format", fmt, "--data", str(c.tmp / "d"), "--name", "m", "--output", str(c.tmp / "exp"),
            *extra]


def export_twice(c: Ctx) -> list[str]:
    args = export_args(c, "--gold")
    assert run_cli(*args) == 0
    return args


def export_generated(c: Ctx, change: Callable[[Path], object]) -> list[str]:
    """export of {tmp}/g, generate's output for OpenING's story 0301098 (its folder `change`d)."""
    out = generated(c, "g", ["0301098"], "Draw a lighthouse.")
    change(out / "0301098")
    return export_args(c, "--generated", str(out), "--partial")


def export_over_other_image(c: Ctx) -> list[str]:
    """ISG's gold answers exported into {tmp}/exp, which holds another file at a query image's path."""
    args = export_args(c, "--gold", fmt="isg")
    c.file("exp/images/0000_q1.png", "another")
    return args


def export_image_leading_out(c: Ctx) -> list[str]:
    """ISG's gold answers exported from {tmp}/d, whose stories.jsonl names a Golden image by a path through .."""
    args = export_args(c, "--gold", fmt="isg")
    path = c.tmp / "d/stories.jsonl"
    path.write_text(path.read_text().replace('"images/0000_g1.png"', '"../d/images/0000_g1.png"', 1))
    return args


def export_image_with_nul(c: Ctx) -> list[str]:
    """ISG's gold answers exported from {tmp}/d, whose stories.jsonl names a Golden image by a path holding NUL."""
    args = export_args(c, "--gold", fmt="isg")
    path = c.tmp / "d/stories.jsonl"
    path.write_text(path.read_text().replace('"images/0000_g1.png"', '"images/0000\\u0000g1.png"', 1))
    return args


def export_into_linked_folder(c: Ctx) -> list[str]:
    """ISG's gold answers exported into {tmp}/exp, whose images/ is a link to a folder outside it."""
    args = export_args(c, "--gold", fmt="isg")
    (c.tmp / "elsewhere").mkdir()
    (c.tmp / "exp").mkdir()
    (c.tmp / "exp/images").symlink_to(c.tmp / "elsewhere")
    return args


@dataclass
class Case:
    id: str
    argv: Callable[[Ctx], list[str]]
    message: str  # how the one line starts, after "error: " ({tmp}: the case's folder)


PAIR = json.dumps({"caption": "x", "image": "a.png"})


# OpenING judge: a pair of exported answers on one instance, nothing loaded (every refusal comes first)
def opening_record(inputs: list | None = None, output: list | None = None) -> str:
    steps = [{"image": "./images/S/1-i-0.png", "text": "<BEGIN> Look <image>"}] if inputs is None else inputs
    return json.dumps({"total_uid": "1", "conversations": [{"input": steps}, {"output": output or [
        {"text": "an answer <image>", "image": "1-o-0.png"}]}]})


def opening_judge_args(c: Ctx, *extra: str, x: str | None = None, y: str | None = None, pairs: str | None = None,
                       out: str = "j.jsonl", data: bool = True) -> list[str]:
    """judge --benchmark opening over models X and Y (their output files `x`, `y`), with --pairs and --data
    (the prepared folder holding the input image) unless `pairs` is "" or `data` False."""
    picture = (IMAGES / "red_circle.png").read_bytes()
    c.file("data/images/S/1-i-0.png", picture)
    for name, doc in (("X", x), ("Y", y)):
        c.file(f"exp/{name}_output/1.json", doc or opening_record())
        c.file(f"exp/{name}_output/1-o-0.png", picture)
    c.file("pairs.json", pairs or json.dumps([{"data_id": "1", "model_A": {"id": "0", "name": "X"},
                                               "model_B": {"id": "1", "name": "Y"}}]))
    given = (["--pairs", str(c.tmp / "pairs.json")] if pairs != "" else []) + \
        (["--data", str(c.tmp / "data")] if data and "--data" not in extra else [])
    return ["judge", "--benchmark", "opening", "--judge", str(c.tmp / "judge"), "--exports", str(c.tmp / "exp"),
            *given, "-o", str(c.tmp / out), *extra]


def opening_output_linked_out(c: Ctx) -> list[str]:
    argv = opening_judge_args(c)
    image = c.tmp / "exp" / "X_output" / "1-o-0.png"
    image.unlink()
    image.symlink_to(c.file("elsewhere.png", (IMAGES / "red_circle.png").read_bytes()))
    return argv


def opening_text_only_judge(c: Ctx) -> list[str]:
    import families

    argv = opening_judge_args(c)
    families.qwen2(c.tmp / "judge")
    return argv


def agreement_args(c: Ctx, *extra: str, human: bool = True) -> list[str]:
    """arena results on one judged battle between models a and b, with a rating study (its answers unless not
    `human`)."""
    judged = c.file("j.json", json.dumps([{"data_id": "s1", "model_A": {"id": "0", "name": "a"},
                                           "model_B": {"id": "1", "name": "b"}, "winner": "A"}]))
    given = ["--human", str(answers(c, study(c)))] if human else []
    return arena_results_args(c, judged, "--study", str(study(c)), *given, *extra)


# ISG-Bench and MMIE judges, and their scores: one exported sample, refused before any request is made
ISG_PROMPTS = "".join(f"{n} = 'x'\n" for n in ("_TEXT_TEXT_JUDGE_PROMPT", "_TEXT_IMAGE_JUDGE_PROMPT",
                                                "_IMAGE_IMAGE_JUDGE_PROMPT", "_DSG_PROMPT")) + \
    "_EVALUATE_WHOLE_W_GT_PROMPT = ['a', 'b', 'c', 'd']\nVQA_dict = {'Score': 's'}\n"
MMIE_PROMPTS = "R = 'r'\ndef get_prompt(i):\n" + "".join(f"    if '{t}' in i:\n        return R + '{{answer}}'\n"
                                                          for t in ("SA", "PBL", "MSR"))


def isg_record(**changes) -> dict:
    blocks = [{"type": "text", "content": "t"}, {"type": "image", "content": "images/q.png"}]
    return {"id": "0", "Category": "HowTo", "Query": blocks, "Golden": blocks, "predict": {}, "output": blocks, **changes}


def benchmark_judge_args(c: Ctx, benchmark: str, *extra: str, records: list | None = None, prompts: str | None = None,
                         out: str = "j.jsonl") -> list[str]:
    """judge --benchmark isg|mmie over model m's export of one sample (`records`), its image under --data and
    beside the export, with the benchmark's prompts in a stand-in checkout (none when `prompts` is "")."""
    for folder in ("data", "exp"):
        c.file(f"{folder}/images/q.png", (IMAGES / "red_circle.png").read_bytes())
    if benchmark == "isg":
        c.file("exp/m.jsonl", "".join(json.dumps(r) + "\n" for r in records or [isg_record()]))
        c.file("bench/ISG_eval/get_judge_prompt.py", ISG_PROMPTS if prompts is None else prompts)
    else:
        c.file("exp/m.json", json.dumps([{"id": "SA_1", "question": [{"text": "q", "image": "images/q.png"}],
                                          "answer": "a", "gt_answer": [{"text": None}]}] if records is None else records))
        c.file("bench/prompts.py", MMIE_PROMPTS if prompts is None else prompts)
    return ["judge", "--benchmark", benchmark, "--api", "http://127.0.0.1:9/v1", "--judge", "j", "--exports",
            str(c.tmp / "exp"), "--data", str(c.tmp / "data"), *(["--prompts", str(c.tmp / "bench")] if prompts != ""
                                                                 else []), "-o", str(c.tmp / out), *extra]


def scores_args(c: Ctx, benchmark: str, content: str, name: str = "j.jsonl", *extra: str) -> list[str]:
    return ["scores", "--benchmark", benchmark, str(c.file(name, content)), "-o", str(c.tmp / "s.json"), *extra]


# import-official: tiny files in the original layouts, one of them spoiled
def official_args(c: Ctx, spoil=None, stage1: str = "stage1.ckpt", stage2: str | None = "stage2.ckpt") -> list[str]:
    """import-official minigpt5 over a tiny base imported here, `spoil(state)` applied to stage 1 first."""
    import torch
    from test_import_official import import_base, official_checkpoints, upstream

    torch.manual_seed(0)
    s1, _ = official_checkpoints(c.tmp, import_base(c.tmp))
    if spoil:
        doc = torch.load(s1)
        spoil(doc["state_dict"])
        torch.save(doc, s1)
    return ["import-official", "minigpt5", "--stage1", str(c.tmp / stage1), "--base", str(c.tmp / "base"),
            "--generator", "tiny:sd", "--upstream", str(upstream(c.tmp / "MiniGPT-5")), "--output", str(c.tmp / "out"),
            *(["--stage2", str(c.tmp / stage2)] if stage2 else [])]


def spoiled_upstream(c: Ctx, text: str | None) -> list[str]:
    """import-official minigpt5 with a checkout whose dataloader.py is `text` (None: absent)."""
    args = official_args(c)
    (c.tmp / "MiniGPT-5" / "dataloader.py").unlink()
    if text is not None:
        c.file("MiniGPT-5/dataloader.py", text)
    return args


def lavis_args(c: Ctx, eva: dict | None = None, blip2: dict | None = None) -> list[str]:
    from test_import_official import lavis_files

    return ["import-official", "minigpt4", *lavis_files(c.tmp / "lavis", eva, blip2), "--output", str(c.tmp / "out")]


def spoiled_eva(unknown: bool = False) -> dict:
    """A tiny EVA state dict lacking a tensor, or holding one the original has no module for."""
    import torch
    from test_import_official import eva_state

    state = eva_state()
    if unknown:
        state["blocks.0.ls1"] = torch.ones(1)
    else:
        del state["blocks.1.mlp.fc2.bias"]
    return state


def not_only_tensors() -> dict:
    import argparse

    return {"cls_token": argparse.Namespace(x=1)}


def reshaped(c: Ctx, file: str, name: str, *shape: int) -> list[str]:
    """import-official minigpt4 with the tensor `name` of the tiny "eva" or "blip2" state at `shape`."""
    import torch
    from test_import_official import blip2_state, eva_state

    state = eva_state() if file == "eva" else blip2_state()
    state[name] = torch.zeros(shape)
    return lavis_args(c, **{file: state})


def damaged_base(c: Ctx, damage) -> list[str]:
    """import-official minigpt5 over a base folder that `damage(folder)` spoils after it is imported."""
    args = official_args(c)
    damage(c.tmp / "base")
    return args


def image_token_in_story(c: Ctx) -> list[str]:
    """train a tiny BLIP-2 model on a story whose text holds its image token."""
    story = json.dumps({"id": "a", "steps": [{"text": "a circle <image> here."}, {"text": "it moves."}]})
    return train_args(c, "model.llm=tiny:blip2", "train.init_from=none", "data.extra=[]",
                      f"data.train={c.file('s.jsonl', story + chr(10))}", recipe="stage2_lora.yaml")


def base_index(folder: Path, shard: str) -> None:
    """An index placing every tensor of the base folder `folder` in `shard`."""
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        names = list(f.keys())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, shard)}))


CASES = [
    # bundle: never deletes what it did not write
    Case("bundle-overwrite-user-folder", bundle_over_user_folder, "{tmp}/mine is not a bundle minigpt5 wrote"),
    Case("bundle-into-its-run", lambda c: ["bundle", str(c.copy("s2")), str(c.tmp / "s2"), "--overwrite"],
         "{tmp}/s2 overlaps"),
    Case("bundle-inside-its-run", lambda c: ["bundle", str(c.copy("s2")), str(c.tmp / "s2" / "b")],
         "{tmp}/s2/b overlaps"),
    Case("bundle-onto-a-file", lambda c: ["bundle", str(c.runs / "s2"), str(c.file("f", "x")), "--overwrite"],
         "OUTPUT {tmp}/f is a file"),
    Case("bundle-read-only", lambda c: ["bundle", str(c.runs / "s2"), str(c.read_only("ro") / "b")],
         "cannot write to {tmp}/ro"),
    Case("bundle-disk-full", bundle_disk_full, "No space left on device"),
    Case("bundle-damaged-checkpoint", bundle_damaged,
         "checkpoint {tmp}/s2/checkpoint-4 is damaged: {tmp}/s2/checkpoint-4/vokens.safetensors does not load"),
    Case("bundle-output-not-utf8", lambda c: ["bundle", str(c.runs / "s2"), not_utf8(c, b"\xff")],
         "OUTPUT {tmp}/\\xff is not a UTF-8 name"),
    Case("bundle-remote-code", bundle_remote_code,
         "{tmp}/s2/checkpoint-4: its recipe asks to run the code in the LLM 'tiny:llava'; pass --trust-remote-code"),
    Case("bundle-backbone-not-found", lambda c: backbones_left_behind(c, "bundle"),
         "{tmp}/s2/checkpoint-4/recipe.yaml names the backbone '../../llm', which is not found relative to "
         "{tmp}/s2/checkpoint-4"),
    # train: garbage settings refused before any work
    Case("train-image-outside", lambda c: train_args(c, "data.train=" + str(c.file("d/d.jsonl", json.dumps(
        {"caption": "x", "image": str(IMAGES / "red_circle.png")})))),
         "{tmp}/d/d.jsonl line 1: the image '" + str(IMAGES / "red_circle.png") + "' of step 1 is outside {tmp}/d; "
         "keep its images under the file's folder, or set data.allow_outside_paths=true"),
    Case("train-backbone-config-too-deep", lambda c: train_args(c, f"model.llm={c.file('llm/config.json', '[' * 100_000).parent}"),
         "cannot load the LLM '{tmp}/llm'"),
    Case("train-lr-nan", lambda c: train_args(c, "train.lr=nan"), "recipe key 'train.lr' must be a finite number"),
    Case("train-backbone-not-found", lambda c: recipe_naming_missing(c, "train"),
         "recipe key 'model.llm' names 'missing/toy/llm', which is not found (no folder {tmp}/missing/toy/llm)"),
    Case("train-lr-inf", lambda c: train_args(c, "train.lr=.inf"), "recipe key 'train.lr' must be a finite number"),
    Case("train-lr-negative", lambda c: train_args(c, "train.lr=-1e-3"), "recipe key 'train.lr' must be above 0"),
    Case("train-mapper-lr-nan", lambda c: train_args(c, "train.mapper_lr_scale=nan"),
         "recipe key 'train.mapper_lr_scale' must be a finite number"),
    Case("train-max-steps-negative", lambda c: train_args(c, "train.max_steps=-1"),
         "recipe key 'train.max_steps' must be at least 0"),
    Case("train-nothing-to-train", lambda c: train_args(c, "train.epochs=0", "train.max_steps=0"),
         "recipe keys 'train.epochs' and 'train.max_steps' are both 0"),
    Case("train-num-workers", lambda c: train_args(c, "data.num_workers=-1"),
         "recipe key 'data.num_workers' must be at least 0"),
    Case("train-mapper-heads", lambda c: train_args(c, "model.mapper.hidden=30", "model.mapper.heads=4"),
         "recipe key 'model.mapper.hidden' (30) must be a multiple"),
    Case("train-mapper-heads-width", lambda c: train_args(c, "model.mapper.heads=5"),
         "the generator's conditioning width 32 is not a multiple of model.mapper.heads (5)"),
    Case("train-binary-recipe", lambda c: ["train", "-r", str(c.file("r.yaml", BINARY))], "{tmp}/r.yaml is not UTF-8"),
    Case("train-binary-data", lambda c: train_args(c, f"data.train={c.file('d.jsonl', BINARY)}"),
         "{tmp}/d.jsonl is not UTF-8"),
    Case("train-deep-recipe", lambda c: ["train", "-r", str(c.file("r.yaml", DEEP))],
         "recipe {tmp}/r.yaml is not valid YAML: nested too deeply"),
    Case("train-recipe-aliases", lambda c: ["train", "-r", str(c.file("r.yaml", LAUGHS))],
         "recipe {tmp}/r.yaml line 2: YAML aliases (*a) are not supported in a recipe"),
    Case("train-large-recipe", lambda c: ["train", "-r", str(sparse(c, "r.yaml", 2 * 2**20))],
         "{tmp}/r.yaml is too large (2 MiB; at most 1 MiB is read)"),
    Case("train-deep-data", lambda c: train_on(c, DEEP), "{tmp}/d.jsonl line 1: not valid JSON (nested too deeply)"),
    Case("train-long-data-line", train_on_long_line, "{tmp}/d.jsonl line 2 is too long (over 100 characters)"),
    Case("train-deep-dataset-summary", train_on_deep_summary,
         "{tmp}/toy/pairs/summary.json: not valid JSON (nested too deeply"),
    Case("train-output-not-utf8", lambda c: train_args(c, "train.output_dir=" + not_utf8(c, b"run-\xff")),
         "train.output_dir {tmp}/run-\\xff is not a UTF-8 name"),
    Case("train-surrogate-text", lambda c: train_on(c, PAIR.replace('"x"', '"x\\udc80"')),
         "{tmp}/d.jsonl line 1: '\\udc80' is an unpaired surrogate"),
    Case("train-oversized-image", lambda c: train_on(c, PAIR, thin_png()),
         "image too large: {tmp}/a.png is 1 x 100000 pixels"),
    Case("train-output-is-a-file", lambda c: train_args(c, f"train.output_dir={c.file('f', 'x')}"),
         "train.output_dir {tmp}/f is a file"),
    Case("train-read-only", lambda c: train_args(c, f"train.output_dir={c.read_only('ro') / 'run'}"),
         "cannot write to {tmp}/ro"),
    Case("train-nan-loss", nan_loss, "training diverged at step 3 (loss nan"),
    Case("train-resume-damaged-optimizer", lambda c: resume_with_damaged(c, "optimizer.safetensors"),
         "checkpoint {tmp}/run/checkpoint-4 is damaged: {tmp}/run/checkpoint-4/optimizer.safetensors does not load; "
         "use the checkpoint before it, {tmp}/run/checkpoint-2"),
    Case("train-resume-optimizer-groups", lambda c: resume_with_json(
        c, "optimizer.json", lambda d: {**d, "param_groups": d["param_groups"][:1]}),
         "checkpoint {tmp}/run/checkpoint-4 is damaged: {tmp}/run/checkpoint-4/optimizer.json does not load "
         "(parameter groups: 1 there, 2 here)"),
    Case("train-resume-optimizer-bad-reference", lambda c: resume_to_train_with(
        c, lambda d: d["state"]["vokens.rows_in"].update(step={"tensor": []})),
         "checkpoint {tmp}/run/checkpoint-2 is damaged: {tmp}/run/checkpoint-2/optimizer.json does not load (its "
         "'step' of 'vokens.rows_in' is neither a number nor a tensor)"),
    Case("train-resume-optimizer-step-list", lambda c: resume_to_train_with(
        c, lambda d: d["state"]["vokens.rows_in"].update(step=[1, 2])),
         "checkpoint {tmp}/run/checkpoint-2 is damaged: {tmp}/run/checkpoint-2/optimizer.json does not load (its "
         "'step' of 'vokens.rows_in' is neither a number nor a tensor)"),
    Case("train-resume-optimizer-step-text", lambda c: resume_to_train_with(
        c, lambda d: d["state"]["vokens.rows_in"].update(step="2")),
         "checkpoint {tmp}/run/checkpoint-2 is damaged: {tmp}/run/checkpoint-2/optimizer.json does not load (its "
         "'step' of 'vokens.rows_in' is neither a number nor a tensor)"),
    Case("train-resume-optimizer-step-shaped", lambda c: resume_to_train_with(
        c, lambda d: d["state"]["vokens.rows_in"].update(step={"tensor": "vokens.rows_in/exp_avg"})),
         "checkpoint {tmp}/run/checkpoint-2 is damaged: {tmp}/run/checkpoint-2/optimizer.json does not load (its "
         "vokens.rows_in step is not of the shape [])"),
    Case("train-resume-optimizer-state-missing", lambda c: resume_to_train_with(
        c, lambda d: d["state"]["vokens.rows_in"].pop("exp_avg_sq")),
         "checkpoint {tmp}/run/checkpoint-2 is damaged: {tmp}/run/checkpoint-2/optimizer.json does not load (its "
         "state of vokens.rows_in holds exp_avg, step, not exp_avg, exp_avg_sq, step)"),
    Case("train-resume-optimizer-flag-text", lambda c: resume_to_train_with(
        c, lambda d: d["param_groups"][0].update(foreach="yes")),
         "checkpoint {tmp}/run/checkpoint-2 is damaged: {tmp}/run/checkpoint-2/optimizer.json does not load (its "
         "parameter group settings foreach are not as the optimizer's)"),
    Case("train-resume-large-state", resume_with_large_state,
         "checkpoint {tmp}/run/checkpoint-4 is damaged: {tmp}/run/checkpoint-4/trainer_state.json is too large (8 KiB; "
         "at most 4 KiB is read); use the checkpoint before it, {tmp}/run/checkpoint-2"),
    Case("train-resume-recipe-not-yaml", lambda c: resume_with_recipe(c, "train: [\n"),
         "recipe {tmp}/run/checkpoint-4/recipe.yaml is not valid YAML"),
    Case("train-resume-recipe-unknown-key", lambda c: resume_with_recipe(c, "train: {lrr: 1}\n"),
         "{tmp}/run/checkpoint-4/recipe.yaml: unknown recipe key 'train.lrr'"),
    Case("train-resume-other-max-steps", lambda c: c.copy("s1", "run") and [*train_args(c, "train.max_steps=8"),
                                                                           "--resume"],
         "--resume continues the run as saved in {tmp}/run/checkpoint-4/recipe.yaml: train.max_steps is 8 here, 4 "
         "there; the learning rate's schedule, restored with the run, spans its steps as they were set; to train for "
         "more or fewer steps, start a new train.output_dir"),
    Case("train-resume-old-optimizer-foreign-object", resume_with_foreign_pickle,
         "checkpoint {tmp}/run/checkpoint-4 is damaged: {tmp}/run/checkpoint-4/optimizer.bin does not load (it holds "
         "objects other than tensors and plain values)"),
    Case("train-resume-scheduler-lists", lambda c: resume_with_json(
        c, "scheduler.json", lambda d: {**d, "base_lrs": d["base_lrs"] * 2}),
         "checkpoint {tmp}/run/checkpoint-4 is damaged: {tmp}/run/checkpoint-4/scheduler.json does not load (it "
         "does not hold the state of this scheduler)"),
    Case("train-resume-state-a-list", lambda c: resume_with_json(c, "trainer_state.json", lambda d: [d]),
         "checkpoint {tmp}/run/checkpoint-4 is damaged: {tmp}/run/checkpoint-4/trainer_state.json does not load (it "
         "holds list, not an object)"),
    Case("train-resume-damaged-vokens", lambda c: resume_with_damaged(c, "vokens.safetensors"),
         "checkpoint {tmp}/run/checkpoint-4 is damaged: {tmp}/run/checkpoint-4/vokens.safetensors does not load"),
    Case("train-in-use", lambda c: in_use(c, c.copy("s1", "run")) and [*train_args(c), "--resume"],
         "{tmp}/run is in use by another train run; wait for it to end, or pick another train.output_dir"),
    Case("train-scratch-in-use", lambda c: in_use(c, c.tmp / "llm") and scratch_args(c),
         "{tmp}/llm is in use by another train run"),
    Case("train-resume-other-lr", lambda c: c.copy("s1", "run") and [*train_args(c, "train.lr=0.5"), "--resume"],
         "--resume continues the run as saved in {tmp}/run/checkpoint-4/recipe.yaml: train.lr is 0.5 here, 0.001 "
         "there; start a new train.output_dir to change it"),
    Case("train-resume-other-data", lambda c: c.copy("s1", "run") and [*train_args(c, f"data.train={SEQS}"),
                                                                      "--resume"],
         "--resume continues the run as saved in {tmp}/run/checkpoint-4/recipe.yaml: data.train is "),
    Case("train-disk-full", train_disk_full, "No space left on device"),
    Case("train-disk-full-in-safetensors", train_disk_full_in_safetensors,
         "No space left on device writing {tmp}/run/.checkpoint-4.tmp/vokens.safetensors; the earlier output is left"),
    Case("train-too-many-vokens", lambda c: train_args(c, "model.n_vokens=100000"),
         "recipe key 'model.n_vokens' must be in [2, 256], got 100000"),
    Case("train-unsupported-model-type", clip_as_llm, "the LLM '{tmp}/clip' is a 'clip_text_model' model, neither"),
    Case("train-processor-needs-a-package", processor_missing_a_package,
         "the processor of 'tiny:llava' needs the package 'torchvision': pip install torchvision"),
    Case("train-lora-targets-match-nothing",
         lambda c: train_args(c, "adapter.target_modules=[c_proj, wq]", "train.init_from=none", recipe="stage2_lora.yaml"),
         "adapter.target_modules ['c_proj', 'wq'] match no layer of the language model; its linear layers are "),
    Case("train-inpainting-generator", inpainting_generator,
         "generator '{tmp}/inpaint' is a StableDiffusionInpaintPipeline; minigpt5 needs Stable Diffusion 1.x / 2.x, "
         "SDXL, SD3 / 3.5 or FLUX.1 (text-to-image)"),
    Case("train-pixart-generator", pixart_generator,
         "generator '{tmp}/pixart' is a PixArtAlphaPipeline; minigpt5 needs Stable Diffusion 1.x / 2.x, SDXL, SD3"),
    Case("train-scratch-stage-on-sdxl", scratch_generator_on_sdxl,
         "stage generator trains Stable Diffusion 1.x / 2.x-style pipelines (as toy:sd); 'tiny:sdxl' is SDXL"),
    Case("train-image-conditioned-unet", lambda c: inpainting_generator(c, as_text_to_image=True),
         "generator '{tmp}/inpaint' has a denoiser of 9 input channels for 4-channel latents"),
    Case("train-checkpointing-prefix", lambda c: train_args(c, "train.gradient_checkpointing=true",
                                                            recipe="stage2_prefix.yaml"),
         "train.gradient_checkpointing does not combine with prefix tuning"),
    Case("train-checkpointing-scratch", lambda c: ["train", "-r", str(TOY / "generator.yaml"),
                                                   f"train.output_dir={c.tmp / 'run'}", "train.gradient_checkpointing=true"],
         "stage generator does not checkpoint activations"),
    Case("train-grouped-scratch", lambda c: ["train", "-r", str(TOY / "llm.yaml"), f"train.output_dir={c.tmp / 'run'}",
                                             "data.group_by_length=true"],
         "stage llm does not group batches by length: set data.group_by_length=false"),
    Case("train-shapes-only-backbone", lambda c: train_args(c, "model.llm=paper:llava-1.5-7b"),
         "paper:llava-1.5-7b describes the model's shapes, without weights: use it with train --plan"),
    Case("train-deepspeed", deepspeed, "DeepSpeed is not supported: shard with FSDP instead"),
    # train --plan
    Case("plan-backbone-not-here", lambda c: train_args(c, "--plan", "model.llm=nobody/no-such-model"),
         "cannot load the LLM 'nobody/no-such-model'"),
    Case("plan-memory-not-a-size", lambda c: train_args(c, "--plan", "--gpu-memory", "lots"),
         "--gpu-memory 'lots' is not a size"),
    Case("plan-no-processes", lambda c: train_args(c, "--plan", "--num-processes", "0"),
         "--num-processes must be at least 1"),
    Case("plan-scratch-stage", lambda c: ["train", "-r", str(TOY / "generator.yaml"), "--plan"],
         "--plan covers stages 1 and 2"),
    Case("plan-options-without-plan", lambda c: train_args(c, "--gpu-memory", "24GiB"),
         "--num-processes and --gpu-memory go with --plan"),
    # generate
    Case("generate-binary-story-json", lambda c: generate_args(c, c.file("s.json", BINARY)),
         "{tmp}/s.json is not UTF-8"),
    Case("generate-binary-story-jsonl", lambda c: generate_args(c, c.file("s.jsonl", BINARY)),
         "{tmp}/s.jsonl is not UTF-8"),
    Case("generate-deep-story-json", lambda c: generate_args(c, c.file("s.json", DEEP)),
         "{tmp}/s.json: not valid JSON (nested too deeply"),
    Case("generate-deep-story-jsonl", lambda c: generate_args(c, c.file("s.jsonl", DEEP)),
         "{tmp}/s.jsonl line 1: not valid JSON (nested too deeply)"),
    Case("generate-large-story-json", lambda c: generate_args(c, larger_than_read(c, "s.json")),
         "{tmp}/s.json is too large (2 MiB; at most 1 MiB is read)"),
    Case("generate-over-deep-story-json", generate_over_deep,
         "{tmp}/out already holds story.json, not written by minigpt5"),
    Case("generate-deep-checkpoint-json", generate_with_deep_meta,
         "checkpoint {tmp}/model/checkpoint-4 is damaged: {tmp}/model/checkpoint-4/minigpt5.json does not load"),
    Case("generate-output-not-utf8", lambda c: generate_elsewhere(c, not_utf8(c, b"\xff")),
         "--output {tmp}/\\xff is not a UTF-8 name"),
    Case("generate-surrogate-id", lambda c: generate_args(c, stories_jsonl_with_surrogate(c)),
         "{tmp}/s.jsonl line 1: '\\ud800' is an unpaired surrogate"),
    Case("generate-oversized-image", lambda c: generate_args(c, story_with_image(c, thin_png())),
         "image too large: {tmp}/s/a.png is 1 x 100000 pixels"),
    Case("generate-huge-image", lambda c: generate_args(c, story_with_image(c, big_png(13000, 13000))),
         "image too large: {tmp}/s/a.png is 13000 x 13000 pixels, more than 40 megapixels"),
    Case("generate-output-is-a-file", lambda c: generate_elsewhere(c, c.file("f", "x")), "--output {tmp}/f is a file"),
    Case("generate-read-only", lambda c: generate_elsewhere(c, c.read_only("ro")), "cannot write to {tmp}/ro"),
    Case("generate-damaged-vokens", generate_with_damaged_vokens,
         "checkpoint {tmp}/model/checkpoint-4 is damaged: {tmp}/model/checkpoint-4/vokens.safetensors does not load"),
    Case("generate-checkpoint-json-a-list",
         lambda c: generate_with(c, lambda f: (f / "minigpt5.json").write_text("[1]")),
         "checkpoint {tmp}/model/checkpoint-4 is damaged: {tmp}/model/checkpoint-4/minigpt5.json does not load (it "
         "holds list, not an object)"),
    Case("generate-missing-adapter", lambda c: generate_with(c, lambda f: shutil.rmtree(f / "adapter")),
         "checkpoint {tmp}/model/checkpoint-4 is damaged: {tmp}/model/checkpoint-4/adapter/adapter_model.safetensors "
         "is missing"),
    Case("generate-malformed-story-json", generate_over_malformed,
         "{tmp}/out already holds story.json, not written by minigpt5"),
    Case("generate-another-story-there", generate_over_another, "{tmp}/out holds another story ('circle')"),
    Case("generate-raced", generate_raced, "{tmp}/out/story.json was written by another run meanwhile"),
    Case("generate-disk-full", generate_disk_full, "No space left on device"),
    Case("generate-story-mistyped-folder", lambda c: generate_args(c, c.tmp / "data" / "stories_tst"),
         "--story {tmp}/data/stories_tst: no such file or folder; to use it as text"),
    Case("generate-story-mistyped-jsonl", generate_mistyped_jsonl,
         "--story stories_tst.jsonl: no such file or folder; to use it as text"),
    Case("generate-temperature-nan", lambda c: generate_args(c, "x", "--temperature", "nan"),
         "--temperature must be a finite number"),
    Case("generate-guidance-nan", lambda c: generate_args(c, "x", "--guidance-scale", "nan"),
         "--guidance-scale must be a finite number"),
    Case("generate-image-size", lambda c: generate_args(c, "x", "--image-size", "99992"),
         "--image-size must be a multiple of 8 from 8 to 2048"),
    Case("generate-image-size-for-flux", lambda c: generate_args(c, "x", "--image-size", "40", model=flux_recipe(c)),
         "--image-size must be a multiple of 16 for this FLUX.1 generator, got 40"),
    Case("generate-empty-story", lambda c: generate_args(c, ""), "the story is empty"),
    Case("generate-remote-code", lambda c: generate_args(c, "x", model=with_model(c.copy("bundle"),
                                                                                   trust_remote_code=True)),
         "{tmp}/bundle: its recipe asks to run the code in the LLM 'llm'; pass --trust-remote-code if you trust it"),
    Case("generate-backbone-outside-bundle", bundle_leading_out,
         "{tmp}/m/bundle/recipe.yaml names the backbone '../../elsewhere', which leads outside {tmp}/m/bundle"),
    Case("generate-backbone-not-found", lambda c: backbones_left_behind(c, "generate"),
         "{tmp}/s2/checkpoint-4/recipe.yaml names the backbone '../../llm', which is not found relative to "
         "{tmp}/s2/checkpoint-4"),
    Case("generate-bundle-backbone-not-found", lambda c: generate_args(c, "a circle.", model=with_model(
        c.copy("bundle"), llm="./gone")), "{tmp}/bundle/recipe.yaml names the backbone './gone', which is not in "
         "{tmp}/bundle; a bundle's backbones are folders inside it"),
    Case("generate-recipe-backbone-not-found", lambda c: recipe_naming_missing(c, "generate"),
         "{tmp}/r.yaml: recipe key 'model.llm' names 'missing/toy/llm', which is not found (no folder "
         "{tmp}/missing/toy/llm)"),
    Case("generate-image-outside-story", image_outside_story,
         "{tmp}/s/story.json: the image '../a.png' of step 1 is outside {tmp}/s"),
    Case("generate-output-in-model", output_in_model,
         "--output {tmp}/model/checkpoint-4/out is inside the model folder {tmp}/model;"),
    Case("generate-shard-not-k-of-n", lambda c: generate_args(c, "x", "--shard", "2"), "--shard 2: give K/N"),
    Case("generate-shard-out-of-range", lambda c: generate_args(c, "x", "--shard", "3/2"),
         "--shard 3/2: K must be from 1 to N"),
    Case("generate-shard-zero", lambda c: generate_args(c, "x", "--shard", "0/2"), "--shard 0/2: K must be from 1"),
    Case("generate-shard-under-launch", generate_shard_launched, "--shard runs one shard in a process started by hand"),
    # evaluate
    Case("evaluate-image-outside", lambda c: evaluate_args(c, c.file("p/p.jsonl", json.dumps(
        {"id": "s", "text": "a", "images": [str(IMAGES / "red_circle.png")]})), SEQS),
         "{tmp}/p/p.jsonl line 1: the image '" + str(IMAGES / "red_circle.png") + "' is outside {tmp}/p"),
    Case("evaluate-binary-predictions", lambda c: evaluate_args(c, c.file("p.jsonl", BINARY), SEQS),
         "{tmp}/p.jsonl is not UTF-8"),
    Case("evaluate-binary-compare", lambda c: ["evaluate", "--compare", str(c.file("a.json", BINARY)),
                                               str(c.file("b.json", "{}"))], "{tmp}/a.json is not UTF-8"),
    Case("evaluate-deep-predictions", lambda c: evaluate_args(c, c.file("p.jsonl", DEEP), SEQS),
         "{tmp}/p.jsonl line 1: not valid JSON (nested too deeply)"),
    Case("evaluate-deep-references", lambda c: evaluate_args(c, c.file("p.jsonl", '{"id": "a", "text": "x"}\n'),
                                                             c.file("r.jsonl", DEEP)),
         "{tmp}/r.jsonl line 1: not valid JSON (nested too deeply)"),
    Case("evaluate-deep-generated-story", lambda c: evaluate_args(c, generated(c, "g", ["s1"], doc=DEEP), SEQS),
         "{tmp}/g/s1/story.json: not valid JSON (nested too deeply"),
    Case("evaluate-deep-compare", lambda c: ["evaluate", "--compare", str(c.file("a.json", DEEP)),
                                             str(c.file("b.json", "{}"))],
         "{tmp}/a.json: not valid JSON (nested too deeply"),
    Case("evaluate-output-not-utf8", lambda c: evaluate_args(c, SEQS, SEQS)[:-2] + ["-o", not_utf8(c, b"\xff.json")],
         "--output {tmp}/\\xff.json is not a UTF-8 name"),
    Case("evaluate-huge-image", evaluate_huge, "image too large: {tmp}/big.png is 13000 x 13000 pixels"),
    Case("evaluate-output-is-a-folder", lambda c: evaluate_args(c, SEQS, SEQS)[:-2] + ["-o", str(c.runs)],
         "--output {runs} is a folder"),
    Case("evaluate-read-only", lambda c: evaluate_args(c, SEQS, SEQS)[:-2] + ["-o", str(c.read_only("ro") / "m.json")],
         "cannot write to {tmp}/ro"),
    Case("evaluate-bootstrap", lambda c: evaluate_args(c, SEQS, SEQS, "--bootstrap", "1000000000"),
         "--bootstrap must be in [1, 100000]"),
    Case("evaluate-disk-full", evaluate_disk_full, "No space left on device"),
    Case("evaluate-is-without-images", evaluate_is_without_images, "IS needs at least 2 generated images, found 0"),
    Case("evaluate-compat-fid-real-stats", lambda c: evaluate_args(c, SEQS, SEQS, "--compat", "minigpt5",
                                                                   "--fid-real-stats", str(c.tmp / "real.npz")),
         "--compat minigpt5 computes FID from the reference images of the samples scored"),
    Case("evaluate-compat-is-without-images", lambda c: evaluate_is_without_images(c, "--compat", "minigpt5"),
         "IS needs at least 1 generated image, found 0"),
    # prepare-data
    Case("prepare-binary-cc3m-tsv", lambda c: ["prepare-data", "cc3m", "--input", str(c.file("c.tsv", BINARY)),
                                               "--output", str(c.tmp / "data")],
         "cannot read {tmp}/c.tsv: it is not UTF-8"),
    Case("prepare-deep-vist", lambda c: ["prepare-data", "vist", "--input", str(c.file("v.json", DEEP)), "--images",
                                         str(c.tmp), "--output", str(c.tmp / "data")],
         "{tmp}/v.json: not valid JSON (nested too deeply"),
    Case("prepare-deep-mmdialog", lambda c: ["prepare-data", "mmdialog", "--input", str(c.file("m.json", DEEP)),
                                             "--output", str(c.tmp / "data")],
         "{tmp}/m.json is not valid JSON (nested too deeply"),
    Case("prepare-output-not-utf8", lambda c: ["prepare-data", "toy", "--output", not_utf8(c, b"\xff")],
         "--output {tmp}/\\xff is not a UTF-8 name"),
    Case("prepare-output-is-a-file", lambda c: ["prepare-data", "toy", "--output", str(c.file("f", "x"))],
         "--output {tmp}/f is a file"),
    Case("prepare-read-only", lambda c: ["prepare-data", "toy", "--output", str(c.read_only("ro") / "d")],
         "cannot write to {tmp}/ro"),
    Case("prepare-raced", prepare_raced, "{tmp}/data appeared while this run was writing it"),
    Case("prepare-disk-full", prepare_disk_full, "No space left on device"),
    Case("prepare-launched-without-cache-latents", lambda c: launched(c, ["prepare-data", "cc3m", "--input",
                                                                          str(c.file("c.tsv", "a\tb.png\n")),
                                                                          "--output", str(c.tmp / "data")]),
         "prepare-data spreads only --cache-latents over processes"),
    Case("prepare-toy-launched", lambda c: launched(c, ["prepare-data", "toy", "--output", str(c.tmp / "data")]),
         "prepare-data spreads only --cache-latents over processes"),
    # rate build
    Case("rate-build-missing-output", lambda c: rate_build_args(c, c.tmp / "nothing", generated(c, "b", ["s1"])),
         "--a {tmp}/nothing not found"),
    Case("rate-build-not-generate-output", lambda c: rate_build_args(c, c.file("mine/notes.txt", "x").parent,
                                                                     generated(c, "b", ["s1"])),
         "--a {tmp}/mine holds no story.json"),
    Case("rate-build-malformed-story", lambda c: rate_build_args(c, generated(c, "a", ["s1"], doc="{not json"),
                                                                 generated(c, "b", ["s1"])),
         "{tmp}/a/s1/story.json is not a story written by minigpt5 generate"),
    Case("rate-build-deep-story", lambda c: rate_build_args(c, generated(c, "a", ["s1"], doc=DEEP),
                                                            generated(c, "b", ["s1"])),
         "{tmp}/a/s1/story.json is not a story written by minigpt5 generate"),
    Case("rate-build-mismatched-ids", lambda c: rate_build_args(c, generated(c, "a", ["s1", "s2"]),
                                                                generated(c, "b", ["s1", "s3"])),
         "--a and --b hold different stories: 1 only in --a ('s2'), 1 only in --b ('s3')"),
    Case("rate-build-other-beginnings", lambda c: rate_build_args(c, generated(c, "a", ["s1"]),
                                                                  generated(c, "b", ["s1"], text="a square.")),
         "story 's1' begins differently in --a and --b"),
    Case("rate-build-study-exists", lambda c: rate_build_args(c, study(c).parent / "a", c.tmp / "b"),
         "--output {tmp}/study exists; pass --overwrite"),
    Case("rate-build-over-user-folder", lambda c: rate_build_args(c, generated(c, "a", ["s1"]),
                                                                  generated(c, "b", ["s1"]), "--overwrite",
                                                                  out=c.file("mine/notes.txt", "x").parent),
         "{tmp}/mine is not a study folder rate build wrote"),
    Case("rate-build-seed", lambda c: rate_build_args(c, generated(c, "a", ["s1"]), generated(c, "b", ["s1"]),
                                                      "--seed", "-1"),
         "--seed must be in [0, 9223372036854775807]"),
    Case("rate-build-link-outside", lambda c: rate_build_args(c, image_linked_to(c, c.file("secret.txt", "notes")),
                                                              generated(c, "b", ["s1"])),
         "{tmp}/a/s1/image-1.png leads outside --a {tmp}/a (a link?)"),
    Case("rate-build-link-to-outside-image", lambda c: rate_build_args(c, image_linked_to(c, IMAGES / "red_circle.png"),
                                                                       generated(c, "b", ["s1"])),
         "{tmp}/a/s1/image-1.png leads outside --a {tmp}/a (a link?)"),
    Case("rate-build-story-folder-outside",
         lambda c: rate_build_args(c, story_linked_out(c), generated(c, "b", ["s1"])),
         "{tmp}/a/s1/story.json leads outside --a {tmp}/a (a link?)"),
    Case("rate-build-image-path-up", lambda c: rate_build_args(c, image_named(c, "../../secret.txt"),
                                                               generated(c, "b", ["s1"])),
         "{tmp}/a/s1/story.json names the image '../../secret.txt', not a file beside it"),
    Case("rate-build-image-path-absolute", lambda c: rate_build_args(c, image_named(c, "/etc/hostname"),
                                                                     generated(c, "b", ["s1"])),
         "{tmp}/a/s1/story.json names the image '/etc/hostname', not a file beside it"),
    Case("rate-build-not-an-image", lambda c: rate_build_args(c, image_linked_to(c, None), generated(c, "b", ["s1"])),
         "image does not decode: {tmp}/a/s1/image-1.png"),
    # rate results
    Case("rate-results-not-a-study", lambda c: ["rate", "results", str(c.file("x/notes.txt", "x").parent),
                                                str(answers(c, study(c)))],
         "{tmp}/x is not a study folder (no key.json)"),
    Case("rate-results-raters-folder",
         lambda c: ["rate", "results", str(study(c) / "raters"), str(answers(c, study(c)))],
         "{tmp}/study/raters is the raters' folder, which holds no key; give the study folder rate build wrote"),
    Case("rate-results-not-a-key",
         lambda c: ["rate", "results", str(c.file("k.json", "{}")), str(answers(c, study(c)))],
         "{tmp}/k.json is not a study key written by rate build"),
    Case("rate-results-binary-answers", lambda c: ["rate", "results", str(study(c)), str(c.file("r.json", BINARY))],
         "{tmp}/r.json is not UTF-8"),
    Case("rate-results-malformed-answers", lambda c: ["rate", "results", str(study(c)), str(c.file("r.json", "{x"))],
         "{tmp}/r.json: not valid JSON"),
    Case("rate-results-deep-answers", lambda c: ["rate", "results", str(study(c)), str(c.file("r.json", DEEP))],
         "{tmp}/r.json: not valid JSON (nested too deeply"),
    Case("rate-results-large-answers", lambda c: ["rate", "results", str(study(c)),
                                                  str(larger_than_read(c, "r.json"))],
         "{tmp}/r.json is too large (2 MiB; at most 1 MiB is read)"),
    Case("rate-results-deep-key", study_with_deep_key, "{tmp}/study/key.json: not valid JSON (nested too deeply"),
    Case("rate-results-over-deep-results",
         lambda c: results_args(c, "-o", str(c.file("out/results.json", DEEP).parent)),
         "{tmp}/out/results.json was not written by rate results"),
    Case("rate-results-not-an-export", lambda c: ["rate", "results", str(study(c)), str(c.file("r.json", "[]"))],
         "{tmp}/r.json is not a rating export"),
    Case("rate-results-another-study", lambda c: results_args(c, study="0123456789ab"),
         "{tmp}/r.json is from another study (study '0123456789ab', seed "),
    Case("rate-results-another-seed", lambda c: results_args(c, seed=2), "{tmp}/r.json is from another study"),
    Case("rate-results-unknown-answer", lambda c: results_args(c, language="C"),
         "{tmp}/r.json: pair 1: unknown answer language='C'; answers are A, B or tie"),
    Case("rate-results-unknown-story", lambda c: results_args(c, id="s9"),
         "{tmp}/r.json: pair 1 is not one of this study's stories"),
    Case("rate-results-same-rater-twice", lambda c: results_args(c, str(answers(c, study(c), name="r2.json"))),
         "rater 'r' is in both {tmp}/r.json and {tmp}/r2.json"),
    Case("rate-results-no-answers", lambda c: results_args(c, language=None), "the answers files hold no answers yet"),
    Case("rate-results-over-user-file", lambda c: results_args(c, "-o", str(c.file("out/results.json", "x").parent)),
         "{tmp}/out/results.json was not written by rate results"),
    Case("rate-results-story-id-a-list", lambda c: results_args(c, id=["s1"]),
         "{tmp}/r.json: pair 1 is not one of this study's stories"),
    Case("rate-results-key-missing-field", lambda c: study_with_key(c, lambda k: k["models"]["b"].pop("option")),
         "{tmp}/study/key.json is not a study key written by rate build: model b lacks a name, option or path"),
    Case("rate-results-key-path-a-number", lambda c: study_with_key(c, lambda k: k["models"]["a"].update(path=5)),
         "{tmp}/study/key.json is not a study key written by rate build: model a lacks a name, option or path"),
    Case("rate-results-key-same-names",
         lambda c: study_with_key(c, lambda k: [m.update(name="run") for m in k["models"].values()]),
         "{tmp}/study/key.json is not a study key written by rate build: models a and b are both named 'run'"),
    Case("rate-results-key-side-name", lambda c: study_with_key(c, lambda k: k["models"]["a"].update(name="Tie")),
         "{tmp}/study/key.json is not a study key written by rate build: a model is named 'Tie'"),
    Case("rate-results-key-slots-a-dict",
         lambda c: study_with_key(c, lambda k: [p.update(slots={"a": 0, "b": 1}) for p in k["pairs"]]),
         "{tmp}/study/key.json is not a study key written by rate build: its pairs are not a list"),
    Case("rate-results-key-story-twice", lambda c: study_with_key(c, lambda k: k["pairs"].append(k["pairs"][0])),
         "{tmp}/study/key.json is not a study key written by rate build: a story appears twice"),
    Case("rate-results-old-key-without-path", lambda c: old_study(c, lambda k: k["models"]["a"].pop("path")),
         "{tmp}/old/study.json is not a study key written by rate build: model a lacks a name, option or path"),
    # arena
    Case("arena-sample-missing-data", lambda c: arena_sample_args(c, c.tmp / "none.jsonl"),
         "--data {tmp}/none.jsonl not found"),
    Case("arena-sample-data-not-json", lambda c: arena_sample_args(c, c.file("d.jsonl", "{not json\n")),
         "{tmp}/d.jsonl line 1: not valid JSON"),
    Case("arena-sample-not-opening", lambda c: arena_sample_args(c, c.file("d.jsonl", '{"id": "1"}\n')),
         "{tmp}/d.jsonl line 1 is not an OpenING record (no total_uid or subtask_name)"),
    Case("arena-sample-folder-without-data", lambda c: arena_sample_args(c, c.file("o/notes.txt", "x").parent),
         "--data {tmp}/o holds none of test_data.jsonl, dev_data.jsonl, stories.jsonl; give the file"),
    Case("arena-sample-unknown-model", lambda c: arena_sample_args(
        c, None, "--models", "gill,Nope", "--baseline", str(c.file("b.json", '[{"0": {"name": "gill"}}, '
                                                                        '{"1": {"name": "Emu2"}}]'))),
         "--models: 'Nope' is not in {tmp}/b.json; it names gill, Emu2"),
    Case("arena-sample-not-a-model-list", lambda c: arena_sample_args(c, None, "--baseline",
                                                                      str(c.file("b.json", '{"0": "gill"}'))),
         "{tmp}/b.json is not OpenING's baseline_models.json"),
    Case("arena-sample-one-model", lambda c: arena_sample_args(c, None, "--models", "gill"),
         "an arena needs at least 2 models"),
    Case("arena-sample-no-pairs", lambda c: arena_sample_args(c, None, "--per-instance", "0"),
         "--per-instance must be at least 1"),
    Case("arena-sample-too-few-models", lambda c: arena_sample_args(c, None, "--per-instance", "2"),
         "--per-instance 2 needs more models: with 3, an instance gets at most 1 pair"),
    Case("arena-results-missing", lambda c: ["arena", "results", str(c.tmp / "none.json"), "-o", str(c.tmp / "r.json")],
         "{tmp}/none.json not found"),
    Case("arena-results-not-json", lambda c: arena_results_args(c, c.file("j.json", "[{")),
         "{tmp}/j.json: not valid JSON"),
    Case("arena-results-not-a-list", lambda c: arena_results_args(c, c.file("j.json", '{"A": 1}')),
         "{tmp}/j.json is not a list of judgements"),
    Case("arena-results-no-winner", lambda c: arena_results_args(c, c.file("j.json", json.dumps(
        [{"data_id": "1", "model_A": {"id": "0", "name": "a"}, "model_B": {"id": "1", "name": "b"}}]))),
         "{tmp}/j.json record 1 is not a judgement: it needs data_id, model_A and model_B"),
    Case("arena-results-jsonl-no-model", lambda c: arena_results_args(c, c.file("j.jsonl", '{"data_id": "1", '
                                                                               '"winner": "A"}\n')),
         "{tmp}/j.jsonl line 1 is not a judgement"),
    Case("arena-results-empty", lambda c: arena_results_args(c, c.file("j.json", "[]")), "no judgements in {tmp}/j.json"),
    Case("arena-results-compat", lambda c: arena_results_args(c, c.file("j.json", "[]"), "--compat", "isg"),
         "--compat 'isg': the choices are opening"),
    # demo
    Case("demo-port-in-use", lambda c: ["demo", "--port", str(port_in_use(c))], "port "),
    Case("demo-missing-model", lambda c: ["demo", "--port", str(free_port()), "--model", str(c.tmp / "none")],
         "model not found: {tmp}/none"),
    Case("demo-unknown-host", lambda c: ["demo", "--host", "no-such-host.invalid"],
         "--host no-such-host.invalid is not an address of this machine"),
    # the optional extras, missing
    Case("rate-results-without-matplotlib", lambda c: without(c, "matplotlib") + results_args(c),
         "rate results draws its plot with matplotlib: pip install 'minigpt5[rate]'"),
    Case("demo-without-gradio", lambda c: without(c, "gradio") + ["demo", "--port", str(free_port())],
         "the demo needs Gradio: pip install 'minigpt5[demo]'"),
    # the released model's prompts and image preprocessing: for a BLIP-2 LLM only
    Case("train-official-prompts-for-llava", lambda c: train_args(c, f"data.train={PAIRS}",
                                                                  "data.prompt_format=official"),
         "data.prompt_format=official writes images as a BLIP-2 LLM reads them; this LLM's processor writes its own"),
    Case("train-official-images-for-llava", lambda c: train_args(c, f"data.train={PAIRS}",
                                                                 "data.image_preprocessing=official"),
         "data.image_preprocessing=official is the released MiniGPT-5's, for a BLIP-2 LLM"),
    Case("train-negative-eos-id", lambda c: train_args(c, "sample.eos_ids=[1, -1]"),
         "recipe key 'sample.eos_ids' holds token ids, none below 0; got [1, -1]"),
    # judge --benchmark opening (IntJudge), arena results --human and --study
    Case("judge-opening-no-pairs", lambda c: opening_judge_args(c, pairs=""), "--benchmark opening needs --pairs"),
    Case("judge-opening-output-not-jsonl", lambda c: opening_judge_args(c, out="j.json"),
         "--output {tmp}/j.json: name it .jsonl"),
    Case("judge-opening-exports-missing", lambda c: opening_judge_args(c, "--exports", str(c.tmp / "none")),
         "--exports {tmp}/none is not a folder"),
    Case("judge-opening-data-not-a-folder", lambda c: opening_judge_args(c, "--data", str(c.file("d.txt", "x"))),
         "--data {tmp}/d.txt is not a folder"),
    Case("judge-opening-pairs-missing", lambda c: opening_judge_args(c, "--pairs", str(c.tmp / "none.json")),
         "{tmp}/none.json not found"),
    Case("judge-opening-not-pairs", lambda c: opening_judge_args(c, pairs='[{"data_id": "1"}]'),
         "{tmp}/pairs.json record 1 is not a pair: it needs data_id, model_A and model_B"),
    Case("judge-opening-no-pairs-in-file", lambda c: opening_judge_args(c, pairs="[]"), "no pairs in {tmp}/pairs.json"),
    Case("judge-opening-missing-output",
         lambda c: [*opening_judge_args(c), (c.tmp / "exp/Y_output/1.json").unlink()][:-1],
         "no output Y_output/1.json in --exports {tmp}/exp (1 output file missing)"),
    Case("judge-opening-model-leads-out", lambda c: opening_judge_args(c, pairs=json.dumps(
        [{"data_id": "1", "model_A": {"id": "0", "name": "../X"}, "model_B": {"id": "1", "name": "Y"}}])),
         "model '../X', instance '1': {tmp}/exp/../X_output/1.json leads outside --exports {tmp}/exp"),
    Case("judge-opening-not-an-output", lambda c: opening_judge_args(c, x='{"conversations": []}'),
         "{tmp}/exp/X_output/1.json is not an OpenING output"),
    Case("judge-opening-other-inputs",
         lambda c: opening_judge_args(c, y=opening_record([{"image": None, "text": "?"}])),
         "{tmp}/exp/X_output/1.json and {tmp}/exp/Y_output/1.json answer different inputs"),
    Case("judge-opening-no-data", lambda c: opening_judge_args(c, data=False),
         "{tmp}/exp/X_output/1.json: its input holds images; give --data"),
    Case("judge-opening-input-leads-out", lambda c: opening_judge_args(
        c, x=opening_record([{"image": "../x.png", "text": "a"}]), y=opening_record([{"image": None, "text": "a"}])),
         "{tmp}/exp/X_output/1.json: input image '../x.png' leads outside --data {tmp}/data"),
    Case("judge-opening-input-missing", lambda c: opening_judge_args(
        c, x=opening_record([{"image": "images/none.png", "text": "a"}]),
        y=opening_record([{"image": None, "text": "a"}])),
         "{tmp}/exp/X_output/1.json: input image {tmp}/data/images/none.png not found"),
    Case("judge-opening-output-image-linked-out", opening_output_linked_out,
         "{tmp}/exp/X_output/1.json: image '1-o-0.png' leads outside its folder"),
    Case("judge-opening-output-not-judgements", lambda c: [c.file("j.jsonl", '{"a": 1}\n'), *opening_judge_args(c)][1:],
         "{tmp}/j.jsonl line 1 is not a judgement"),
    Case("judge-opening-output-foreign", lambda c: [c.file("j.jsonl", "my notes"), *opening_judge_args(c)][1:],
         "{tmp}/j.jsonl does not end with a judgement"),
    Case("judge-opening-prompts-no-script", lambda c: opening_judge_args(c, "--prompts", str(c.tmp)),
         "--prompts {tmp}: no IntJudge_judge_AB.py in it"),
    Case("judge-opening-prompts-no-message", lambda c: opening_judge_args(
        c, "--prompts", str(c.file("o/IntJudge_judge_AB.py", "SYSTEM_MESSAGE = open('s').read()\n").parent)),
         "{tmp}/o/IntJudge_judge_AB.py: no SYSTEM_MESSAGE string in it"),
    Case("judge-opening-text-only-judge", opening_text_only_judge, "--judge '{tmp}/judge' is a text-only model"),
    Case("arena-results-human-missing", lambda c: arena_results_args(c, c.file("j.json", json.dumps(
        [{"data_id": "1", "model_A": {"id": "0", "name": "a"}, "model_B": {"id": "1", "name": "b"}, "winner": "A"}])),
        "--human", str(c.tmp / "h.json")), "{tmp}/h.json not found"),
    Case("arena-results-study-without-human", lambda c: agreement_args(c, human=False),
         "--study needs --human: the answer files its raters exported"),
    Case("arena-results-study-question", lambda c: agreement_args(c, "--question", "style"),
         "--question 'style': the study asks language, image, together"),
    Case("arena-results-study-none-rated", agreement_args, "no judged battle was rated in {tmp}/study: it compares"),
    Case("arena-results-study-not-a-study",
         lambda c: agreement_args(c, "--study", str(c.file("s/notes.txt", "x").parent)),
         "{tmp}/s is not a study folder"),
    # judge --benchmark isg|mmie, scores
    Case("judge-isg-no-api", lambda c: [a for a in benchmark_judge_args(c, "isg") if not a.startswith(("--api", "http"))],
         "--benchmark isg needs --api"),
    Case("judge-isg-api-not-http", lambda c: benchmark_judge_args(c, "isg", "--api", "ftp://x"),
         "--api 'ftp://x' is not an http:// or https:// URL"),
    Case("judge-isg-no-prompts", lambda c: benchmark_judge_args(c, "isg", prompts=""), "--benchmark isg needs --prompts"),
    Case("judge-isg-prompts-missing", lambda c: benchmark_judge_args(c, "isg", "--prompts", str(c.tmp / "none")),
         "--prompts: {tmp}/none/ISG_eval/get_judge_prompt.py not found"),
    Case("judge-isg-prompts-lacking", lambda c: benchmark_judge_args(c, "isg", prompts="_DSG_PROMPT = 1\n"),
         "{tmp}/bench/ISG_eval/get_judge_prompt.py lacks _TEXT_TEXT_JUDGE_PROMPT, _TEXT_IMAGE_JUDGE_PROMPT"),
    Case("judge-isg-prompts-not-python", lambda c: benchmark_judge_args(c, "isg", prompts="x = (\n"),
         "--prompts: {tmp}/bench/ISG_eval/get_judge_prompt.py is not Python this version can read"),
    Case("judge-isg-output-not-jsonl", lambda c: benchmark_judge_args(c, "isg", out="j.json"),
         "--output {tmp}/j.json: name it .jsonl"),
    Case("judge-isg-exports-empty", lambda c: benchmark_judge_args(c, "isg", "--exports", str(c.tmp / "data")),
         "--exports {tmp}/data holds no .jsonl export"),
    Case("judge-isg-not-a-record", lambda c: benchmark_judge_args(c, "isg", records=[{"id": "0"}]),
         "{tmp}/exp/m.jsonl line 1 is not an ISG-Bench record"),
    Case("judge-isg-questions-not-objects", lambda c: benchmark_judge_args(c, "isg", records=[isg_record(
        predict={"image_qa": {"questions": [{"id": [0], "Preliminary": []}]}})]),
         "{tmp}/exp/m.jsonl line 1 is not an ISG-Bench record"),
    Case("judge-isg-not-blocks", lambda c: benchmark_judge_args(c, "isg", records=[isg_record(output=[{"type": "video"}])]),
         "{tmp}/exp/m.jsonl line 1: output is not a list of blocks"),
    Case("judge-isg-twice", lambda c: benchmark_judge_args(c, "isg", records=[isg_record(), isg_record()]),
         "{tmp}/exp/m.jsonl line 2: id '0' appears twice"),
    Case("judge-isg-image-leads-out", lambda c: benchmark_judge_args(c, "isg", records=[isg_record(
        Golden=[{"type": "image", "content": "../exp/images/q.png"}])]),
         "{tmp}/exp/m.jsonl line 1: image '../exp/images/q.png' lies outside {tmp}/data"),
    Case("judge-isg-image-missing", lambda c: benchmark_judge_args(c, "isg", records=[isg_record(
        output=[{"type": "image", "content": "none.png"}])]), "{tmp}/exp/m.jsonl line 1: image {tmp}/exp/none.png not found"),
    Case("judge-mmie-no-prompts", lambda c: benchmark_judge_args(c, "mmie", prompts=""),
         "--benchmark mmie needs --prompts"),
    Case("judge-mmie-rubric-missing", lambda c: benchmark_judge_args(c, "mmie", prompts=MMIE_PROMPTS.replace("MSR", "X")),
         "{tmp}/bench/prompts.py lacks the MSR rubric"),
    Case("judge-mmie-not-a-list", lambda c: benchmark_judge_args(c, "mmie", records={"id": "SA_1"}),
         "{tmp}/exp/m.json is not MMIE's format"),
    Case("judge-mmie-not-a-sample", lambda c: benchmark_judge_args(c, "mmie", records=[{"id": "SA_1", "answer": 1}]),
         "{tmp}/exp/m.json sample 1 is not an MMIE sample"),
    Case("judge-mmie-no-task", lambda c: benchmark_judge_args(c, "mmie", records=[
        {"id": "X_1", "question": [], "answer": "a", "gt_answer": [{"text": None}]}]),
         "{tmp}/exp/m.json sample 1: id 'X_1' names none of SA, PBL, MSR"),
    Case("judge-mmie-image-missing", lambda c: benchmark_judge_args(c, "mmie", records=[
        {"id": "SA_1", "question": [{"text": "q", "image": "none.png"}], "answer": "a", "gt_answer": [{"text": None}]}]),
         "1 image not found, the first {tmp}/data/none.png"),
    Case("judge-isg-output-an-export", lambda c: [c.file("j.jsonl", json.dumps(isg_record()) + "\n"),
                                                  *benchmark_judge_args(c, "isg")][1:],
         "{tmp}/j.jsonl is not a judgement file of ISG-Bench; give another --output"),
    Case("judge-isg-output-id-a-list", lambda c: [c.file("j.jsonl", json.dumps(
        {"id": ["0"], "Category": "c", "model": "m", "judge": "j"}) + "\n"), *benchmark_judge_args(c, "isg")][1:],
         "{tmp}/j.jsonl is not a judgement file of ISG-Bench; give another --output"),
    Case("judge-isg-exports-nested-deep", lambda c: [c.file("exp/deep.jsonl", "[" * 100000 + "\n"),
                                                     *benchmark_judge_args(c, "isg")][1:],
         "{tmp}/exp/deep.jsonl line 1: not valid JSON (nested too deeply)"),
    Case("judge-isg-output-foreign-end", lambda c: [c.file("j.jsonl", "my notes"),
                                                    *benchmark_judge_args(c, "isg")][1:],
         "{tmp}/j.jsonl does not end with a judgement"),
    Case("judge-mmie-output-an-export", lambda c: [c.file("j.jsonl", '{"id": "SA_1", "question": []}'),
                                                   *benchmark_judge_args(c, "mmie")][1:],
         "{tmp}/j.jsonl is not a judgement file of MMIE; give another --output"),
    Case("scores-benchmark", lambda c: scores_args(c, "opening", "{}"), "--benchmark 'opening': the choices are isg, mmie"),
    Case("scores-compat", lambda c: scores_args(c, "isg", "{}", "j.jsonl", "--compat", "mmie"),
         "--compat 'mmie': with --benchmark isg, the only choice is isg"),
    Case("scores-not-a-judgement", lambda c: scores_args(c, "isg", '{"Category": "HowTo"}\n'),
         "{tmp}/j.jsonl line 1 is not a judgement"),
    Case("scores-mmie-not-a-list", lambda c: scores_args(c, "mmie", '{"id": "SA_1"}', "j.json"),
         "{tmp}/j.json is not a list of judgements"),
    Case("scores-mmie-no-feedback", lambda c: scores_args(c, "mmie", '[{"id": "SA_1", "model": "m"}]', "j.json"),
         "judgement 'SA_1' of m has no gpt_feedback"),
    Case("scores-empty", lambda c: scores_args(c, "mmie", "", "j.jsonl"), "no judgements in {tmp}/j.jsonl"),
    # prepare-data opening|isg|mmie and export
    Case("prepare-opening-both-splits", lambda c: ["prepare-data", "opening", "--input",
                                                   str(beside(c, "opening", "dev_data.jsonl", "")), "-o", str(c.tmp / "d")],
         "{tmp}/raw/OpenING-benchmark holds both test_data.jsonl and dev_data.jsonl; pick one with --split"),
    Case("prepare-opening-unknown-split", lambda c: ["prepare-data", "opening", "--input",
                                                     str(benchmark(c, "opening").parent), "--split", "train", "-o",
                                                     str(c.tmp / "d")], "--split 'train': OpenING's splits are test and dev"),
    Case("prepare-isg-split", lambda c: ["prepare-data", "isg", "--input", str(benchmark(c, "isg")), "--split", "test",
                                         "-o", str(c.tmp / "d")], "--split applies to OpenING (test or dev)"),
    Case("prepare-isg-no-data-file", lambda c: ["prepare-data", "isg", "--input", str(c.file("e/x.txt", "").parent),
                                                "-o", str(c.tmp / "d")], "{tmp}/e holds no ISG-Bench.jsonl"),
    Case("prepare-mmie-two-files", lambda c: ["prepare-data", "mmie", "--input", str(beside(c, "mmie", "more.json", "[]")),
                                              "-o", str(c.tmp / "d")],
         "{tmp}/raw/mmie holds 2 JSON files beside overview.json; give the data file"),
    Case("prepare-mmie-not-a-list", lambda c: ["prepare-data", "mmie", "--input", str(c.file("m.json", '{"id": "SA"}')),
                                               "-o", str(c.tmp / "d")], "{tmp}/m.json is not MMIE's data"),
    Case("prepare-benchmark-continuation", lambda c: ["prepare-data", "isg", "--input", str(benchmark(c, "isg")),
                                                      "--continuation", "-o", str(c.tmp / "d")],
         "--continuation does not apply to isg"),
    Case("prepare-benchmark-image-size", lambda c: ["prepare-data", "mmie", "--input", str(benchmark(c, "mmie")),
                                                    "--image-size", "256", "-o", str(c.tmp / "d")],
         "--image-size does not apply to mmie: its images and texts are kept as they are"),
    Case("prepare-opening-strict", lambda c: ["prepare-data", "opening", "--strict", "-o", str(c.tmp / "d"), "--input",
                                              str(beside(c, "opening", "bad.jsonl", '{"total_uid": "0101001"}\n')
                                                  / "bad.jsonl")],
         '0101001: malformed record (expected "conversations"'),
    Case("export-unknown-format", lambda c: export_args(c, "--gold", fmt="vist", source="isg"),
         "--format 'vist': the choices are opening, isg, mmie"),
    Case("export-neither-answers", lambda c: export_args(c), "give either --generated"),
    Case("export-both-answers", lambda c: export_args(c, "--gold", "--generated", str(c.tmp / "g")),
         "give either --generated"),
    Case("export-name-not-a-file-name", lambda c: export_args(c, "--gold", "--name", "../m"),
         "--name '../m': a model's name is a file name here"),
    Case("export-data-not-prepared", lambda c: ["export", "--format", "isg", "--gold", "--data",
                                                str(c.file("e/x.txt", "").parent), "--name", "m", "-o", str(c.tmp / "x")],
         "--data {tmp}/e holds no stories.jsonl"),
    Case("export-other-benchmark", lambda c: export_args(c, "--gold", source="isg"),
         "{tmp}/d/stories.jsonl holds isg stories, not opening"),
    Case("export-generated-missing", lambda c: export_args(c, "--generated", str(c.tmp / "none")),
         "--generated {tmp}/none is not a folder generate wrote"),
    Case("export-stories-missing", lambda c: export_args(c, "--generated", str(generated(c, "g", ["0301098"],
                                                                                         "Draw a lighthouse."))),
         "--generated {tmp}/g lack 2 stories of {tmp}/d/stories.jsonl, the first '0301096'; pass --partial"),
    Case("export-another-input", lambda c: export_args(c, "--generated", str(generated(c, "g", ["0301098"]))),
         "{tmp}/g/0301098/story.json continues another input than story '0301098'"),
    Case("export-over-an-export", export_twice, "{tmp}/exp/m_output exists; pass --overwrite to replace it"),
    Case("prepare-opening-no-data-file", lambda c: ["prepare-data", "opening", "--input", str(c.file("e/x.txt", "").parent),
                                                    "-o", str(c.tmp / "d")],
         "{tmp}/e holds no test_data.jsonl or dev_data.jsonl"),
    Case("prepare-opening-split-of-another-file", lambda c: ["prepare-data", "opening", "--input",
                                                             str(benchmark(c, "opening")), "--split", "dev", "-o",
                                                             str(c.tmp / "d")],
         "--split dev names another file than {tmp}/raw/OpenING-benchmark/test_data.jsonl"),
    Case("prepare-isg-missing-input", lambda c: ["prepare-data", "isg", "--input", str(c.tmp / "none"), "-o",
                                                 str(c.tmp / "d")], "input not found: {tmp}/none"),
    Case("export-data-not-a-story", lambda c: ["export", "--format", "isg", "--gold", "--data",
                                               str(c.file("e/stories.jsonl", '{"id": "1"}\n').parent), "--name", "m",
                                               "-o", str(c.tmp / "x")],
         "{tmp}/e/stories.jsonl line 1 is not a story prepare-data wrote for a benchmark"),
    Case("export-no-stories", lambda c: ["export", "--format", "isg", "--gold", "--data",
                                         str(c.file("e/stories.jsonl", "\n").parent), "--name", "m", "-o", str(c.tmp / "x")],
         "{tmp}/e/stories.jsonl holds no stories"),
    Case("export-story-twice", lambda c: export_generated(c, lambda f: shutil.copytree(f, f.with_name("again"))),
         "story '0301098' is in both {tmp}/g/0301098 and {tmp}/g/again"),
    Case("export-story-image-missing", lambda c: export_generated(c, lambda f: (f / "image-1.png").unlink()),
         "{tmp}/g/0301098/story.json: its image 'image-1.png' is not a file in {tmp}/g/0301098"),
    Case("export-story-linked-out", lambda c: export_generated(c, lambda f: shutil.move(f, c.tmp / "elsewhere") and
                                                               f.symlink_to(c.tmp / "elsewhere")),
         "{tmp}/g/0301098 leads outside --generated {tmp}/g"),
    Case("export-over-another-image", export_over_other_image,
         "{tmp}/exp/images/0000_q1.png is not the image of {tmp}/d at that path"),
    Case("export-id-not-a-file-name", lambda c: ["export", "--format", "opening", "--gold", "--data", str(c.file(
        "e/stories.jsonl", json.dumps({"id": "../x", "benchmark": "opening", "source": {}, "steps": [], "blocks": [],
                                       "reference": []}) + "\n").parent), "--name", "m", "-o", str(c.tmp / "x")],
         "{tmp}/e/stories.jsonl: story id '../x' is not a plain file name"),
    Case("export-story-image-leads-out", export_image_leading_out,
         "{tmp}/d/stories.jsonl line 1: story '0000' names image '../d/images/0000_g1.png': the folder was not"),
    Case("export-story-image-with-nul", export_image_with_nul,
         "{tmp}/d/stories.jsonl line 1: story '0000' names image 'images/0000\\x00g1.png': the folder was not"),
    Case("export-output-folder-linked-out", export_into_linked_folder,
         "{tmp}/exp/images/0000_q1.png leads outside --output {tmp}/exp"),
    # import-official: the original files checked name by name before anything is written
    Case("import-official-missing-key", lambda c: official_args(c, lambda s: s.pop("fc.0.bias")),
         "--stage1 {tmp}/stage1.ckpt lacks fc.0.bias"),
    Case("import-official-extra-key", lambda c: official_args(c, lambda s: s.update({"fc.1.weight": s["fc.0.bias"]})),
         "--stage1 {tmp}/stage1.ckpt holds fc.1.weight, which this layout has no place for"),
    Case("import-official-wrong-shape", lambda c: official_args(c, lambda s: s.update(
        {"t2i_decoder_prompt": s["t2i_decoder_prompt"].repeat(1, 2, 1)})),
         "--stage1 {tmp}/stage1.ckpt: t2i_decoder_prompt is [1, 32, 32], expected [1, 16, 32]"),
    Case("import-official-stage2-as-stage1", lambda c: official_args(c, stage1="stage2.ckpt", stage2=None),
         "--stage1 {tmp}/stage2.ckpt is a stage-2 checkpoint; give it as --stage2"),
    Case("import-official-stage1-as-stage2", lambda c: official_args(c, stage2="stage1.ckpt"),
         "--stage2 {tmp}/stage1.ckpt is a stage-1 checkpoint; give it as --stage1"),
    Case("import-official-not-a-lightning-file", lambda c: official_args(c, stage2="lavis/eva_vit_g.pth"),
         "--stage2 {tmp}/lavis/eva_vit_g.pth holds no 'state_dict' mapping"),
    Case("import-official-eva-missing-key", lambda c: lavis_args(c, eva=spoiled_eva()),
         "--eva-vit {tmp}/lavis/eva_vit_g.pth lacks blocks.1.mlp.fc2.bias"),
    Case("import-official-eva-unknown-key", lambda c: lavis_args(c, eva=spoiled_eva(unknown=True)),
         "--eva-vit {tmp}/lavis/eva_vit_g.pth holds blocks.0.ls1, which this layout has no place for"),
    Case("import-official-not-only-tensors", lambda c: lavis_args(c, eva=not_only_tensors()),
         "--eva-vit {tmp}/lavis/eva_vit_g.pth holds more than tensors (argparse.Namespace)"),
    Case("import-official-not-a-torch-file", lambda c: official_args(c, stage2=c.file("s.ckpt", "text").name),
         "--stage2 {tmp}/s.ckpt is not a torch weight file"),
    Case("import-official-output-not-ours", lambda c: lavis_args(c) + ["--output", str(c.file("mine/a", "x").parent),
                                                                       "--overwrite"],
         "{tmp}/mine is not a folder import-official wrote; --overwrite replaces only such a folder"),
    Case("import-official-output-in-base", lambda c: official_args(c) + ["--output", str(c.tmp / "base" / "x")],
         "--output {tmp}/base/x overlaps {tmp}/base, an input; write it elsewhere"),
    Case("import-official-base-not-imported", lambda c: ["import-official", "minigpt5", "--stage1",
                                                         str(c.file("s1.ckpt", "x")), "--base", str(c.tmp / "nobase"),
                                                         "--upstream", str(c.tmp), "--output", str(c.tmp / "out")],
         "--base {tmp}/nobase is not a folder import-official minigpt4 wrote"),
    # import-official: the system prompts read from the original's dataloader.py, never run
    Case("import-official-upstream-without-dataloader", lambda c: spoiled_upstream(c, None),
         "--upstream {tmp}/MiniGPT-5 has no dataloader.py; give a checkout of eric-ai-lab/MiniGPT-5"),
    Case("import-official-upstream-not-python", lambda c: spoiled_upstream(c, "class VISTDataset(:\n"),
         "--upstream: {tmp}/MiniGPT-5/dataloader.py is not Python this version can read"),
    Case("import-official-upstream-without-dialogue-prompt", lambda c: spoiled_upstream(
        c, "class VISTDataset:\n    system_prompt1 = 'a'\nclass MMDialogDataset:\n    system_prompt = make()\n"),
         "--upstream {tmp}/MiniGPT-5/dataloader.py assigns no string to system_prompt in MMDialogDataset (the "
         "dialogue system prompt)"),
    Case("import-official-vit-deeper-than-the-file", lambda c: lavis_args(c) + ["--vision-layers", "4"],
         "--eva-vit {tmp}/lavis/eva_vit_g.pth holds 3 ViT blocks, fewer than the 4 of --vision-layers"),
    Case("import-official-pos-embed-no-grid", lambda c: reshaped(c, "eva", "pos_embed", 1, 0, 16),
         "--eva-vit {tmp}/lavis/eva_vit_g.pth: pos_embed [1, 0, 16] is not a square grid plus a class token"),
    Case("import-official-vit-width-zero", lambda c: reshaped(c, "eva", "cls_token", 1, 1, 0) + ["--vision-heads", "2"],
         "--eva-vit {tmp}/lavis/eva_vit_g.pth: width 0 does not split into 2 attention heads"),
    Case("import-official-pos-embed-1d", lambda c: reshaped(c, "eva", "pos_embed", 5),
         "--eva-vit {tmp}/lavis/eva_vit_g.pth: pos_embed is [5], expected 3 dimensions"),
    Case("import-official-cls-token-0d", lambda c: reshaped(c, "eva", "cls_token"),
         "--eva-vit {tmp}/lavis/eva_vit_g.pth: cls_token is [], expected 3 dimensions"),
    Case("import-official-query-tokens-1d", lambda c: reshaped(c, "blip2", "query_tokens", 16),
         "--qformer {tmp}/lavis/blip2_pretrained_flant5xxl.pth: query_tokens is [16], expected 3 dimensions"),
    Case("import-official-cross-key-1d", lambda c: reshaped(
        c, "blip2", "Qformer.bert.encoder.layer.0.crossattention.self.key.weight", 16),
         "--qformer {tmp}/lavis/blip2_pretrained_flant5xxl.pth: Qformer.bert.encoder.layer.0.crossattention.self.key."
         "weight is [16], expected 2 dimensions"),
    Case("import-official-base-without-weights", lambda c: damaged_base(
        c, lambda base: (base / "model.safetensors").unlink()), "--base {tmp}/base is damaged: "),
    Case("import-official-base-damaged-shard", lambda c: damaged_base(
        c, lambda base: (base / "model.safetensors").write_bytes(b"\x08" + bytes(40))), "--base {tmp}/base is damaged: "),
    Case("import-official-base-damaged-index", lambda c: damaged_base(
        c, lambda base: (base / "model.safetensors.index.json").write_text("{")), "--base {tmp}/base is damaged: "),
    Case("import-official-image-token-in-story", image_token_in_story,
         "a story step's text holds <image>, the LLM's image token, which would take an image's place: "
         "'a circle <image> here.'"),
    Case("import-official-base-index-leads-out", lambda c: damaged_base(
        c, lambda base: base_index(base, "../stage1.ckpt")),
         "--base {tmp}/base is damaged: its index places language_model.model.embed_tokens.weight in "
         "{tmp}/base/../stage1.ckpt, outside it"),
    Case("train-negative-min-images", lambda c: train_args(c, "sample.min_images=-1"),
         "recipe key 'sample.min_images' must be at least 0, got -1"),
    Case("generate-negative-min-images", lambda c: generate_args(c, c.file("s.json", '{"steps": [{"text": "a"}]}'),
                                                                 "--min-images", "-1"),
         "--min-images must be at least 0, got -1"),
]


def arena_sample_args(c: Ctx, data: Path | None, *extra: str) -> list[str]:
    """arena sample on `data` (one OpenING record when None), models a, b and c unless `extra` says."""
    if data is None:
        data = c.file("test_data.jsonl", '{"total_uid": "0101001", "subtask_name": "Recipe"}\n')
    models = [] if "--models" in extra or "--baseline" in extra else ["--models", "a,b,c"]
    return ["arena", "sample", "--data", str(data), *models, "--per-instance", "1", *extra, "-o", str(c.tmp / "p.json")]


def arena_results_args(c: Ctx, judgements: Path, *extra: str) -> list[str]:
    return ["arena", "results", str(judgements), "-o", str(c.tmp / "r.json"), *extra]


def generated(c: Ctx, name: str, ids: list[str], text: str = "a circle.", doc: str | None = None) -> Path:
    """A folder as generate writes it for stories `ids`: a folder per story, its story.json and image."""
    for sid in ids:
        (c.tmp / name / sid).mkdir(parents=True)
        shutil.copy(IMAGES / "red_circle.png", c.tmp / name / sid / "image-1.png")
        record = {"id": sid, "input": [{"text": text, "image": None, "source": None}], "mode": "vokens",
                  "generated": [{"text": "here it is.", "images": ["image-1.png"],
                                 "segments": [{"text": "here it is."}, {"image": "image-1.png"}]}]}
        c.file(f"{name}/{sid}/story.json", doc if doc is not None else json.dumps(record))
    return c.tmp / name


def rate_build_args(c: Ctx, a: Path, b: Path, *extra: str, out: Path | None = None) -> list[str]:
    return ["rate", "build", "--a", str(a), "--b", str(b), "--output", str(out or c.tmp / "study"), "--seed", "1",
            *extra]


def study(c: Ctx) -> Path:
    """A study of two stories, built by rate build (seed 1)."""
    if not (c.tmp / "study").exists():
        assert run_cli(*rate_build_args(c, generated(c, "a", ["s1", "s2"]), generated(c, "b", ["s1", "s2"]))) == 0
    return c.tmp / "study"


def results_args(c: Ctx, *extra: str, **fields) -> list[str]:
    """rate results on a study and one rater's export (its `fields` replaced), then `extra`."""
    folder = study(c)
    return ["rate", "results", str(folder), str(answers(c, folder, **fields)), *extra]


def answers(c: Ctx, folder: Path, name: str = "r.json", language: str | None = "A", **fields) -> Path:
    """A rater's export for the study in `folder`, one pair answered; `fields` replace its own."""
    key = json.loads((folder / "key.json").read_text())
    pair = {"id": fields.pop("id", "s1"), "position": 1, "shown": [0, 1], "answers": {"language": language}}
    doc = {"format": "minigpt5-rating", "study": key["study"], "seed": key["page_seed"], "rater": "r", "pairs": [pair]}
    return c.file(name, json.dumps({**doc, **fields}))


def without(c: Ctx, package: str) -> list[str]:
    """`package` cannot be imported for the rest of the case, as where it is not installed."""
    import sys

    c.monkeypatch.setitem(sys.modules, package, None)
    return []


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(c: Ctx) -> int:
    """A port another program listens on, until the case is over."""
    import socket
    import weakref

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    weakref.finalize(c, s.close)
    return s.getsockname()[1]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, runs, tmp_path, capsys, monkeypatch):
    ctx = Ctx(tmp_path, runs, monkeypatch)
    argv = [str(a) for a in case.argv(ctx)]
    before = snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = run_cli(*argv)
    finally:
        for p in tmp_path.rglob("*"):  # let pytest clean up read-only folders
            if p.is_dir():
                p.chmod(0o755)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: " + case.message.format(tmp=tmp_path, runs=runs)), lines[0]
    after = snapshot(tmp_path)
    assert {k: after.get(k) for k in before} == before, "files that were there before changed"
    assert not [p for p in after if any(m in p for m in (".partial", ".tmp", ".old-"))], "a temporary was left"


def test_the_stages_refuse_what_the_command_line_refuses(runs, tmp_path):
    """Each stage checks its own inputs: called from Python, it refuses as the command does."""
    from minigpt5_cli.data import prepare
    from minigpt5_cli.errors import UserError
    from minigpt5_cli.evaluation import evaluate
    from minigpt5_cli.generation import generate
    from minigpt5_cli.generation.settings import Settings
    from minigpt5_cli.modeling.bundle import bundle

    (tmp_path / "a-file").write_text("x")
    refusals = [
        (lambda: prepare.prepare("cc3m", None, tmp_path / "out"), "needs --input"),
        (lambda: prepare.prepare("cc3m", PAIRS, tmp_path / "out", prepare.Settings(cache_dtype="int8")),
         "--cache-dtype must be float32 or float16"),
        (lambda: evaluate.evaluate(PAIRS, PAIRS, evaluate.Settings(metrics=["bleu1"], is_splits=0),
                                   tmp_path / "m.json"), "--is-splits"),
        (lambda: evaluate.evaluate(PAIRS, PAIRS, evaluate.Settings(metrics=["bleu1"]),
                                   tmp_path / "a-file" / "m.json"), "a-file: it is a file"),
        (lambda: generate.load(str(runs / "s2"), precision="fp8"), "unknown precision 'fp8'"),
        (lambda: generate.check(Settings(top_p=2.0), tmp_path / "out", runs / "s2"), "--top-p"),
        (lambda: generate.check(Settings(), runs / "s2" / "out", runs / "s2"), "inside the model folder"),
        (lambda: bundle(runs / "s2", tmp_path / "a-file" / "bundle"), "a-file: it is a file"),
    ]
    for call, message in refusals:
        with pytest.raises(UserError, match=message):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"], "nothing was written"
