"""The DreamBooth trainer: `train_model(root, name)` runs one model's config to the end (or resumes it)."""
from __future__ import annotations


def train_model(root, name, max_steps=None, overrides=None):
    from .loop import train_model as _train_model

    return _train_model(root, name, max_steps=max_steps, overrides=overrides)


__all__ = ["train_model"]
