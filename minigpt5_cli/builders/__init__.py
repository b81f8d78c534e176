"""Backbones built locally from configs, named by scheme (`hub.resolve`): `tiny` (tiny random-weight
backbones for tests and debug recipes, and the shapes world's untrained `toy:` ones) and `paper` (the
paper's backbones as configs without weights). Each builder module has `NAMES`, `WEIGHTS` (whether
its backbones hold weights, or only shapes for `train --plan`) and `build(name, out)`;
`common` holds the cache they are built into."""
