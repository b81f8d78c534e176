"""ISG-Bench's four levels, judged as its ISG-eval.py judges them, by a model behind an OpenAI-compatible
endpoint. Its prompts are read from a checkout of its repository (ISG_eval/get_judge_prompt.py, parsed as
text, never run).

Per sample: structure, whether the output's text/image sequence is Golden's; only then block (each block_qa
question about two blocks, through the Text-Text, Text-Image or Image-Image prompt with the "Score"
requirement) and image (each image_qa question about one generated image, the DSG prompt, Yes/No); and
holistic (query, output and Golden with the with-golden prompt; its overall_score). Blocks are named as
ISG names them: <gen_text1>, <gen_img1>, ... for the output, <query_text1>, <query_img1>, ... for the query.

Each line written is ISG's own result record (id, Category, output, result with structure, the judged
block and image questions, holistic) plus the model's name, the judge's and its raw answers, so
calculate_performance.py reads it too. A judge's answer that is not a JSON object is kept as
{"error": ..., "raw_output": ...}, as ISG keeps it.

Where ISG's script errs, the default differs and says how often; compat "isg" reproduces it:
- its default --end -1 leaves out each file's last sample;
- an image question with prerequisites (Preliminary, ids of earlier questions) is never asked: it looks the
  ids up among the block names; by default it is asked when all its prerequisites were answered Yes;
- in a Text-Image question the text's content, not its name, is replaced by the prompt's word for it, so
  the name stays in the question; by default the name is replaced;
- an answer that is JSON wrapped in other text (a code fence) is an error there; read by default.
"""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path
from typing import Callable

from minigpt5_cli.display import plural
from minigpt5_cli.errors import UserError
from minigpt5_cli.files import MAX_LINE, inside, json_lines, loads, python_tree
from minigpt5_cli.interleaved import api

PROMPT_FILE = "ISG_eval/get_judge_prompt.py"
# What ISG-eval.py calls each prompt, and the constant of get_judge_prompt.py that holds it.
PROMPTS = {"Text-Text": "_TEXT_TEXT_JUDGE_PROMPT", "Text-Image": "_TEXT_IMAGE_JUDGE_PROMPT",
           "Image-Image": "_IMAGE_IMAGE_JUDGE_PROMPT", "DSG": "_DSG_PROMPT", "W_GT": "_EVALUATE_WHOLE_W_GT_PROMPT",
           "Requirement": "VQA_dict"}
DETAIL = "low"  # the image detail ISG asks for
# The words the block prompts use for the texts they show, put in place of the blocks' names in a question.
TEXT_1, TEXT_2, TEXT = " `Text 1` ", " `Text 2` ", " `Text` "
LEAD = b'{"id": '  # how every judgement line starts
KEYS = ("id", "Category", "model", "judge")  # what every judgement line holds (result too, unless no output)


def load_prompts(checkout: Path | None) -> dict:
    if checkout is None:
        raise UserError("--benchmark isg needs --prompts: a checkout of ISG's repository (its judge prompts are "
                        "read from it)")
    strings = api.source_strings(python_tree(checkout / PROMPT_FILE, "--prompts"))
    prompts = {key: strings.get(name) for key, name in PROMPTS.items()}
    bad = [PROMPTS[k] for k, v in prompts.items()
           if not (isinstance(v, list) and len(v) == 4 if k == "W_GT" else
                   isinstance(v, dict) and isinstance(v.get("Score"), str) if k == "Requirement" else
                   isinstance(v, str))]
    if bad:
        raise UserError(f"{checkout / PROMPT_FILE} lacks {', '.join(bad)} (is --prompts a checkout of ISG?)")
    return prompts


