"""Layer 5, pretraining: the Accelerate pretraining loop, its augmentations and checkpoints."""
