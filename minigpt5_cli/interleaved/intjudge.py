"""OpenING's pairwise judge, IntJudge (a Qwen2-VL fine-tune), over exported model outputs.

Each pair of the pair file names an instance and two models; their answers are read from
`EXP/<model>_output/<data_id>.json` (OpenING's layout, `minigpt5 export --format opening`), output images by
their file name beside it (a missing one counts as no image, as OpenING reads it), input images under the
prepared data folder. The prompt has OpenING's structure: a system message, then one user turn holding the
input after `<INPUT>: `, answer A after `<OUTPUT_A>: `, answer B after `<OUTPUT_B>: `, each image placed after
its step's text with a numbered tag `<IMG_k></IMG_k>` (numbers running on through input, A and B), and a
closing request for one of the four answers. The system message and the closing request are our own words
unless --prompts names an OpenING checkout: then its own are read (as text) from IntJudge_judge_AB.py, which
IntJudge was trained with. Greedy decoding, 128 new tokens, the model's other generation settings kept (as
OpenING's top-k 1 sampling keeps them: the same tokens). Images are read as every command reads them and
sized by the model's own processor (OpenING resizes them first with qwen_vl_utils, by the same rule).

Reading the answer: OpenING takes a first character A or B as that side's win (so "Both ..." is a win for
B), a "tie" start as `answer[:5] + ")"` (so "tie(a" stays lower case, which no score counts), else the
first A or B character anywhere as a tie leaning that way, else an unseeded coin. By default only whole
words count and case does not matter; compat "opening" reproduces theirs. The coin is seeded by --seed and
the battle, so reruns agree.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import typer

from minigpt5_cli.display import plural
from minigpt5_cli.errors import UserError
from minigpt5_cli.files import inside, python_tree, read_json
from minigpt5_cli.interleaved import api, arena

MAX_NEW_TOKENS = 128  # OpenING's
SCRIPT = "IntJudge_judge_AB.py"  # where OpenING's prompts are, in its repository
LABELS = {"a is better": "A", "b is better": "B", "tie(a is better)": "Tie(A)", "tie(b is better)": "Tie(B)"}
SYSTEM = ("You compare two answers to the same multimodal request, each of which may mix text and images. The "
          "request follows <INPUT>:, the first answer <OUTPUT_A>: and the second <OUTPUT_B>:. Decide which answer "
          "serves the request better.\n")
ASK = ('\nGive your verdict as exactly one of these labels, and nothing else: "A is better", "B is better", '
       '"Tie(A is better)", "Tie(B is better)".\n')

LEAD = b'{"data_id": '  # how every judgement line starts
Step = tuple[str, Path | None]  # a step's text and its image


@dataclass
class Battle:
    pair: dict  # the pair file's record
    inputs: list[Step]
    a: list[Step]
    b: list[Step]

    @property
    def key(self) -> str:
        return arena.key(self.pair)


# ---- prompts


def their_prompts(checkout: Path) -> tuple[str, str]:
    """OpenING's system message and closing request, read from its judge script's syntax tree (never run):
    the string assigned to SYSTEM_MESSAGE, and the string literal naming all four answers."""
    script = checkout / SCRIPT
    if not script.is_file():
        raise UserError(f"--prompts {checkout}: no {SCRIPT} in it; give a checkout of OpenING's repository")
    tree = python_tree(script, "--prompts")
    system = [n.value.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == "SYSTEM_MESSAGE" for t in n.targets)
              and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)]
    ask = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
           and all(f'"{label}"' in n.value.lower() for label in LABELS)]
    if not system or not ask:
        raise UserError(f"{script}: no {'SYSTEM_MESSAGE string' if not system else 'request naming the four answers'}"
                        " in it; is this OpenING's judge script?")
    return system[-1], ask[-1]


def _tagged(steps: list[Step], count: int) -> tuple[list[str], int]:
    """The steps' texts, stripped, `<image>` removed, each with an image tagged by the next number."""
    texts = []
    for text, image in steps:
        text = text.strip().replace("<image>", "")
        if image is not None:
            text += f" <IMG_{count}></IMG_{count}>"
            count += 1
        texts.append(text)
    return texts, count