def parse(text: str, compat: bool = False) -> tuple[dict, bool]:
    """The judge's answer as a dict, and whether it is a JSON object wrapped in other text (a code fence),
    which only the default reads. Anything else is {"error", "raw_output"}, as ISG keeps it."""
    text = text.strip()
    error = {"error": "Invalid JSON response", "raw_output": text}
    try:
        value, wrapped = json.loads(text), False
    except ValueError:
        value, wrapped, start = None, True, text.find("{")
        while value is None and start >= 0:
            try:
                value = json.JSONDecoder().raw_decode(text, start)[0]
            except ValueError:
                start = text.find("{", start + 1)
    if not isinstance(value, dict):
        return ({"error": "not a JSON object", "raw_output": text} if value is not None and not wrapped else error,
                False)
    return (error if compat and wrapped else value), wrapped


def structure_matches(output: list[dict], golden: list[dict]) -> bool:
    return [b["type"] == "text" for b in output] == [b["type"] == "text" for b in golden]


def names(output: list[dict], query: list[dict]) -> dict[str, str]:
    """ISG's names of the blocks, <gen_text1>, <query_img2>, ..., with their contents."""
    named = {}
    for prefix, blocks in (("gen", output), ("query", query)):
        counts = {"text": 0, "image": 0}
        for b in blocks:
            counts[b["type"]] += 1
            named[f"<{prefix}_{'text' if b['type'] == 'text' else 'img'}{counts[b['type']]}>"] = b["content"]
    return named


class Judge:
    """One sample's four levels; `tally` counts where the default and compat "isg" part."""

    def __init__(self, ask: Callable[[list[dict]], str], prompts: dict, compat: bool, name: str):
        self.ask, self.prompts, self.compat, self.name = ask, prompts, compat, name
        self.tally = {"prerequisites": 0, "text_name": 0, "wrapped": 0}
        self.lock = threading.Lock()  # samples are judged in threads

    def _count(self, key: str, n: int) -> None:
        with self.lock:
            self.tally[key] += n

    def _fill(self, key: str, **fields) -> str:
        try:
            return self.prompts[key].format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"--prompts: ISG's {PROMPTS[key]} does not fill in ({type(e).__name__}: {e})") from None

    def _judge(self, parts: list[dict]) -> tuple[dict, str]:
        raw = self.ask(parts)
        parsed, wrapped = parse(raw, self.compat)
        self._count("wrapped", wrapped)
        return parsed, raw

    def __call__(self, sample: dict) -> dict:
        record, files = sample["record"], sample["files"]
        line = {"id": record["id"], "Category": record["Category"], "model": sample["model"], "judge": self.name}
        if record.get("output") is None:  # nothing to judge: ISG leaves such a sample without a result
            return line
        line["output"] = record["output"]
        result = {"structure": structure_matches(files["output"], files["Golden"])}
        if result["structure"]:
            named = names(files["output"], files["Query"])
            result["image"] = self.image(record["predict"], named)
            result["block"] = self.block(record["predict"], named)
        result["holistic"], result["holistic_raw"] = self.holistic(files)
        line["result"] = result
        return line

    def block(self, predict: dict, named: dict) -> list[dict]:
        questions = copy.deepcopy(predict.get("block_qa", {}).get("questions") or [])
        requirement = self.prompts["Requirement"]["Score"]
        for q in questions:
            subject, obj, question = q.get("subject"), q.get("object"), q.get("Question")
            if subject not in named or obj not in named or not isinstance(question, str):
                continue
            if "img" in subject and "img" in obj:
                text = self._fill("Image-Image", requirement=requirement, question=question)
                parts = [api.image_part(named[subject], DETAIL), api.image_part(named[obj], DETAIL)]
            elif "text" in subject and "text" in obj:
                question = question.replace(subject, TEXT_1).replace(obj, TEXT_2)
                text = self._fill("Text-Text", requirement=requirement, text1=named[subject], text2=named[obj],
                                  question=question)
                parts = []
            else:
                name, image = (subject, obj) if "text" in subject else (obj, subject)
                fixed, theirs = question.replace(name, TEXT), question.replace(named[name], TEXT)
                self._count("text_name", fixed != theirs)
                text = self._fill("Text-Image", requirement=requirement, text=named[name],
                                  question=theirs if self.compat else fixed)
                parts = [api.image_part(named[image], DETAIL)]
            q["VQA_judge_Score"], q["raw"] = self._judge(parts + [api.text_part(text)])
        return questions

    def image(self, predict: dict, named: dict) -> list[dict] | None:
        qa = predict.get("image_qa")
        if qa is None:
            return None
        questions = copy.deepcopy(image_questions(qa))
        answers = {}
        for q in questions:
            answers[q.get("id")] = "No"
            if q.get("image") not in named:
                continue
            needs = q.get("Preliminary") or []
            ours = any(answers.get(p) != "Yes" for p in needs)
            theirs = ours or any(p not in named for p in needs)  # ISG looks the ids up among the block names
            self._count("prerequisites", ours != theirs)
            if theirs if self.compat else ours:
                continue
            text = self._fill("DSG", question=q.get("Question"))
            q["judge"], q["raw"] = self._judge([api.image_part(named[q["image"]], DETAIL), api.text_part(text)])
            verdict = q["judge"].get("Judge")
            if isinstance(verdict, str) and verdict.lower() == "yes":
                answers[q["id"]] = "Yes"
        return questions

    def holistic(self, files: dict) -> tuple[dict, str]:
        head, answer, golden, tail = self.prompts["W_GT"]
        parts = []
        for text, blocks in ((head, files["Query"]), (answer, files["output"]), (golden, files["Golden"]),
                             (tail, [])):
            for b in [{"type": "text", "content": text}, *blocks]:
                parts.append(api.text_part(b["content"].replace("\n", " ")) if b["type"] == "text"
                             else api.image_part(b["content"], DETAIL))
        return self._judge(parts)


