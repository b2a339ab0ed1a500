"""The image and text sampler as it was before the device-resident slot loop (commit d652de1's
``mllm/generation.py``), kept for the benchmarks only: per-row ``torch.multinomial``, the depth
head re-run over its whole prefix at every depth, and host reads of codes and ids every slot.
Same inputs and outputs as :func:`mllm.generation.generate_image_codes` / ``generate_text``.
"""

from __future__ import annotations

import torch

from mllm.chat import Sequence, collate_sequences
from mllm.generation import SamplingConfig, filter_logits
from mllm.modeling import DualTokenMLLMForCausalLM

Generators = torch.Generator | list[torch.Generator] | None


def sample(logits: torch.Tensor, config: SamplingConfig, generator: Generators = None) -> torch.Tensor:
    """``(N, K)`` logits -> ``(N,)`` indices.

    ``generator`` is one generator for the batch, or one per row: then row i's draws depend
    on its own generator only, so a row samples the same whatever else is in the batch.
    """
    if config.temperature == 0:
        return logits.argmax(-1)
    filtered = filter_logits(logits / config.temperature, config.top_k, config.top_p)
    probs = filtered.softmax(-1)
    if isinstance(generator, list):
        if len(generator) != probs.shape[0]:
            raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows")
        rows = [torch.multinomial(row[None], 1, generator=gen) for row, gen in zip(probs, generator, strict=True)]
        return torch.cat(rows).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Runner:
    """Feeds slots to the model with or without a KV cache and returns the last hidden states."""

    def __init__(self, model: DualTokenMLLMForCausalLM, batch: dict[str, torch.Tensor], use_cache: bool) -> None:
        self.model = model
        self.use_cache = use_cache
        device = next(model.parameters()).device
        self.ids = batch["input_ids"].to(device)
        self.mask = batch["attention_mask"].to(device)
        self.cache = None

    def start(self) -> torch.Tensor:
        positions = (self.mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(self.ids, attention_mask=self.mask, position_ids=positions, use_cache=self.use_cache)
        self.cache = out.past_key_values if self.use_cache else None
        return out.hidden_states[:, -1]

    def feed(self, slots: torch.Tensor, image_index: int = -1) -> torch.Tensor:
        """Append ``(N, C)`` slots and return the new last hidden states ``(N, H)``.

        ``image_index``: the slots' index in the image being drawn (-1 for text), which the
        model cannot infer from one slot alone (its 2-D image position embedding needs it).
        """
        slots = slots.unsqueeze(1)
        self.ids = torch.cat([self.ids, slots], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        if not self.use_cache:
            return self.start()
        position = (self.mask.sum(-1, keepdim=True) - 1).clamp_min(0)
        index = torch.full(slots.shape[:2], image_index, dtype=torch.long, device=slots.device)
        out = self.model(
            slots,
            attention_mask=self.mask,
            position_ids=position,
            past_key_values=self.cache,
            use_cache=True,
            image_slot_index=index,
        )
        self.cache = out.past_key_values
        return out.hidden_states[:, -1]


@torch.no_grad()
def generate_text(
    model: DualTokenMLLMForCausalLM,
    prompts: list[Sequence],
    max_new_tokens: int = 32,
    sampling: SamplingConfig | None = None,
    stop_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    generator: Generators = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue each prompt with text tokens until a stop id (excluded) or ``max_new_tokens``."""
    sampling = sampling or SamplingConfig(temperature=0.0)
    batch = collate_sequences(prompts, pad_id, left_pad=True)
    runner = _Runner(model, batch, use_cache)
    hidden = runner.start()
    text_size = model.config.text_size
    width = model.config.slot_width
    outputs: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model.text_logits(hidden)[:, :text_size]
        tokens = sample(logits, sampling, generator)
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if token in stop_ids:
                done[row] = True
            else:
                outputs[row].append(token)
        if bool(done.all()):
            break
        slots = torch.full((len(prompts), width), -1, dtype=torch.long, device=tokens.device)
        slots[:, 0] = tokens
        hidden = runner.feed(slots)
    return outputs


@torch.no_grad()
def generate_image_codes(
    model: DualTokenMLLMForCausalLM,
    prompts: list[Sequence],
    unconditional: Sequence | None = None,
    cfg_scale: float = SamplingConfig.cfg,
    sampling: SamplingConfig | None = None,
    pad_id: int = 0,
    generator: Generators = None,
    use_cache: bool = True,
    batch_cfg: bool = True,
) -> torch.Tensor:
    """Pixel codes ``(B, h, w, Dp)`` for prompts ending in ``<image_gen_start>``.

    With ``unconditional`` (the empty-caption prompt) classifier-free guidance is on: the
    unconditional rows join the batch (``batch_cfg=True``: one forward per slot) or run as a
    second model call per slot (``batch_cfg=False``, for comparison).
    """
    sampling = sampling or SamplingConfig()
    config = model.config
    layout = model.layout
    count = len(prompts)
    guided = unconditional is not None
    rows = prompts + [unconditional] * count if guided else list(prompts)
    batch = collate_sequences(rows, pad_id, left_pad=True)
    if guided and not batch_cfg:
        halves = [
            {key: value[:count] for key, value in batch.items()},
            {key: value[count:] for key, value in batch.items()},
        ]
        runners = [_Runner(model, half, use_cache) for half in halves]
        hidden = torch.cat([runner.start() for runner in runners])
    else:
        runners = [_Runner(model, batch, use_cache)]
        hidden = runners[0].start()
    slots_total = config.image_slots
    split = config.semantic_depth
    all_codes = torch.empty(count, slots_total, config.pixel_depth, dtype=torch.long)

    def pick(next_logits, depth_count: int) -> torch.Tensor:
        chosen: torch.Tensor | None = None
        for _ in range(depth_count):
            logits = next_logits(hidden, chosen)
            if guided:
                cond, uncond = logits[:count].float(), logits[count:].float()
                logits = uncond + cfg_scale * (cond - uncond)
            code = sample(logits, sampling, generator)
            code = torch.cat([code, code]) if guided else code
            chosen = code[:, None] if chosen is None else torch.cat([chosen, code[:, None]], dim=1)
        return chosen

    for slot in range(slots_total):
        pixel = pick(model.next_pixel_logits, config.pixel_depth)
        all_codes[:, slot] = pixel[:count].cpu()
        slot_ids = torch.full((pixel.shape[0], config.slot_width), -1, dtype=torch.long, device=pixel.device)
        slot_ids[:, split:] = layout.pixel_ids(pixel)
        if model.semantic_head is not None:
            semantic = pick(model.semantic_head.next_logits, config.semantic_depth)
            slot_ids[:, :split] = layout.semantic_ids(semantic)
        if len(runners) == 1:
            hidden = runners[0].feed(slot_ids, slot)
        else:
            hidden = torch.cat([runners[0].feed(slot_ids[:count], slot), runners[1].feed(slot_ids[count:], slot)])
    height, width = config.grid_size
    return all_codes.view(count, height, width, config.pixel_depth)
