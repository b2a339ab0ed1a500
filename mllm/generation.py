"""Sampling: text answers and images, with a KV cache and classifier-free guidance.

Text: greedy or temperature / top-k / top-p, restricted to the text vocabulary, stopping at
the template's end token. Images: one slot at a time; at each slot the depth head picks the
RVQ codes depth by depth; with an unconditional prompt the conditional and unconditional
rows run in *one* batched forward and the logits are mixed as
``uncond + scale * (cond - uncond)``. Prompts of different lengths are left-padded, with
positions counted from the first real token, so a batch gives the same result as its
rows one by one. ``use_cache=False`` re-runs the whole sequence at every step (reference and
benchmark only).

The image slot loop makes no device-to-host transfer: CFG mixing, top-k / top-p / temperature,
the draw and the code-to-id mapping are tensor operations, the codes stay on the device until
the image is complete, and each row's draw comes from its own generator without a per-row
``torch.multinomial`` (:func:`sample`). A test counts host transfers inside the loop;
:func:`device_sync_guard` makes CUDA raise on any.

Per slot, the random noise of every depth's draw is made first (:func:`draw_noise`, from the
generators, in the order :func:`sample` would use it); then :func:`pick_codes` runs the depth
head, the guidance and the draws without touching a generator, and the LM takes the slot
(:class:`mllm.decoding.SlotRunner`). With ``compile_mode`` each of the two is one compiled graph.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from mllm.chat import Sequence, collate_sequences
from mllm.decoding import SlotRunner
from mllm.modeling import DualTokenMLLMForCausalLM
from mllm.static_cache import compiled, zero3_partitioned


@dataclass
class SamplingConfig:
    """Sampling settings; ``temperature=0`` means greedy. ``cfg`` is the classifier-free guidance
    scale for images (1 = no guidance; text ignores it). These defaults are the ones every caller
    falls back to: the inference API, the commands and the evaluation tasks."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg: float = 3.0

    def __post_init__(self) -> None:
        if self.cfg < 0:
            raise ValueError(f"cfg={self.cfg}; expected >= 0 (1 = no guidance)")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}; expected >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}; expected >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}; expected in (0, 1]")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (the best one always stays)."""
    logits = logits.float()
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already >= p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


Generators = torch.Generator | list[torch.Generator] | None


def sample(logits: torch.Tensor, config: SamplingConfig, generator: Generators = None) -> torch.Tensor:
    """``(N, K)`` logits -> ``(N,)`` indices, on the logits' device, without a host transfer.

    ``generator`` is one generator for the batch, or one per row: then row i's draws depend
    on its own generator only, so a row samples the same whatever else is in the batch.

    The draw is ``argmax(p / e)`` with ``e ~ Exp(1)`` per entry (the exponential race: entry k
    wins with probability ``p_k``). For one draw per row this is how ``torch.multinomial``
    samples, from the same generator stream, so codes equal ``torch.multinomial``'s at the same
    seed; with one generator per row only the noise is drawn row by row, the rest runs once.
    """
    if config.temperature == 0:
        return logits.argmax(-1)
    return sample_with_noise(logits, config, draw_noise(logits.shape, generator, logits.device))


