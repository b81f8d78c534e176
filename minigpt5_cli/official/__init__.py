"""The released MiniGPT-5 model on current libraries.

`minigpt4.py` turns the LAVIS / MiniGPT-4 weight files (EVA ViT-g, BLIP-2 Q-Former, the MiniGPT-4
projection) and a Vicuna folder into one `Blip2ForConditionalGeneration` folder; `minigpt5.py` turns the
released Lightning checkpoints into a minigpt5 checkpoint over that folder. Both read torch files only with
`torch.load(weights_only=True)` and check every tensor's name and shape before writing anything.
"""
