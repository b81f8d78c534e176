"""Seeds derived from a run's seed, so that each piece of work (a micro-batch, a story's image) draws
the same numbers whatever ran before it, and distinct pieces draw distinct ones."""

STRIDE = 1_000_003  # a prime: distinct tuples get distinct seeds
MICRO_STRIDE = 7919  # a second prime, for the micro-batch's index


def derive_seed(*parts: int) -> int:
    """generate's seed for (seed, story, response, image)."""
    seed = 0
    for p in parts:
        seed = (seed * STRIDE + p + 1) % (2**63)
    return seed


def micro_seed(seed: int, batch: int) -> int:
    """A training run's seed for its micro-batch `batch` (its index in the data order). Noise, timesteps,
    CFG drops and dropout depend on that index alone: a resumed run replays them, and N processes draw
    what one process with N times the gradient accumulation draws for the same batches."""
    return (seed * STRIDE + batch * MICRO_STRIDE) % (2**63)
