"""Evaluation: dataset readers, presets, metrics and the runner behind ``clip-surgery eval``."""
