"""The training losses of the model: next-slot cross-entropies, the contrast, grounding and idle-head terms.

:class:`SlotLossesMixin` computes them from the LM's final hidden states (and, for the
grounding term, from the inputs that one decoder layer receives); ``LOSS_TERMS`` names the
entries that make up the total loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mllm.chat import IGNORE
from mllm.positions import rotate_half

# The terms of DualTokenMLLMOutput.loss; other entries of ``losses`` are diagnostics (accuracies, CE per depth).
LOSS_TERMS = ("text", "pixel", "semantic", "contrast", "grounding", "idle_heads")


class SlotLossesMixin:
    """Losses of :class:`~mllm.modeling.DualTokenMLLMForCausalLM`.

    Reads the host model's ``config``, ``layout``, ``text_logits``, ``pixel_logits`` and its
    depth heads ``pixel_head`` and ``semantic_head`` (None when absent).
    """

    def _decoder_layer(self, decoder: nn.Module, index: int | None) -> nn.Module:
        layers = getattr(decoder, "layers", None)
        if layers is None:
            raise ValueError(f"the grounding loss needs a decoder with .layers; {type(decoder).__name__} has none")
        index = len(layers) // 2 if index is None else index
        if not 0 <= index < len(layers):
            raise ValueError(f"grounding_layer={index}; the LM has decoder layers 0..{len(layers) - 1}")
        layer = layers[index]
        attention = getattr(layer, "self_attn", None)
        needed = ("q_proj", "k_proj", "head_dim", "scaling")
        if attention is None or not all(hasattr(attention, name) for name in needed) or hasattr(attention, "q_norm"):
            raise ValueError(
                f"the grounding loss reads the attention of a Llama/Qwen2-style layer (self_attn with q_proj, "
                f"k_proj, rotary position embeddings, no q_norm); {type(layer).__name__} is not one"
            )
        return layer

    def _capture_layer_input(self, decoder: nn.Module, index: int | None, captured: dict[str, Any]) -> Any:
        """Keep the hidden states and rotary embeddings that decoder layer ``index`` receives."""
        layer = self._decoder_layer(decoder, index)
        captured["layer"] = layer

        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if "hidden" not in captured:  # a checkpointed layer runs twice; the first call is the forward
                captured["hidden"] = args[0] if args else kwargs["hidden_states"]
                captured["rope"] = kwargs.get("position_embeddings")

        return layer.register_forward_pre_hook(grab, with_kwargs=True)

    def _grounding_loss(
        self,
        captured: dict[str, Any],
        index: torch.Tensor,
        slots: torch.Tensor,
        allowed: torch.Tensor,
        segment_ids: torch.Tensor | None,
        heads: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``-log`` of the attention mass on the answer's slots (mean over answers and heads), and the mass."""
        layer, hidden, rope = captured["layer"], captured["hidden"], captured.get("rope")
        attention = layer.self_attn
        text = self.config.text_config
        num_heads, num_kv = (
            text.num_attention_heads,
            getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        )
        if not 1 <= heads <= num_heads:
            raise ValueError(f"grounding_heads={heads}; the layer has {num_heads} attention heads")
        if rope is None:
            raise ValueError("the grounding loss needs the rotary embeddings that the decoder hands its layers")
        cos, sin = rope
        head_dim = attention.head_dim
        if cos.shape[-1] != head_dim:
            raise ValueError(f"rotary width {cos.shape[-1]} != head_dim {head_dim}: partial rotary is not supported")
        usable = (slots & allowed[index[:, 0]]).any(dim=-1)
        index, slots = index[usable], slots[usable]
        if not index.shape[0]:
            zero = hidden.sum() * 0.0
            return zero, zero.detach()
        rows, queries = index[:, 0], index[:, 1]
        normed = layer.input_layernorm(hidden)
        count, length = index.shape[0], hidden.shape[1]
        cos, sin = cos.expand(hidden.shape[0], -1, -1), sin.expand(hidden.shape[0], -1, -1)
        query = attention.q_proj(normed[rows, queries]).view(count, num_heads, head_dim)[:, :heads]
        query = query * cos[rows, queries][:, None] + rotate_half(query) * sin[rows, queries][:, None]
        keys = attention.k_proj(normed).view(hidden.shape[0], length, num_kv, head_dim)  # once per batch row
        keys = keys * cos[:, :, None] + rotate_half(keys) * sin[:, :, None]
        key = keys[rows][:, :, torch.arange(heads, device=keys.device) // (num_heads // num_kv)]  # (N, L, heads, hd)
        scores = torch.einsum("nhd,nlhd->nhl", query, key).float() * attention.scaling
        seen = allowed[rows] & (torch.arange(length, device=rows.device)[None] <= queries[:, None])
        if segment_ids is not None:
            own = segment_ids[rows, queries][:, None]
            seen &= (segment_ids[rows] == 0) | (segment_ids[rows] == own)
        log_attention = scores.masked_fill(~seen[:, None], float("-inf")).log_softmax(dim=-1)
        log_mass = log_attention.masked_fill(~(slots & seen)[:, None], float("-inf")).logsumexp(dim=-1)
        return -log_mass.mean(), log_mass.exp().mean().detach()

    def compute_losses(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        contrast_rows: torch.Tensor | None = None,
        contrast_beta: float = 0.1,
        pixel_depth_weights: Sequence[float] | None = None,
        slot_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Next-slot losses: the hidden state at position t predicts the labels of slot t + 1.

        ``slot_weights`` ``(B, L)``: the weight of each slot's pixel cross-entropy (default 1).
        """
        if labels.dim() == 2:
            labels = labels.unsqueeze(-1)
        labels = labels.masked_fill(labels < 0, IGNORE)
        layout = self.layout
        split = self.config.semantic_depth
        mismatched = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
        if contrast_rows is not None and contrast_rows.numel():
            mismatched[contrast_rows[:, 1]] = True
        context, target = hidden[:, :-1], labels[:, 1:]
        pixel_target = target[..., split:]
        is_pixel_all = layout.is_pixel(pixel_target).all(dim=-1)
        target = target.masked_fill(mismatched[:, None, None], IGNORE)  # no likelihood from mismatched rows
        losses: dict[str, torch.Tensor] = {}
        chunk = getattr(self.config, "loss_chunk_size", 0)

        first = target[..., 0]
        is_text = (first >= 0) & ~layout.is_semantic(first) & ~layout.is_pixel(first)
        if bool(is_text.any()):
            truth = first[is_text]
            if chunk and truth.shape[0] > chunk:
                nll, hits = chunked_nll(self.text_logits, context[is_text], truth, chunk)
                losses["text"], losses["text_acc"] = nll.mean(), hits.float().mean().detach()
            else:
                logits = self.text_logits(context[is_text]).float()
                losses["text"] = F.cross_entropy(logits, truth)
                losses["text_acc"] = (logits.argmax(-1) == truth).float().mean().detach()

        is_pixel = is_pixel_all & ~mismatched[:, None]
        if bool(is_pixel_all.any()):
            codes = pixel_target[is_pixel_all] - layout.pixel_offset
            if chunk and codes.shape[0] > chunk:
                nll, hits = chunked_nll(self.pixel_logits, context[is_pixel_all], codes, chunk, codes)
            else:
                logits = self.pixel_logits(context[is_pixel_all], codes).float()
                nll = F.cross_entropy(logits.transpose(1, 2), codes, reduction="none")  # (slots, depth)
                hits = logits.argmax(-1) == codes
            rows = is_pixel_all.nonzero()[:, 0]  # the batch row of each slot
            kept = ~mismatched[rows]
            if bool(kept.any()):
                if slot_weights is None:
                    per_depth = nll[kept].mean(dim=0)
                else:
                    weight = slot_weights[:, 1:][is_pixel_all][kept].float()
                    per_depth = (nll[kept] * weight[:, None]).sum(dim=0) / weight.sum()
                if pixel_depth_weights is None:
                    losses["pixel"] = per_depth.mean()
                else:
                    losses["pixel"] = _depth_weighted_mean(per_depth, pixel_depth_weights)
                losses["pixel_acc"] = hits[kept].float().mean().detach()
                if codes.shape[1] > 1 and not torch.is_grad_enabled():  # held-out diagnostics: CE per RVQ depth
                    losses.update({f"pixel_depth{d + 1}": value for d, value in enumerate(per_depth)})
            if mismatched.any():
                image_nll = torch.zeros(labels.shape[0], device=nll.device).index_add(0, rows, nll.sum(dim=-1))
                margin = image_nll[contrast_rows[:, 1]] - image_nll[contrast_rows[:, 0]]
                losses["contrast"] = F.softplus(-contrast_beta * margin).mean()
                losses["contrast_margin"] = margin.mean().detach()

        if self.semantic_head is not None:
            semantic_target = target[..., :split]
            is_semantic = layout.is_semantic(semantic_target).all(dim=-1) & is_pixel
            if bool(is_semantic.any()):
                codes = semantic_target[is_semantic] - layout.semantic_offset
                if chunk and codes.shape[0] > chunk:
                    losses["semantic"] = chunked_nll(self.semantic_head, context[is_semantic], codes, chunk, codes)[
                        0
                    ].mean()
                else:
                    logits = self.semantic_head(context[is_semantic], codes).float()
                    losses["semantic"] = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
        if torch.is_grad_enabled():
            idle = self._idle_heads_term(context, losses)
            if idle is not None:
                losses["idle_heads"] = idle
        return losses

    def _idle_heads_term(self, context: torch.Tensor, losses: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Zero times the output of every trainable head that had no target in this batch.

        A batch of VQA alone gives the depth heads no loss. Every engine must then treat them
        alike: DeepSpeed ZeRO-1/2 gives such parameters a zero gradient (AdamW still moves them
        with its momentum and decay), and ZeRO-3 (DeepSpeed 0.19) even re-applies their last
        real gradient. Running the idle head on one slot, times zero, gives it an exact zero
        gradient through its own forward (so ZeRO-3 gathers its weights), in every engine.
        """
        terms = []
        probe = context[:1, :1].reshape(1, -1)
        for name, head in (("pixel", self.pixel_head), ("semantic", self.semantic_head)):
            if head is None or name in losses or not any(p.requires_grad for p in head.parameters()):
                continue
            codes = torch.zeros(1, head.depth, dtype=torch.long, device=context.device)
            terms.append(head(probe, codes).float().sum() * 0.0)
        return torch.stack(terms).sum() if terms else None


def chunked_nll(
    logits_fn: Any, hidden: torch.Tensor, truth: torch.Tensor, chunk_size: int, *inputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target fp32 negative log-likelihoods and hits of ``logits_fn(hidden, *inputs)``, ``chunk_size`` rows at a time.

    ``hidden`` ``(N, H)``; ``truth`` ``(N,)`` or ``(N, D)`` (a depth head's codes, which it also
    reads as teacher-forcing ``inputs``); returns two tensors of ``truth``'s shape. Each chunk's
    logits come out in the head's dtype and only its log-softmax runs in fp32; the chunk is
    checkpointed, so its logits are recomputed in the backward pass instead of kept. Over the
    184k-entry vocabulary the whole fp32 logits of one 4096-slot sequence take 3 GB, and a
    depth head's 8 x 16,384 per slot as much for 729 slots; autograd would keep them.
    Equals ``F.cross_entropy(logits_fn(hidden, *inputs).float(), truth, reduction="none")``.
    """
    nll, hits = [], []
    for start in range(0, truth.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        args = (logits_fn, hidden[rows], truth[rows], *(tensor[rows] for tensor in inputs))
        if torch.is_grad_enabled():
            part, hit = checkpoint(_chunk_nll, *args, use_reentrant=False)
        else:
            part, hit = _chunk_nll(*args)
        nll.append(part)
        hits.append(hit)
    return torch.cat(nll), torch.cat(hits)


def _chunk_nll(
    logits_fn: Any, hidden: torch.Tensor, truth: torch.Tensor, *inputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of :func:`chunked_nll`."""
    logits = logits_fn(hidden, *inputs)
    log_probs = logits.float().log_softmax(dim=-1)
    return -log_probs.gather(-1, truth.unsqueeze(-1)).squeeze(-1), logits.argmax(-1) == truth


def _depth_weighted_mean(per_depth: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """``sum(w_d * CE_d) / sum(w_d)`` over the RVQ depths; the weights are checked first."""
    if len(weights) != per_depth.shape[0]:
        raise ValueError(
            f"pixel_depth_weights has {len(weights)} entries; the model writes {per_depth.shape[0]} pixel depth(s)"
        )
    scale = torch.tensor(weights, dtype=per_depth.dtype, device=per_depth.device)
    if bool((scale < 0).any()) or float(scale.sum()) <= 0:
        raise ValueError(f"pixel_depth_weights={list(weights)}; expected >= 0, not all 0")
    return (per_depth * scale).sum() / scale.sum()
