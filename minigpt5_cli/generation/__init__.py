"""`minigpt5 generate`: story input, the batched decoder, the renderer, story output."""
