"""Position encodings of image slots (the fixed 2-D sine-cosine table, the 2-D rotary embedding)
and the rotary pairing of Llama / Qwen2 attention."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def sincos_grid_table(grid_size: Sequence[int], hidden: int, scale: float = 1.0) -> torch.Tensor:
    """``(rows * cols, hidden)`` fixed 2-D sine-cosine embeddings of a grid's slots, each of norm ``scale``.

    The first half of the channels encodes the row, the second half the column, each as sine /
    cosine pairs at frequencies spread geometrically from a quarter turn over the grid's side
    (its sine rises monotonically across the grid, a coordinate that a linear map reads off)
    to half a turn per slot (the finest difference between neighbours).
    """
    if hidden % 4:
        raise ValueError(f"sincos image positions need a hidden size divisible by 4, not {hidden}")
    pairs = hidden // 4

    def axis(length: int) -> torch.Tensor:
        lowest = math.pi / (2 * max(length, 1))
        omega = lowest * (math.pi / lowest) ** (torch.arange(pairs, dtype=torch.float64) / max(pairs - 1, 1))
        angles = torch.arange(length, dtype=torch.float64)[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (length, hidden / 2)

    rows, cols = int(grid_size[0]), int(grid_size[1])
    table = torch.cat(
        [axis(rows)[:, None, :].expand(rows, cols, -1), axis(cols)[None, :, :].expand(rows, cols, -1)], dim=-1
    )
    return (table.reshape(rows * cols, hidden) * (scale / math.sqrt(hidden / 2))).float()


class GridRotaryEmbedding(nn.Module):
    """The LM's rotary embedding with 2-D positions for the slots of the images it reads.

    Rotary frequency k follows the token's 1-D position when k % 3 == 0, its row when k % 3 == 1
    and its column when k % 3 == 2 (the frequencies interleaved, so that rows and columns each
    get fast and slow ones). A slot at (row, col) of an image whose first slot has 1-D position
    p has row position p + row and column position p + col; every other token has all three
    equal to its 1-D position, so text-only sequences, and images being generated, rotate
    exactly as with the wrapped embedding. Multimodal rotary positions (M-RoPE, Qwen2-VL) do
    the same with contiguous frequency sections. Under 1-D positions, raster order puts the
    slots of one column 8 positions apart and those of one row next to each other, so no
    rotary frequency picks out a column; with the column band a query can prefer one side of
    the image. Measured (README): the controlled test of ``scripts/synthetic_position_accuracy.py``
    learns "which side" with it (100 % against 46.5 %) but not "top or bottom", and the tiny
    recipe's position questions stay at chance, so it is off by default.

    :meth:`mllm.modeling.DualTokenMLLMForCausalLM.forward` sets :attr:`slot_index` (``(B, L)``,
    each read slot's index in its image in raster order, -1 elsewhere) for the duration of one call.
    """

    def __init__(self, rotary: nn.Module, columns: int) -> None:
        super().__init__()
        self.rotary = rotary
        self.columns = columns
        self.slot_index: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slot = self.slot_index
        positions = position_ids.expand(x.shape[0], -1) if position_ids.shape[0] == 1 else position_ids
        if slot is None or slot.shape != positions.shape or not bool((slot >= 0).any()):
            return self.rotary(x, position_ids)
        inv_freq = self.rotary.inv_freq.to(device=x.device, dtype=torch.float)
        flat = positions.float()
        on = slot >= 0
        start = flat - slot.float()
        rows = torch.where(on, start + torch.div(slot, self.columns, rounding_mode="floor").float(), flat)
        cols = torch.where(on, start + (slot % self.columns).float(), flat)
        band = torch.arange(inv_freq.numel(), device=x.device) % 3
        freqs = torch.stack((flat, rows, cols), dim=-1)[..., band] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = getattr(self.rotary, "attention_scaling", 1.0)
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotary-embedding pairing of Llama / Qwen2: (x1, x2) -> (-x2, x1) over the two halves."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)