def _content(texts: list[str], steps: list[Step]) -> list[dict]:
    out = []
    for text, (_, image) in zip(texts, steps):
        out.append({"type": "text", "text": text})
        if image is not None:
            out.append({"type": "image", "image": str(image)})
    return out


def messages(battle: Battle, system: str, ask: str) -> list[dict]:
    """The chat: the system message, then one user turn with the input, A's answer and B's, and the request."""
    inputs, count = _tagged(battle.inputs, 0)
    if inputs:
        inputs[0] = "<INPUT>: " + inputs[0]
    inputs = [t.replace("<BEGIN>", "") for t in inputs]
    content = _content(inputs, battle.inputs)
    for side, steps, lead in (("A", battle.a, ""), ("B", battle.b, "\n")):
        texts, count = _tagged(steps, count)
        marker = f"{lead}<OUTPUT_{side}>:"
        if texts and texts[0]:
            texts[0] = f"{marker} {texts[0]}"
        else:  # an empty answer still gets its marker, without the space
            texts[:1] = ["\n" + marker.lstrip("\n")]
        content += _content(texts, steps + [("", None)] * (len(texts) - len(steps)))
    content.append({"type": "text", "text": ask})
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


# ---- answers


def coin(seed: int, battle_key: str) -> str:
    """The side an unreadable verdict leans to, the same for the same seed and battle."""
    digest = hashlib.sha256(f"{seed}:{battle_key}".encode()).digest()
    return "Tie(A)" if random.Random(digest).random() < 0.5 else "Tie(B)"


def parse(text: str, toss: str) -> tuple[str, str]:
    """(winner, how): "exact" when the text is, or starts with, one of the four answers (any case), or is a
    bare A or B; "tie" when it starts with "tie" (the side from "tie(a"/"tie(b" or the first word A or B,
    else a plain Tie); "fallback" when "A/B is better" or a word A or B appears (the first decides: a win, or
    a tie leaning that way); else "coin" (`toss`)."""
    said = " ".join(text.split()).lower()
    start = re.match(r"(tie\([ab] is better\)|[ab] is better)(?!\w)", said)
    if start or said.rstrip(".") in ("a", "b"):
        return (LABELS[start.group(1)] if start else said[0].upper()), "exact"
    if said.startswith("tie"):
        side = re.match(r"tie\s*\(\s*([ab])\b", said) or re.search(r"\b([AB])\b", text.lstrip()[3:])
        return (f"Tie({side.group(1).upper()})" if side else "Tie"), "tie"
    better = re.search(r"\b([ab]) is (?:the )?better\b", said)
    if better:
        return better.group(1).upper(), "fallback"
    word = re.search(r"\b([AB])\b", text)
    if word:
        return f"Tie({word.group(1)})", "fallback"
    return toss, "coin"


def parse_opening(text: str, toss: str) -> tuple[str, str]:
    """(winner, how) as OpenING's judge script reads the answer (where it would fail on an empty answer,
    the coin)."""
    if text[:1] in ("A", "B"):
        return text[0], "exact"
    if text[:3].lower() == "tie":
        return text[:5] + ")", "tie"
    side = next((c for c in text if c in "AB"), None)
    return (f"Tie({side})", "fallback") if side else (toss, "coin")


# ---- files


def _battle(where: str, record) -> str:
    arena.check_battle(where, record, winner=True)
    return arena.key(record)


def read_done(output: Path) -> set[str]:
    """The battles already in `output` (a last line cut short by a kill is removed and judged again), once it is
    checked to be a JSON Lines file that can be written."""
    return api.done(output, LEAD, _battle)


