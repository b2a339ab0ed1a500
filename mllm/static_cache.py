"""A static KV cache and a lean one-position decoder step for Qwen2 / Llama-style LMs.

After the prefill (the model's own forward, which builds transformers' dynamic cache), the keys
and values are copied once into buffers sized for the whole generation, ``(B, kv_heads,
prompt + new, head_dim)`` per layer (rounded up, see :class:`StaticSteps`). Each step then
writes its position in place and runs the decoder layers directly: the same modules and the
same attention function transformers calls (so the same numbers), without its per-call mask
building, cache bookkeeping and output wrapping, which cost more than the arithmetic for a
small LM on a CPU. Fixed buffers are also what CUDA graphs and ``torch.compile`` need.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import rotate_half

logger = logging.getLogger(__name__)


def supports_static_steps(model: Any) -> bool:
    """Whether :class:`StaticSteps` can run this model's LM: Qwen2 / Llama-shaped layers (no
    query / key norms, a gated MLP), full attention everywhere, sdpa or eager attention, and 1-D
    rotary positions whose frequencies do not depend on the sequence length."""
    decoder = model.llm.get_decoder()
    config = model.llm.config
    layers = getattr(decoder, "layers", None)
    if zero3_partitioned(model):  # the step reads weights that ZeRO-3 gathers only into modules that run
        return False
    if getattr(model, "_grid_rotary", None) is not None or layers is None or not hasattr(decoder, "rotary_emb"):
        return False
    if getattr(decoder.rotary_emb, "rope_type", "default") in LENGTH_DEPENDENT_ROPE:
        return False
    if set(getattr(config, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        return False
    if config._attn_implementation not in ("sdpa", "eager"):
        return False
    attention_parts = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")
    return all(
        all(hasattr(layer.self_attn, name) for name in attention_parts)
        and not hasattr(layer.self_attn, "q_norm")
        and all(hasattr(layer, name) for name in ("input_layernorm", "post_attention_layernorm", "mlp"))
        and all(hasattr(layer.mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        for layer in layers
    )


def zero3_partitioned(model: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitioned this model's parameters (each rank holds a shard; a
    module's are gathered while it runs)."""
    return any(hasattr(param, "ds_status") for param in model.parameters())


# Rotary types whose frequencies are rescaled by the longest position seen so far: a table made
# once for all the steps would not match them.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


