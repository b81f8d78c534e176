"""minigpt5: interleaved text-and-image generation with generative vokens (MiniGPT-5)."""

__version__ = "0.1.0"
