"""The depth head: predicts the RVQ codes of one image slot depth by depth (RQ-Transformer / VILA-U)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


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

    def steps(self, context: torch.Tensor) -> DepthSteps:
        """Depth-by-depth decoding of one slot from the LM state ``context`` ``(N, H_lm)``, with cached keys and values."""
        return DepthSteps(self, context)


class DepthSteps:
    """One slot's depths decoded one at a time, each depth running the transformer on its own new
    input only: the keys and values of the earlier depths are kept per layer, as a decoder's KV
    cache keeps them (what :meth:`DepthHead.next_logits` recomputes from the whole prefix), in
    buffers sized for all the depths.

        steps = head.steps(context)
        logits = steps.next_logits(None)      # depth 0
        logits = steps.next_logits(code)      # depth 1, after choosing ``code`` (N,) at depth 0
    """

    def __init__(self, head: DepthHead, context: torch.Tensor) -> None:
        self.head = head
        self.start = F.linear(context, head.in_proj.weight, head.in_proj.bias)
        self.code_sum: torch.Tensor | None = None
        self.depth = 0
        first = head.blocks.layers[0].self_attn
        rows, heads = context.shape[0], first.num_heads
        shape = (len(head.blocks.layers), rows, heads, head.depth, first.embed_dim // heads)
        self.keys, self.values = self.start.new_empty(shape), self.start.new_empty(shape)

    def next_logits(self, code: torch.Tensor | None) -> torch.Tensor:
        """Logits ``(N, K)`` of the next depth; ``code`` ``(N,)``: the code chosen at the previous depth (None at depth 0)."""
        head = self.head
        if self.depth >= head.depth:
            raise ValueError(f"all {head.depth} depths of this slot are decoded already")
        if (code is None) != (self.depth == 0):
            raise ValueError(f"depth {self.depth} needs {'no code' if self.depth == 0 else 'the previous depth code'}")
        logits, self.code_sum = depth_step(head, self.start, self.code_sum, code, self.depth, self.keys, self.values)
        self.depth += 1
        return logits


def depth_step(
    head: DepthHead,
    start: torch.Tensor,
    code_sum: torch.Tensor | None,
    code: torch.Tensor | None,
    depth: int,
    keys: torch.Tensor,
    values: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One depth of :class:`DepthSteps` from the projected LM state ``start`` ``(N, hidden)``:
    ``(logits (N, K), the running code-embedding sum)``. ``keys`` / ``values``: ``(layers, N,
    heads, depths, head_dim)`` buffers holding the earlier depths; this depth's are written at
    index ``depth``."""
    inputs = start
    if code is not None:  # the running sum of the chosen codes' embeddings, summed in order as cumsum does
        embedded = F.embedding(code, head.code_embed.weight)
        code_sum = embedded if code_sum is None else code_sum + embedded
        inputs = inputs + code_sum
    hidden = (inputs + head.depth_embed.weight[depth]).unsqueeze(1)
    for index, layer in enumerate(head.blocks.layers):
        hidden = _layer(layer, hidden, keys[index], values[index], depth)
    hidden = F.layer_norm(hidden[:, 0], head.norm.normalized_shape, head.norm.weight, head.norm.bias, head.norm.eps)
    return hidden @ head.classifier_weight[depth] + head.classifier_bias[depth], code_sum


def _layer(
    layer: nn.TransformerEncoderLayer, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, depth: int
) -> torch.Tensor:
    """A pre-norm encoder layer (``norm_first=True``, no dropout at inference) on one new position
    ``(N, 1, width)`` at ``depth``, after the earlier depths' keys and values (``(N, heads,
    depths, head_dim)`` buffers, this depth's written in place); the same arithmetic as the
    layer's own forward, on its weights directly."""
    attention = layer.self_attn
    rows, _, width = hidden.shape
    heads = attention.num_heads
    normed = F.layer_norm(hidden, (width,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
    projected = F.linear(normed, attention.in_proj_weight, attention.in_proj_bias).view(rows, 3, heads, -1)
    keys[:, :, depth] = projected[:, 1]
    values[:, :, depth] = projected[:, 2]
    query = projected[:, 0].unsqueeze(2)  # (N, heads, 1, head_dim)
    # the newest depth sees every earlier one
    mixed = F.scaled_dot_product_attention(query, keys[:, :, : depth + 1], values[:, :, : depth + 1])
    hidden = hidden + F.linear(mixed.view(rows, 1, width), attention.out_proj.weight, attention.out_proj.bias)
    normed = F.layer_norm(hidden, (width,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
    inner = layer.activation(F.linear(normed, layer.linear1.weight, layer.linear1.bias))
    return hidden + F.linear(inner, layer.linear2.weight, layer.linear2.bias)
