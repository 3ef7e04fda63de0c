"""Trying a model: text generation."""

from .generate import generate

__all__ = ["generate"]
