"""Public interleaved-generation benchmarks: their pair files and scores, computed as they define them."""