def _steps(doc, where: str, turn: int, name: str) -> list[tuple[str, str | None]]:
    turns = doc.get("conversations") if isinstance(doc, dict) else None
    steps = turns[turn].get(name) if isinstance(turns, list) and len(turns) > turn and isinstance(turns[turn], dict) \
        else None
    if not isinstance(steps, list) or not all(isinstance(s, dict) and isinstance(s.get("text"), str)
                                              and isinstance(s.get("image"), (str, type(None))) for s in steps):
        raise UserError(f"{where} is not an OpenING output (conversations[{turn}].{name}: a list of steps with "
                        "text and image)")
    return [(s["text"], s.get("image")) for s in steps]


def _find(exports: list[Path], name: str, uid: str) -> Path | None:
    for root in exports:
        path = root / f"{name}_output" / f"{uid}.json"
        if not inside(path, root):
            raise UserError(f"model {name!r}, instance {uid!r}: {path} leads outside --exports {root}")
        if path.is_file():
            return path
    return None


class Reader:
    """The battles' answers and images, from the output files and the data folder."""

    def __init__(self, data: Path | None):
        self.data = data
        self.missing_images: set[Path] = set()

    def inputs(self, steps: list[tuple[str, str | None]], where: str) -> list[Step]:
        out = []
        for text, image in steps:
            if image is None:
                out.append((text, None))
                continue
            if self.data is None:
                raise UserError(f"{where}: its input holds images; give --data (the folder prepare-data wrote)")
            path = self.data / image
            if not inside(path, self.data):
                raise UserError(f"{where}: input image {image!r} leads outside --data {self.data}")
            if not path.is_file():
                raise UserError(f"{where}: input image {path} not found")
            out.append((text, path))
        return out

    def answer(self, path: Path, steps: list[tuple[str, str | None]]) -> list[Step]:
        out = []
        for text, image in steps:
            found = path.parent / Path(image).name if image else None
            if found is not None and found.is_file() and not inside(found, path.parent):
                raise UserError(f"{path}: image {image!r} leads outside its folder")
            if found is not None and not found.is_file():
                self.missing_images.add(found)
                found = None
            out.append((text, found))
        return out

    def battle(self, pair: dict, a: Path, b: Path) -> Battle:
        doc_a, doc_b = read_json(a), read_json(b)
        inputs = _steps(doc_a, str(a), 0, "input")
        if [t for t, _ in inputs] != [t for t, _ in _steps(doc_b, str(b), 0, "input")]:
            raise UserError(f"{a} and {b} answer different inputs (their conversations[0] texts differ)")
        return Battle(pair, self.inputs(inputs, str(a)), self.answer(a, _steps(doc_a, str(a), 1, "output")),
                      self.answer(b, _steps(doc_b, str(b), 1, "output")))


def read_battles(job, pairs: list[dict]) -> tuple[list[Battle], int]:
    """The battles of `pairs` with their answers (missing output files refused, naming the first), and how many
    output images were missing."""
    found, missing = [], {}
    for pair in pairs:
        paths = [_find(job.exports, pair[s]["name"], str(pair["data_id"])) for s in ("model_A", "model_B")]
        missing.update({f"{pair[s]['name']}_output/{pair['data_id']}.json": None
                        for s, p in zip(("model_A", "model_B"), paths) if p is None})
        found.append((pair, *paths))
    if missing:
        raise UserError(f"no output {next(iter(missing))} in --exports {', '.join(map(str, job.exports))} "
                        f"({plural(len(missing), 'output file')} missing)")
    reader = Reader(job.data)
    return [reader.battle(*f) for f in found], len(reader.missing_images)


# ---- the judge