def draw_noise(
    shape: tuple[int, ...], generator: Generators = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The ``Exp(1)`` noise of one :func:`sample` call on ``(N, K)`` logits: from ``generator``
    (one for the batch, or one per row, each row's from its own)."""
    noise = torch.empty(shape, device=device)
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
        for row, row_generator in enumerate(generator):
            noise[row].exponential_(generator=row_generator)
        return noise
    return noise.exponential_(generator=generator)


def sample_with_noise(logits: torch.Tensor, config: SamplingConfig, noise: torch.Tensor) -> torch.Tensor:
    """:func:`sample` with its noise drawn already (:func:`draw_noise`); no generator is read,
    so this part can run inside a compiled graph."""
    if config.temperature == 0:
        return logits.argmax(-1)
    # Dividing by 1 changes nothing, and skipping it saves a pass over the logits.
    scaled = logits if config.temperature == 1 else logits / config.temperature
    probs = filter_logits(scaled, config.top_k, config.top_p).softmax(-1)
    return (probs / noise).argmax(-1)


def compile_mode_for(device: torch.device | str, compile: bool | str) -> str | None:
    """The ``torch.compile`` mode for the decoding steps: False -> None (eager); True ->
    ``"reduce-overhead"`` (CUDA graphs) on CUDA, ``"default"`` elsewhere; a string is the mode itself."""
    if isinstance(compile, str):
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r}; expected one of {', '.join(COMPILE_MODES)}")
        return compile
    if not compile:
        return None
    return "reduce-overhead" if torch.device(device).type == "cuda" else "default"


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@contextlib.contextmanager
def device_sync_guard(device: torch.device | str) -> Iterator[None]:
    """On CUDA, make any device-to-host synchronisation inside the block raise
    (``torch.cuda.set_sync_debug_mode("error")``); elsewhere a no-op. Wrap a sampling call in it
    to check that the slot loop stays on the device."""
    device = torch.device(device)
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _sampler(function: Callable) -> Callable:
    """Run a sampler under ``torch.inference_mode``, or under ``torch.no_grad`` for a model whose
    parameters DeepSpeed ZeRO-3 partitioned: its hooks gather a module's parameters into it when
    the module runs, and gathered under inference mode they would be inference tensors, which
    training cannot use afterwards."""

    @functools.wraps(function)
    def run(model: DualTokenMLLMForCausalLM, *args, **kwargs):
        with torch.no_grad() if zero3_partitioned(model) else torch.inference_mode():
            return function(model, *args, **kwargs)

    return run


@_sampler
def generate_text(
    model: DualTokenMLLMForCausalLM,
    prompts: list[Sequence],
    max_new_tokens: int = 32,
    sampling: SamplingConfig | None = None,
    stop_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    generator: Generators = None,
    use_cache: bool = True,
    compile_mode: str | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> list[list[int]]:
    """Continue each prompt with text tokens until a stop id (excluded) or ``max_new_tokens``.

    Tokens stay on the device; the only host read per token is whether every row has stopped.
    ``compile_mode``: run each LM step through ``torch.compile`` with this mode (:func:`compile_mode_for`).
    ``on_tokens``: called after each step with every row's new token (-1 for a row that has
    stopped), as the tokens are drawn (one more host read per token).
    """
    sampling = sampling or SamplingConfig(temperature=0.0)
    batch = collate_sequences(prompts, pad_id, left_pad=True)
    runner = SlotRunner(model, batch, use_cache, max_new_tokens, compile_mode)
    hidden = runner.start()
    text_size = model.config.text_size
    device = hidden.device
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    tokens_out = torch.full((len(prompts), max_new_tokens), -1, dtype=torch.long, device=device)
    running = torch.ones(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits = model.text_logits(hidden)[:, :text_size]
        tokens = sample(logits, sampling, generator)
        running = running & ~torch.isin(tokens, stops)
        tokens_out[:, step] = torch.where(running, tokens, -1)
        if on_tokens is not None:
            on_tokens(tokens_out[:, step].tolist())
        if step + 1 == max_new_tokens or not bool(running.any()):
            break
        hidden = runner.feed(tokens)
    # A row's answer is its tokens up to its first stop (-1 marks a stopped row's steps).
    return [[token for token in row if token >= 0] for row in tokens_out.tolist()]


def _depth_logits(model: DualTokenMLLMForCausalLM, head_name: str, context: torch.Tensor, cached: bool):
    """``next_logits(code)`` for one slot: the depth head's cached steps, or its uncached reference."""
    head = getattr(model, head_name)
    if cached and head is not None:
        return head.steps(context).next_logits
    uncached = model.next_pixel_logits if head_name == "pixel_head" else head.next_logits
    chosen: list[torch.Tensor] = []

    def next_logits(code: torch.Tensor | None) -> torch.Tensor:
        if code is not None:
            chosen.append(code)
        return uncached(context, torch.stack(chosen, dim=1) if chosen else None)

    return next_logits


def pick_codes(
    model: DualTokenMLLMForCausalLM,
    head_name: str,
    depth_count: int,
    context: torch.Tensor,
    noise: torch.Tensor | None,
    count: int,
    guided: bool,
    cfg_scale: float,
    sampling: SamplingConfig,
    cached_depth: bool = True,
) -> torch.Tensor:
    """One slot's ``depth_count`` codes from one depth head, depth by depth: ``(rows, depth_count)``.

    ``context``: the LM's last hidden states ``(rows, H)``; with ``guided`` the first ``count``
    rows are conditional and the rest their unconditional twins: their logits are mixed as
    ``uncond + cfg_scale * (cond - uncond)`` and both rows get the drawn code. ``noise``:
    ``(depth_count, count, K)`` from :func:`draw_noise` (None when greedy). No generator is read and
    nothing goes to the host, so a whole slot can run as one compiled graph."""
    next_logits = _depth_logits(model, head_name, context, cached_depth)
    code = None
    chosen = []
    for depth in range(depth_count):
        logits = next_logits(code)
        if guided:
            cond, uncond = logits[:count].float(), logits[count:].float()
            logits = uncond + cfg_scale * (cond - uncond)
        code = sample_with_noise(logits, sampling, None if noise is None else noise[depth])
        code = torch.cat([code, code]) if guided else code
        chosen.append(code)
    return torch.stack(chosen, dim=1)


@_sampler
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
    cached_depth: bool = True,
    forbid_syncs: bool = False,
    compile_mode: str | None = None,
) -> torch.Tensor:
    """Pixel codes ``(B, h, w, Dp)`` for prompts ending in ``<image_gen_start>``.

    With ``unconditional`` (the empty-caption prompt) classifier-free guidance is on: the
    unconditional rows join the batch (``batch_cfg=True``: one forward per slot) or run as a
    second model call per slot (``batch_cfg=False``, for comparison). ``cached_depth=False``
    runs the depth head without its depth cache (reference only; the same codes).
    ``forbid_syncs=True`` runs the slot loop under :func:`device_sync_guard` (on CUDA any
    device-to-host synchronisation in it raises; the prefill before it may read the host).
    ``compile_mode``: run each slot's depth-head decoding and draws (:func:`pick_codes`) and
    each LM step through ``torch.compile`` with this mode (:func:`compile_mode_for`); the first
    image pays the compilation.
    """
    sampling = sampling or SamplingConfig()
    config = model.config
    layout = model.layout
    count = len(prompts)
    guided = unconditional is not None
    rows = prompts + [unconditional] * count if guided else list(prompts)
    batch = collate_sequences(rows, pad_id, left_pad=True)
    slots_total = config.image_slots
    if guided and not batch_cfg:
        halves = [
            {key: value[:count] for key, value in batch.items()},
            {key: value[count:] for key, value in batch.items()},
        ]
        runners = [SlotRunner(model, half, use_cache, slots_total, compile_mode) for half in halves]
        hidden = torch.cat([runner.start() for runner in runners])
    else:
        runners = [SlotRunner(model, batch, use_cache, slots_total, compile_mode)]
        hidden = runners[0].start()
    split = config.semantic_depth
    device = hidden.device
    all_codes = torch.empty(count, slots_total, config.pixel_depth, dtype=torch.long, device=device)
    slot_ids = torch.full((len(rows), config.slot_width), -1, dtype=torch.long, device=device)

    pick = pick_codes if compile_mode is None else compiled(pick_codes, compile_mode, device)
    heads = [("pixel_head", config.pixel_depth, config.pixel_size)]
    if model.semantic_head is not None:
        heads.append(("semantic_head", config.semantic_depth, config.semantic_size))

    def noise(depth: int, codebook: int) -> torch.Tensor | None:
        # each depth's draw as sample() makes it, in the same order, so the same seed gives the same codes
        if sampling.temperature == 0:
            return None
        return torch.stack([draw_noise((count, codebook), generator, device) for _ in range(depth)])

    with device_sync_guard(device) if forbid_syncs else contextlib.nullcontext():
        for slot in range(slots_total):
            draws = [noise(depth, codebook) for _, depth, codebook in heads]
            pixel = pick(model, *heads[0][:2], hidden, draws[0], count, guided, cfg_scale, sampling, cached_depth)
            all_codes[:, slot] = pixel[:count]
            slot_ids[:, split:] = pixel + layout.pixel_offset  # sampled codes are in range by construction
            if model.semantic_head is not None:
                semantic = pick(
                    model, *heads[1][:2], hidden, draws[1], count, guided, cfg_scale, sampling, cached_depth
                )
                slot_ids[:, :split] = semantic + layout.semantic_offset
            if len(runners) == 1:
                hidden = runners[0].feed(slot_ids, slot)
            else:
                hidden = torch.cat([runners[0].feed(slot_ids[:count], slot), runners[1].feed(slot_ids[count:], slot)])
    height, width = config.grid_size
    with torch.inference_mode(False):  # a plain tensor: callers may feed the codes to code that records gradients
        return all_codes.cpu().view(count, height, width, config.pixel_depth).clone()
