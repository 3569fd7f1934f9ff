"""Layer 7, recipes: the experiments of the paper and the demo, assembled from the layers below."""
