"""Shared code of the scripts: model loading, datasets, output naming and streaming I/O, class names."""
