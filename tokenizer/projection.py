"""Down projection (ViT width -> code dim) before quantising, up projection after."""

from __future__ import annotations

import torch
from torch import nn

from tokenizer.config import ProjectionConfig


class TokenProjection(nn.Module):
    """Per-token projection ``(..., in_dim) -> (..., out_dim)``.

    ``linear``: LayerNorm + Linear. ``mlp``: LayerNorm + Linear-GELU-Linear, a light
    stand-in for the official repo's attention + GeGLU block (the tokens already went
    through the ViT's attention; the projection only has to change width).
    """

    def __init__(self, config: ProjectionConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        if config.kind == "linear":
            self.body: nn.Module = nn.Linear(in_dim, out_dim)
        else:
            self.body = nn.Sequential(
                nn.Linear(in_dim, config.hidden_dim), nn.GELU(), nn.Linear(config.hidden_dim, out_dim)
            )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(tokens))
