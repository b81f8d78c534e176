"""The prompt texts of training and generation, in the paper's `###Human: ... ###Assistant:` form."""

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
