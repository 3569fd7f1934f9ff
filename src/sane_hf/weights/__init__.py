"""Layer 1, weights: a network's parameters as tokens (tokenization, and the layout that maps
them back: layout), their normalization and their permutation symmetries (alignment: spec,
tracing, matching). Knows nothing of zoos or models."""
