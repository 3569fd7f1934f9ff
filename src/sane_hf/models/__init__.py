"""Layer 3, models: the transformers model classes (`models/sane/`)."""
