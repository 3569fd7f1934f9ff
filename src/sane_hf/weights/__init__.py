"""Layer 1, weights: a network's parameters as tokens (tokenization), their normalization and
their permutation symmetries (alignment). Knows nothing of zoos or models."""