class StaticSteps:
    """The LM's decoder fed one position per row per step from a static KV cache.

    ``cache``: transformers' cache after the prefill of the prompt; ``mask``: ``(B, prompt +
    max_new)``, 1 where a row has a real position (its prompt's padding is 0), for the prompt
    and the ``max_new`` steps that follow; ``first_position`` ``(B, 1)``: each row's rotary
    position at the first step (the steps after it count up by one). ``compile_mode``: run each
    step through ``torch.compile`` with this mode (``"default"``, ``"reduce-overhead"``: CUDA
    graphs, ...); None runs it eagerly.

    Where a step writes, its rotary angles and its image slot come from small device tensors,
    not Python numbers; the rotary cosines and sines of all the steps are made once here
    (transformers' rotary module on all the positions: the same values it gives one at a time).
    Under CUDA graphs (:func:`uses_cuda_graphs`) every step also has the same shapes: the cache
    holds ``prompt + max_new`` positions rounded up to a multiple of :data:`CACHE_ROUNDING` and
    each step attends to all of them through a mask of the ones written so far, so the steps of
    a generation (and of every generation of the same rounded size) are one graph, recorded
    once. Otherwise a step attends to the positions written so far only, which is less work.
    """

    def __init__(
        self,
        model: Any,
        cache: Any,
        mask: torch.Tensor,
        max_new: int,
        first_position: torch.Tensor,
        compile_mode: str | None = None,
    ) -> None:
        self.compile_mode = compile_mode
        self.model = model
        self.decoder = model.llm.get_decoder()
        self.attention = ALL_ATTENTION_FUNCTIONS[model.llm.config._attn_implementation]
        rows, total = mask.shape
        prompt_length = total - max_new
        capacity = -(-total // CACHE_ROUNDING) * CACHE_ROUNDING
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for index in range(len(self.decoder.layers)):
            keys, values = cache.layers[index].keys, cache.layers[index].values
            shape = (*keys.shape[:2], capacity, keys.shape[-1])
            self.keys.append(keys.new_zeros(shape))
            self.values.append(values.new_zeros(shape))
            self.keys[-1][:, :, :prompt_length] = keys
            self.values[-1][:, :, :prompt_length] = values
        device = mask.device
        self.allowed = torch.zeros(rows, 1, 1, capacity, dtype=torch.bool, device=device)
        self.allowed[:, 0, 0, :total] = mask.bool()
        self.positions = torch.arange(capacity, device=device)
        positions = first_position + torch.arange(max_new, device=device)
        cos, sin = self.decoder.rotary_emb(self.keys[0], positions)  # (B, max_new, head_dim) each
        self.cos, self.sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over the heads
        self.prompt_length = torch.full((1,), prompt_length, dtype=torch.long, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.image_index = torch.zeros(1, dtype=torch.long, device=device)
        self.length, self.total, self.max_new = prompt_length, total, max_new  # positions written so far, at the end
        self.fixed_shapes = compile_mode is not None and uses_cuda_graphs(compile_mode, device)
        if self.fixed_shapes:
            # Tensors a CUDA graph may read and write in place at fixed addresses, as
            # transformers' StaticCache marks its buffers.
            for tensor in (
                *self.keys,
                *self.values,
                self.allowed,
                self.positions,
                self.cos,
                self.sin,
                self.prompt_length,
                self.step_index,
                self.image_index,
            ):
                torch._dynamo.mark_static_address(tensor)

    def step(self, slots: torch.Tensor, image_index: int) -> torch.Tensor:
        """``slots`` ``(B, 1, C)`` (or ``(B, 1)`` text ids) at the next position of each row ->
        last hidden states ``(B, H)``. ``image_index``: the slots' index in the image being drawn
        (-1 for text)."""
        if self.length == self.total:
            raise ValueError(f"the static cache is full: all {self.max_new} steps it was made for have run")
        self.length += 1
        self.image_index.fill_(image_index)
        run = slot_step if self.compile_mode is None else compiled(slot_step, self.compile_mode, slots.device)
        hidden = run(self, slots, None if self.fixed_shapes else self.length)
        self.step_index.add_(1)
        return hidden


# The static cache's length is rounded up to a multiple of this, so that generations of nearby
# lengths share one compiled graph (and one CUDA graph).
CACHE_ROUNDING = 64


def compiled(function: Callable, mode: str, device: torch.device | str) -> Callable:
    """``function`` through ``torch.compile(mode=mode, dynamic=True)``, made once per function,
    mode and device type (batch sizes, prompt lengths and, outside CUDA graphs, the attended
    length vary: dynamic shapes keep that to a few graphs instead of one per shape). On a CPU the graph's kernels are called from generated
    C++ rather than Python (inductor's ``cpp_wrapper``): at one position per row that call
    overhead is what compiling is for. If compiling or running the compiled code fails (a
    backend this machine lacks, a mode this device cannot use), a warning says so and the eager
    ``function`` runs from then on: the steps it is used for write the same values again when
    rerun, so a retry is safe."""
    device_type = torch.device(device).type
    key = (function, mode, device_type)
    if key not in _COMPILED:
        # A graph per head, batch size, guidance on / off and sampling setting can be more than
        # dynamo's default of 8 per function, past which it would run the rest eagerly.
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        if device_type == "cpu":
            options = torch._inductor.list_mode_options(mode) | {"cpp_wrapper": True}
            _COMPILED[key] = torch.compile(function, options=options, dynamic=True)
        else:
            _COMPILED[key] = torch.compile(function, mode=mode, dynamic=True)

    def run(*args: Any) -> Any:
        if _COMPILED[key] is function:
            return function(*args)
        if uses_cuda_graphs(mode, device_type):
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are read already
        try:
            return _COMPILED[key](*args)
        except Exception as error:  # noqa: BLE001 -- any compiler failure falls back to eager
            logger.warning(
                "torch.compile(mode=%r) of %s failed (%s); running it eagerly", mode, function.__name__, error
            )
            _COMPILED[key] = function
            return function(*args)

    return run


_COMPILED: dict[tuple[Callable, str, str], Callable] = {}
RECOMPILE_LIMIT = 64


def slot_step(static: StaticSteps, slots: torch.Tensor, length: int | None) -> torch.Tensor:
    """One step of :class:`StaticSteps`: the slots' input embeddings, then :func:`decoder_step`
    (one function, so that ``torch.compile`` makes one graph of both). ``length``: the positions
    written after this step, to attend to those only; None to attend to the whole cache through
    the mask (the same shapes at every step)."""
    index = static.image_index.expand(slots.shape[0], 1)
    embeds = static.model.embed_slots(slots, index)
    write_at = static.prompt_length + static.step_index  # (1,): this step's place in the cache
    if length is None:
        mask = static.allowed & (static.positions <= write_at)
    else:
        mask = static.allowed[..., :length]
    rotary = (static.cos.index_select(2, static.step_index), static.sin.index_select(2, static.step_index))
    keys, values = static.keys, static.values
    return decoder_step(static.decoder, static.attention, keys, values, embeds, rotary, mask, write_at, length)


def uses_cuda_graphs(mode: str, device: torch.device | str) -> bool:
    """Whether ``torch.compile(mode=mode)`` records CUDA graphs on ``device``."""
    return torch.device(device).type == "cuda" and mode in ("reduce-overhead", "max-autotune")


def decoder_step(
    decoder: Any,
    attention_function: Callable,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    embeds: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    write_at: torch.Tensor,
    length: int | None = None,
) -> torch.Tensor:
    """The decoder layers on one new position per row, written at index ``write_at`` (a ``(1,)``
    tensor) of the static ``keys`` / ``values`` (one ``(B, kv_heads, L, head_dim)`` buffer per
    layer), attending to their first ``length`` positions (None: all ``L``) as ``mask`` ``(B, 1,
    1, length or L)`` allows; ``(B, 1, H)`` -> ``(B, H)``. ``rotary``: this position's ``(cos,
    sin)``, ``(B, 1, 1, head_dim)`` each.

    The arithmetic of transformers' Qwen2 / Llama decoder layer, op for op (so the same
    numbers), with the projections called on their weights directly: at one position per row
    the calls, not the arithmetic, are most of a small LM's step on a CPU."""
    hidden = embeds
    cos, sin = rotary
    rows = embeds.shape[0]
    for index, layer in enumerate(decoder.layers):
        attention, mlp = layer.self_attn, layer.mlp
        normed = layer.input_layernorm(hidden)
        shape = (rows, 1, -1, attention.head_dim)
        query = F.linear(normed, attention.q_proj.weight, attention.q_proj.bias).view(shape).transpose(1, 2)
        key = F.linear(normed, attention.k_proj.weight, attention.k_proj.bias).view(shape).transpose(1, 2)
        value = F.linear(normed, attention.v_proj.weight, attention.v_proj.bias).view(shape).transpose(1, 2)
        query = query * cos + rotate_half(query) * sin
        keys[index].index_copy_(2, write_at, key * cos + rotate_half(key) * sin)
        values[index].index_copy_(2, write_at, value)
        output, _ = attention_function(
            attention,
            query,
            keys[index] if length is None else keys[index][:, :, :length],
            values[index] if length is None else values[index][:, :, :length],
            mask,
            dropout=0.0,
            scaling=attention.scaling,
            sliding_window=getattr(attention, "sliding_window", None),
        )
        hidden = hidden + F.linear(output.reshape(rows, 1, -1), attention.o_proj.weight, attention.o_proj.bias)
        normed = layer.post_attention_layernorm(hidden)
        gate = F.linear(normed, mlp.gate_proj.weight, mlp.gate_proj.bias)
        up = F.linear(normed, mlp.up_proj.weight, mlp.up_proj.bias)
        hidden = hidden + F.linear(mlp.act_fn(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)
    return decoder.norm(hidden)[:, -1]
