"""The shapes world: a procedural domain of coloured shapes, and its attribute checker."""
