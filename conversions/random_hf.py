"""Randomly initialised Hugging Face PyTorch models for parity checks and benchmarks.

``transformers`` initialises norm weights to one and some biases to zero; a model whose
every weight is random (norms included) exercises every tensor of a conversion.
"""

from __future__ import annotations

import torch


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random, norms included (norm weights around 1, everything else small); returns ``model.eval()``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.08 * noise)
    return model.eval()
