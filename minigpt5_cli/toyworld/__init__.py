"""The shapes world: a procedural domain, its tiny and toy backbones, and the scratch stages."""