# ---- the exports


def _blocks(value, where: str, key: str, optional: bool = False) -> list[dict] | None:
    if value is None and optional:
        return None
    if not (isinstance(value, list) and all(isinstance(b, dict) and b.get("type") in ("text", "image")
                                            and isinstance(b.get("content"), str) for b in value)):
        raise UserError(f"{where}: {key} is not a list of blocks {{\"type\": \"text\" or \"image\", \"content\": ...}}")
    return value


def _resolve(blocks: list[dict], root: Path, where: str) -> list[dict]:
    """The blocks with each image's path made absolute under `root`; one outside it, or missing, is refused."""
    out = []
    for b in blocks:
        if b["type"] == "image":
            path = root / b["content"]
            if not inside(path, root):
                raise UserError(f"{where}: image {b['content']!r} lies outside {root}")
            if not path.is_file():
                raise UserError(f"{where}: image {path} not found")
            b = {**b, "content": path}
        out.append(b)
    return out


def image_questions(qa) -> list:
    """image_qa's questions: the list itself, or that of its first key ({"questions": [...]}), as ISG takes them."""
    return qa if isinstance(qa, list) else next(iter(qa.values()), []) if isinstance(qa, dict) else None


def well_formed(predict: dict) -> bool:
    """Whether a record's block and image questions have the shape judging reads: lists of objects, an image
    question's id and prerequisites (a list) strings or integers."""
    block = predict.get("block_qa", {})
    blocks = block.get("questions") or [] if isinstance(block, dict) else None
    images = image_questions(predict["image_qa"]) if predict.get("image_qa") is not None else []
    if not all(isinstance(qs, list) and all(isinstance(q, dict) for q in qs) for qs in (blocks, images)):
        return False
    return all(isinstance(q.get("Preliminary") or [], list)
               and all(isinstance(i, (str, int)) for i in [q.get("id"), *(q.get("Preliminary") or [])]) for q in images)


