"""Data: raw readers and prepare-data, training sources, prompts, samples and the collator."""
