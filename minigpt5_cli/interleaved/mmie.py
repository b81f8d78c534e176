"""MMIE's judging: its rubric prompt, built as its dataset.py and prompts.py build it, sent with the images to
an OpenAI-compatible endpoint serving its judge (MMIE-Score runs its own remote code under an older
transformers, so it is not loaded here; serve it apart, or score MMIE's own main.py output with
`minigpt5 scores`). The rubrics are read from a checkout of MMIE's repository (prompts.py, parsed as text,
never run).

The prompt: the question's texts, each followed by a newline, and "Image-{n}: <image>" on its own line where
each image was, numbered from 0 through question and answer; the answer likewise; the rubric the id names
(SA, PBL or MSR, looked for in that order), the MSR one with the reference answer's first text. The score is
the first number after "### Score", rounded half to even; one outside 0-6 counts as no score, and one too
long to be a finite number is none.

Where MMIE's script differs, the default says how often, and compat "mmie" reproduces it: the answer stops
after the third image overall (question images count), what follows dropped; a sample with more than four
images is left out; a missing image is skipped (by default it is refused).
"""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

from rich.console import Console

from minigpt5_cli.display import plural
from minigpt5_cli.errors import UserError
from minigpt5_cli.files import inside, python_tree, read_json
from minigpt5_cli.interleaved import api

PROMPT_FILE = "prompts.py"
TASKS = ("SA", "PBL", "MSR")  # the id's substring that picks the rubric, in the order looked for
SCORE = re.compile(r"### Score.*?(-?\d+(\.\d+)?)", re.DOTALL)
LOWEST, HIGHEST = 0, 6
MAX_NEW_TOKENS = 1024  # MMIE's own
LEAD = b'{"id": '  # how every judgement line starts
KEYS = ("id", "model", "gpt_feedback", "score", "judge")  # what every judgement line holds
MAX_IMAGES, CUT_AFTER = 4, 3  # compat: samples with more images are left out; answers stop after the third
# Where the default and MMIE's script part: (what MMIE's script does, what the default does instead).
CUT = ("answers stopped after the third image, as MMIE's script does",
       "answers judged whole (MMIE's script stops them after the third image)")
MANY = (f"samples with more than {MAX_IMAGES} images left out, as MMIE's script does",
        f"samples with more than {MAX_IMAGES} images judged (MMIE's script leaves them out)")
MISSING = ("missing images skipped, as MMIE's script does", "")


def task(sample_id: str) -> str | None:
    return next((t for t in TASKS if t in sample_id), None)


def find_score(text: str) -> int | None:
    """The score in a judge's feedback: the first number after "### Score", rounded half to even (4.5 -> 4)."""
    match = SCORE.search(text)
    number = float(match.group(1)) if match else math.nan  # a long run of digits reads as inf
    return round(number) if math.isfinite(number) else None


def valid(score: int | None) -> bool:
    return score is not None and LOWEST <= score <= HIGHEST


def load_prompts(checkout: Path | None) -> dict[str, str]:
    """{task: the template get_prompt returns for it}: each rubric constant and the lines it adds to it, read
    from get_prompt's `if "SA" in data_id: return RUBRIC + "..."` branches."""
    if checkout is None:
        raise UserError("--benchmark mmie needs --prompts: a checkout of MMIE's repository (its rubrics are read "
                        "from it)")
    path = checkout / PROMPT_FILE
    tree = python_tree(path, "--prompts")
    strings = api.source_strings(tree)
    templates = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and node.body
                and isinstance(node.test.left, ast.Constant) and isinstance(node.body[0], ast.Return)):
            continue
        value = node.body[0].value
        if (isinstance(value, ast.BinOp) and isinstance(value.op, ast.Add) and isinstance(value.left, ast.Name)
                and isinstance(value.right, ast.Constant) and isinstance(strings.get(value.left.id), str)
                and isinstance(value.right.value, str)):
            templates[node.test.left.value] = strings[value.left.id] + value.right.value
    missing = [t for t in TASKS if t not in templates]
    if missing:
        raise UserError(f"{path} lacks the {', '.join(missing)} rubric (is --prompts a checkout of MMIE?)")
    return templates


def build(record: dict, question_root: Path, answer_root: Path, compat: bool, missing: list[str]) -> dict:
    """What MMIE's get_dataset makes of a record: the question and answer texts with their image lines, the
    images' paths and the reference's first text. Missing images are appended to `missing`."""
    images: list[Path] = []
    texts = {"question": "", "answer": ""}

    def add(key: str, block: dict, root: Path, cut: bool) -> bool:
        """Add a block's text and image; whether the answer stops here (`cut`: after the third image)."""
        if block.get("text") is not None:
            texts[key] += block["text"] + "\n"
        if cut and len(images) >= CUT_AFTER:
            return True
        if block.get("image") is not None:
            path = root / block["image"]
            if not inside(path, root):
                raise UserError(f"image {block['image']!r} of {record['id']} lies outside {root}")
            if not path.is_file():
                missing.append(str(path))
            else:
                texts[key] += f"Image-{len(images)}: <image>\n"
                images.append(path)
        return cut and len(images) >= CUT_AFTER

    for block in record["question"]:
        add("question", block, question_root, False)
    answer = record["answer"]
    for block in [{"text": answer, "image": None}] if isinstance(answer, str) else answer:
        if add("answer", block, answer_root, compat):
            break
    return {"id": record["id"], "model": record["model"], **texts, "gt_answer": record["gt_answer"][0].get("text"),
            "images": images}