def is_export(path: Path) -> bool:
    """Whether a file in an --exports folder is to be read as an export: all but judgements, ours or ISG's
    (a first line with a result, or with what our judgements hold), which a folder of exports may also hold.
    Anything else is read, and refused if it is not an export."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            first = loads(f.readline(MAX_LINE))
    except (ValueError, OSError):
        return True
    return not (isinstance(first, dict) and ("result" in first or all(k in first for k in KEYS)))


def read_samples(path: Path, data: Path | None) -> list[dict]:
    """A model's export (ISG's records, each with its "output"): output images are found beside the file,
    Query and Golden images under `data` (the prepared benchmark; without it, beside the file too)."""
    samples, seen = [], set()
    for _, where, r in json_lines(path):
        if not (isinstance(r, dict) and isinstance(r.get("id"), str) and isinstance(r.get("Category"), str)
                and isinstance(r.get("predict"), dict) and well_formed(r["predict"])):
            raise UserError(f"{where} is not an ISG-Bench record (id, Category, Query, Golden, predict, output)")
        if r["id"] in seen:
            raise UserError(f"{where}: id {r['id']!r} appears twice")
        seen.add(r["id"])
        files = {key: _resolve(_blocks(r.get(key), where, key), data or path.parent, where) for key in ("Query",
                                                                                                     "Golden")}
        output = _blocks(r.get("output"), where, "output", optional=True)
        if output is not None:
            files["output"] = _resolve(output, path.parent, where)
        samples.append({"model": path.stem, "record": r, "files": files})
    return samples


def run(job) -> str:
    compat = job.compat == "isg"
    if job.api is None:
        raise UserError("--benchmark isg needs --api, the base URL of an OpenAI-compatible endpoint")
    prompts = load_prompts(job.prompts)
    if job.data is not None and not job.data.is_dir():
        raise UserError(f"--data {job.data} is not a folder")
    finished = api.done(job.output, LEAD, api.judgement(job.output, "ISG-Bench", KEYS))
    todo, last = [], 0
    for path in api.export_files(job.exports, ".jsonl", job.output, is_export):
        samples = read_samples(path, job.data)
        chosen = (samples[:-1] if compat else samples)[:job.limit or None]  # ISG's default --end -1: not the last
        new = [s for s in chosen if (s["model"], s["record"]["id"]) not in finished]
        last += bool(samples) and (compat or new[-1:] == samples[-1:])
        todo += new
    ask = api.Chat(job.api, job.judge, job.api_key_env, json_mode=True, max_tokens=job.max_new_tokens)
    judge = Judge(ask, prompts, compat, job.judge)
    api.judge_all(todo, judge, job.output, job.batch_size, "samples")
    _warn({**judge.tally, "last": last}, compat)
    return f"judged {plural(len(todo), 'sample')} into {job.output}" + (
        f" ({plural(len(finished), 'judgement')} already there)" if finished else "")


# Where the default and ISG's script part: (what ISG's script does, what the default does instead).
DIFFERENCES = {
    "last": ("the last sample of each export file left out, as ISG's default --end -1 does",
             "the last sample of each export file judged (ISG's default --end -1 leaves it out)"),
    "prerequisites": ("image questions with prerequisites answered Yes skipped, as ISG's script does",
                      "image questions with prerequisites answered Yes asked (ISG's script never asks them)"),
    "text_name": ("Text-Image questions left with the text's name in them, as ISG's script does",
                  "Text-Image questions with the text's name replaced (ISG's script leaves it)"),
    "wrapped": ("answers of JSON inside other text kept as errors, as ISG's script does",
                "answers of JSON inside other text read (ISG's script counts them as errors)"),
}


def _warn(tally: dict, compat: bool) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    for key, (theirs, ours) in DIFFERENCES.items():
        if tally[key]:
            said = f"{theirs}: {tally[key]}" if compat else f"{ours}: {tally[key]}; --compat isg does as ISG's script"
            console.print(f"[yellow]warning:[/] {said}", highlight=False, soft_wrap=True)
