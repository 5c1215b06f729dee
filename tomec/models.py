"""The models the command line builds: a timm model by name, with timm's weights or a checkpoint."""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["load_model"]


def load_model(name: str, pretrained: bool = False, checkpoint: Optional[str] = None, **kwargs: Any) -> torch.nn.Module:
    """A timm model in eval mode, with timm's weights or a checkpoint (a state dict, or a dict with
    ``"model"``). Random weights come from a fixed seed, so every rank (and every run) builds the
    same model; the caller's random state is left as it was. ``kwargs`` go to
    ``timm.create_model`` (e.g. ``num_classes=`` for a fine-tuned head)."""
    import timm  # seconds to import: only the commands that build a model pay for it

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        model.load_state_dict(state)
    return model.eval()
