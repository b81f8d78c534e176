"""`minigpt5 demo`: a local web page to write a story with a model, step by step."""
