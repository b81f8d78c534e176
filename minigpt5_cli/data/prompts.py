"""The prompt texts of training and generation, in the paper's `###Human: ... ###Assistant:` form, and
the released model's own templates (`official`)."""

from __future__ import annotations

INSTRUCTION = "###Human: Generate an image with caption: {} ###Assistant: "  # stage 1's instruction form
GEN = "Generate an image with the scene description: {}"  # stage-2 task `gen`
NEXT = "Tell me the next scene with image."  # task `multimodal`, and generate's prompt for such models
DESCRIBE = "Tell me the next scene description by this image:"  # task `understanding`
CAPTION = "Describe this image:"  # stage llm: caption pairs
TEMPLATES = (INSTRUCTION, GEN, NEXT, DESCRIBE, CAPTION)


def dialogue(lines: list[str]) -> str:
    """The history's lines as one human turn, closed by the assistant's cue."""
    return "###Human: " + "\n".join(lines) + " ###Assistant: "


# The released model's templates: its turn markers (no space after them), its image brackets, and the end of
# its targets. Its system prompts are the recipe's (data.story_system, data.dialogue_system).
HUMAN, ASSISTANT, END = "###Human:", "###Assistant:", "###"


def bracketed(marker: str) -> str:
    return f"<Img>{marker}</Img>"


def instruction(text: str) -> bool:
    """Whether a history's last line is one of the stage-2 instructions (a story task), not a turn."""
    return text in (NEXT, DESCRIBE) or text.startswith(GEN.format(""))


def official(history: list[tuple[str, bool]], marker: str, story_system: str = "", dialogue_system: str = "") -> str:
    """The released model's prompt for `history` ((text, has an image) per step), each image written as
    `marker` in its brackets. Closed by an instruction: the story form, after `story_system`, the earlier
    steps run together (each text followed by its image) and a newline before the instruction. Otherwise
    the dialogue form, after `dialogue_system`, turns alternating so that the last is the human's. An empty
    system prompt is left out."""
    if history and instruction(history[-1][0]):
        *steps, (cue, image) = history
        story = "".join(text + bracketed(marker) if img else text + " " for text, img in steps).rstrip(" ")
        cue = f"{cue} {bracketed(marker)}" if image else cue
        newline = "\n" if steps else ""
        return f"{story_system}{HUMAN}{story}{newline} {cue} {ASSISTANT}"
    parts = [dialogue_system] if dialogue_system else []
    for k, (text, img) in enumerate(history):
        parts.append(f"{HUMAN if (len(history) - 1 - k) % 2 == 0 else ASSISTANT} {text}")
        if img:
            parts.append(bracketed(marker))
    return " ".join([*parts, ASSISTANT])