def encode(processor, chats: list[list[dict]]):
    """The processor's own batch for the chats: their templates, left-padded, with every image in order."""
    from minigpt5_cli.images import decode

    texts = [processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
    images = [decode(c["image"], c["image"]) for chat in chats for c in chat[1]["content"] if c["type"] == "image"]
    return processor(text=texts, images=images or None, padding=True, return_tensors="pt")


def load(job):
    """IntJudge (or any image-text model) as the toolkit loads a VLM: bf16 on a GPU, fp32 on the CPU."""
    import torch

    from minigpt5_cli.hub import pick_device
    from minigpt5_cli.modeling.backbones import load_llm

    device = pick_device(None)
    llm = load_llm(job.judge, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32,
                   trust_remote_code=job.trust_remote_code)
    if llm.processor is None:
        raise UserError(f"--judge {job.judge!r} is a text-only model; IntJudge reads images (a Qwen2-VL model)")
    llm.processor.tokenizer.padding_side = "left"
    return llm.model.to(device).eval(), llm.processor


def judge_batch(model, processor, chats: list[list[dict]], max_new_tokens: int) -> list[str]:
    import torch

    inputs = encode(processor, chats).to(model.device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)


def run(job) -> str:
    from rich.console import Console

    from minigpt5_cli.display import progress

    done = read_done(job.output)
    if job.pairs is None:
        raise UserError("--benchmark opening needs --pairs (the pair file minigpt5 arena sample writes)")
    for root in job.exports:
        if not root.is_dir():
            raise UserError(f"--exports {root} is not a folder")
    if job.data is not None and not job.data.is_dir():
        raise UserError(f"--data {job.data} is not a folder")
    system, ask = their_prompts(job.prompts) if job.prompts else (SYSTEM, ASK)
    pairs = arena.read_pairs(job.pairs)
    pairs = pairs[:job.limit] if job.limit else pairs
    todo = [p for p in pairs if arena.key(p) not in done]
    battles, missing_images = read_battles(job, todo)
    counts = {"exact": 0, "tie": 0, "fallback": 0, "coin": 0}
    differ = 0
    if battles:
        model, processor = load(job)
        if not job.prompts:
            typer.echo("warning: the prompt's system message and request are minigpt5's own; IntJudge was trained "
                       "with OpenING's: --prompts OPENING_CHECKOUT uses those", err=True)
        if missing_images:
            typer.echo(f"warning: {plural(missing_images, 'output image')} not found beside the answers: judged as "
                       "answers without them, as OpenING does", err=True)
        job.output.parent.mkdir(parents=True, exist_ok=True)
        with progress(Console(stderr=True)) as bar, job.output.open("a", encoding="utf-8") as out:
            task = bar.add_task("battles", total=len(battles), unit="battles")
            for start in range(0, len(battles), job.batch_size):
                batch = battles[start:start + job.batch_size]
                texts = judge_batch(model, processor, [messages(b, system, ask) for b in batch],
                                    job.max_new_tokens or MAX_NEW_TOKENS)
                for battle, text in zip(batch, texts):
                    toss = coin(job.seed, battle.key)
                    ours, theirs = parse(text, toss), parse_opening(text, toss)
                    winner, how = theirs if job.compat else ours
                    counts[how] += 1
                    differ += ours[0] != theirs[0]
                    line = {"data_id": battle.pair["data_id"], **battle.pair, "winner": winner, "raw": text,
                            "parse": how, "judge": job.judge, "prompt": "opening" if job.prompts else "minigpt5",
                            "compat": job.compat}
                    out.write(json.dumps(line, ensure_ascii=False) + "\n")
                out.flush()
                os.fsync(out.fileno())
                bar.advance(task, len(batch))
    if differ:
        typer.echo(f"warning: {plural(differ, 'verdict')} read differently by OpenING's parser (its first character "
                   "A or B wins, \"Both\" included); " + ("these are OpenING's" if job.compat else
                                                         "--compat opening reads them as it does"),
                   err=True)
    how = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    return (f"wrote {job.output}: {plural(len(battles), 'battle')} judged" + (f" ({how})" if how else "")
            + f", {plural(len(pairs) - len(todo), 'battle')} already there")
