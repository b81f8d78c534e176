"""Training: `train` (stages 1 and 2), `scratch` (stages llm and generator), `loop` (the loop all four
run), `state` (a checkpoint's optimizer and scheduler state) and `plan` (`train --plan`)."""