def _is_block(b) -> bool:
    return isinstance(b, dict) and all(b.get(k) is None or isinstance(b.get(k), str) for k in ("text", "image"))


def read_samples(path: Path, data: Path | None) -> list[dict]:
    """A model's export in MMIE's input format (a JSON list): answer images beside the file, question images
    under `data` (the prepared benchmark; without it, beside the file too)."""
    doc = read_json(path)
    if not isinstance(doc, list):
        raise UserError(f"{path} is not MMIE's format (a JSON list of samples)")
    seen = set()
    for i, r in enumerate(doc, start=1):
        where = f"{path} sample {i}"
        if not (isinstance(r, dict) and isinstance(r.get("id"), str) and isinstance(r.get("question"), list)
                and all(map(_is_block, r["question"])) and (isinstance(r.get("answer"), str) or isinstance(
                    r.get("answer"), list) and all(map(_is_block, r["answer"])))
                and isinstance(r.get("gt_answer"), list) and r["gt_answer"] and _is_block(r["gt_answer"][0])):
            raise UserError(f"{where} is not an MMIE sample (id, question, answer, gt_answer: lists of "
                            "{\"text\", \"image\"})")
        if task(r["id"]) is None:
            raise UserError(f"{where}: id {r['id']!r} names none of {', '.join(TASKS)}")
        if r["id"] in seen:
            raise UserError(f"{where}: id {r['id']!r} appears twice")
        seen.add(r["id"])
        r.setdefault("model", path.stem)
    return [{"record": r, "question_root": data or path.parent, "answer_root": path.parent} for r in doc]


class Judge:
    def __init__(self, ask: api.Chat, templates: dict[str, str], name: str):
        self.ask, self.templates, self.name = ask, templates, name

    def __call__(self, sample: dict) -> dict:
        fields = {k: sample[k] for k in ("question", "answer", "gt_answer")}
        if task(sample["id"]) != "MSR":
            fields.pop("gt_answer")
        try:
            prompt = self.templates[task(sample["id"])].format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"--prompts: MMIE's {task(sample['id'])} prompt does not fill in ({type(e).__name__}: "
                            f"{e})") from None
        raw = self.ask([api.text_part(prompt), *(api.image_part(p) for p in sample["images"])])
        return {**sample, "images": [str(p) for p in sample["images"]], "gpt_feedback": raw,
                "score": find_score(raw), "judge": self.name}


def run(job) -> str:
    compat = job.compat == "mmie"
    if job.api is None:
        raise UserError("--benchmark mmie needs --api, the base URL of an endpoint serving MMIE-Score (or another "
                        "judge); MMIE's own main.py output can be scored with minigpt5 scores as it is")
    templates = load_prompts(job.prompts)
    if job.data is not None and not job.data.is_dir():
        raise UserError(f"--data {job.data} is not a folder")
    finished = api.done(job.output, LEAD, api.judgement(job.output, "MMIE", KEYS))
    todo, lost, cut, many = [], {False: [], True: []}, 0, 0  # lost: the images missing, by default and in compat
    for path in api.export_files(job.exports, ".json", job.output):
        for s in read_samples(path, job.data)[:job.limit or None]:
            ours = build(s["record"], s["question_root"], s["answer_root"], False, lost[False])
            theirs = build(s["record"], s["question_root"], s["answer_root"], True, lost[True])
            cut += (ours["answer"], ours["images"]) != (theirs["answer"], theirs["images"])
            many += len(theirs["images"]) > MAX_IMAGES
            if compat and len(theirs["images"]) > MAX_IMAGES:
                continue
            if (s["record"]["model"], s["record"]["id"]) not in finished:
                todo.append(theirs if compat else ours)
    missing = lost[compat]
    if missing and not compat:
        raise UserError(f"{plural(len(missing), 'image')} not found, the first {missing[0]} (--compat mmie skips "
                        "them, as MMIE's script does)")
    judge = Judge(api.Chat(job.api, job.judge, job.api_key_env, max_tokens=job.max_new_tokens or MAX_NEW_TOKENS),
                  templates, job.judge)
    api.judge_all(todo, judge, job.output, job.batch_size, "samples")
    console = Console(stderr=True)
    for n, (theirs, ours) in ((cut, CUT), (many, MANY), (len(missing) if compat else 0, MISSING)):
        if n:
            said = f"{theirs}: {n}" if compat else f"{ours}: {n}; --compat mmie does as MMIE's script"
            console.print(f"[yellow]warning:[/] {said}", highlight=False, soft_wrap=True)
    return f"judged {plural(len(todo), 'sample')} into {job.output}" + (
        f" ({plural(len(finished), 'judgement')} already there)" if finished else "")
