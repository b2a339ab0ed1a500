"""The depth head: predicts the RVQ codes of one image slot depth by depth (RQ-Transformer / VILA-U)."""

from __future__ import annotations

import math

import torch
from torch import nn


class DepthHead(nn.Module):
    """Predicts the ``depth`` RVQ codes of one slot from the LM's hidden state, depth by depth.

    Input at depth 0 is the projected LM state; at depth ``d > 0`` it adds the embeddings of
    the codes already chosen at depths ``< d`` (their running sum, as the residual quantiser
    builds its output). A small causal transformer runs over the depths and each depth has
    its own classifier.
    """

    def __init__(
        self, lm_hidden: int, depth: int, codebook_size: int, hidden: int, num_layers: int, num_heads: int
    ) -> None:
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"depth head hidden size {hidden} is not divisible by its {num_heads} heads")
        self.depth = depth
        self.codebook_size = codebook_size
        self.in_proj = nn.Linear(lm_hidden, hidden)
        self.code_embed = nn.Embedding(codebook_size, hidden)
        self.depth_embed = nn.Embedding(depth, hidden)
        layer = nn.TransformerEncoderLayer(
            hidden, num_heads, 4 * hidden, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.classifier_weight = nn.Parameter(torch.empty(depth, hidden, codebook_size))
        self.classifier_bias = nn.Parameter(torch.zeros(depth, codebook_size))
        nn.init.normal_(self.classifier_weight, std=1.0 / math.sqrt(hidden))

    def _inputs(self, context: torch.Tensor, codes: torch.Tensor | None) -> torch.Tensor:
        """(N, H_lm), (N, d) chosen codes -> (N, d + 1, hidden) depth-transformer inputs."""
        start = self.in_proj(context).unsqueeze(1)
        steps = [start]
        if codes is not None and codes.shape[1]:
            running = start + self.code_embed(codes).cumsum(dim=1)
            steps.append(running)
        inputs = torch.cat(steps, dim=1)
        positions = torch.arange(inputs.shape[1], device=inputs.device)
        return inputs + self.depth_embed(positions)

    def _run(self, inputs: torch.Tensor) -> torch.Tensor:
        length = inputs.shape[1]
        mask = torch.triu(torch.full((length, length), float("-inf"), device=inputs.device), diagonal=1)
        return self.norm(self.blocks(inputs, mask=mask.to(inputs.dtype), is_causal=True))

    def forward(self, context: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(N, depth, K)`` for target ``codes`` ``(N, depth)``."""
        hidden = self._run(self._inputs(context, codes[:, :-1]))
        return torch.einsum("ndh,dhk->ndk", hidden, self.classifier_weight) + self.classifier_bias

    def next_logits(self, context: torch.Tensor, codes: torch.Tensor | None) -> torch.Tensor:
        """Logits ``(N, K)`` of the next depth given the codes chosen so far ``(N, d)`` (or None)."""
        depth = 0 if codes is None else codes.shape[1]
        hidden = self._run(self._inputs(context, codes))[:, -1]
        return hidden @ self.classifier_weight[depth] + self.classifier_bias[depth]
