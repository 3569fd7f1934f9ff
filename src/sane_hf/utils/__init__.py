"""Helpers below every other layer (they import nothing from sane_hf): the config mechanism."""
