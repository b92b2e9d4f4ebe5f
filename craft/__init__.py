"""Craft: build, train, evaluate and sample language models."""

__version__ = "0.1.0"
