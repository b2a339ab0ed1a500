"""Feeding a left-padded batch to the model one slot at a time, with a KV cache and no host syncs.

A prefill reads the prompts; each later step appends one slot (a text token or an image slot)
per row. The attention mask over prompt and new slots, the rows' next positions and the image
slot index are built on the device once and sliced per step, and the model is told not to
range-check ids it did not get from a user, so a step reads nothing back to the host: on a GPU
the steps queue up without waiting for each other. Without the cache every step re-runs the
whole sequence (a reference for tests and benchmarks).
"""

from __future__ import annotations

import torch

from mllm.modeling import DualTokenMLLMForCausalLM
from mllm.static_cache import StaticSteps, supports_static_steps


class SlotRunner:
    """Prefill ``batch`` (``input_ids`` ``(B, L)`` or ``(B, L, C)``, ``attention_mask`` ``(B, L)``,
    left-padded), then feed up to ``max_new`` slots, returning the last hidden states ``(B, H)``.
    ``compile_mode``: run the static-cache steps through ``torch.compile`` with this mode (None: eagerly)."""

    def __init__(
        self,
        model: DualTokenMLLMForCausalLM,
        batch: dict[str, torch.Tensor],
        use_cache: bool,
        max_new: int,
        compile_mode: str | None = None,
    ) -> None:
        self.model = model
        self.compile_mode = compile_mode
        self.use_cache = use_cache
        device = next(model.parameters()).device
        self.ids = batch["input_ids"].to(device)
        prompt_mask = batch["attention_mask"].to(device)
        self.prompt_length = prompt_mask.shape[1]
        new = torch.ones(prompt_mask.shape[0], max_new, dtype=prompt_mask.dtype, device=device)
        self.mask = torch.cat([prompt_mask, new], dim=1)
        self.next_position = prompt_mask.sum(-1, keepdim=True)  # (B, 1): positions count real tokens only
        self.steps = 0
        self.cache = None
        self.static: StaticSteps | None = None
        self.attention = self._step_attention(prompt_mask)

    def _step_attention(self, prompt_mask: torch.Tensor) -> dict[str, torch.Tensor | None] | None:
        """The per-step mask handed to the LM as transformers' per-layer-type mapping (so it does
        not inspect the mask on the host), as a ``(B, 1, 1, L)`` boolean over the cache; None
        where this LM needs transformers to build its own masks (sliding-window layers)."""
        layer_types = set(getattr(self.model.llm.config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            return None
        # Decided once per call: without padding a one-query step needs no mask at all (as
        # transformers itself decides per step), which keeps its attention kernel unchanged.
        full = self.mask.bool()[:, None, None, :] if not bool(prompt_mask.all()) else None
        return {"full_attention": full}

    def start(self) -> torch.Tensor:
        mask = self.mask[:, : self.prompt_length]
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(self.ids, attention_mask=mask, position_ids=positions, use_cache=self.use_cache)
        self.cache = out.past_key_values if self.use_cache else None
        if self.use_cache and self.attention is not None and supports_static_steps(self.model):
            max_new = self.mask.shape[1] - self.prompt_length
            self.static = StaticSteps(self.model, self.cache, self.mask, max_new, self.next_position, self.compile_mode)
        # contiguous, as every later step's output is: a compiled consumer then sees one layout
        return out.hidden_states[:, -1].contiguous()

    def feed(self, slots: torch.Tensor, image_index: int = -1) -> torch.Tensor:
        """Append ``(N, C)`` slots, or ``(N,)`` text tokens, and return the new last hidden states ``(N, H)``.

        ``image_index``: the slots' index in the image being drawn (-1 for text), which the
        model cannot infer from one slot alone (its 2-D image position embedding needs it).
        """
        self.steps += 1
        length = self.prompt_length + self.steps
        if self.steps > self.mask.shape[1] - self.prompt_length:
            raise ValueError(
                f"fed {self.steps} slots; this runner was made for {self.mask.shape[1] - self.prompt_length}"
            )
        if slots.dim() == 1 and (self.static is None or getattr(self.model, "_grid_rotary", None) is not None):
            text = torch.full((slots.shape[0], self.model.config.slot_width), -1, dtype=torch.long, device=slots.device)
            text[:, 0] = slots
            slots = text
        slots = slots.unsqueeze(1)
        if not self.use_cache:
            self.ids = torch.cat([self.ids, slots], dim=1)
            out = self.model(self.ids, attention_mask=self.mask[:, :length], position_ids=None, use_cache=False)
            return out.hidden_states[:, -1]
        if self.static is not None:
            return self.static.step(slots, image_index)
        index = torch.full(slots.shape[:2], image_index, dtype=torch.long, device=slots.device)
        position = self.next_position + (self.steps - 1)
        if self.attention is None:
            attention: object = self.mask[:, :length]
        else:
            full = self.attention["full_attention"]
            attention = {"full_attention": None if full is None else full[..., :length]}
        out = self.model(
            slots,
            attention_mask=attention,
            position_ids=position,
            past_key_values=self.cache,
            use_cache=True,
            image_slot_index=index,
            check_ids=False,
        )
        self.cache = out.past_key_values
        return out.hidden_states[:, -1]
