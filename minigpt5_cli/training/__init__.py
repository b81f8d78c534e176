"""Training: `train` (stages 1 and 2), `scratch` (stages llm and generator), the loop all four share, `state` and `plan`."""
