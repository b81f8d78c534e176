"""`minigpt5 evaluate`: the metric registry, metric maths, model loaders, feature caches."""
