"""Data layer: tokenizers, named sources, streaming preparation and memory-mapped datasets.

Importing `craft.data` is cheap; torch is only needed by `craft.data.datasets`.
"""
