"""Layer 6, downstream: what a pretrained SANE is used for. Embeddings, property probes,
sampling new networks and evaluating them."""
