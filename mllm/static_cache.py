"""A static KV cache and a lean one-position decoder step for Qwen2 / Llama-style LMs.

After the prefill (the model's own forward, which builds transformers' dynamic cache), the keys
and values are copied once into buffers sized for the whole generation, ``(B, kv_heads,
prompt + new, head_dim)`` per layer. Each step then writes its position in place and runs the
decoder layers directly: the same modules and the same attention function transformers calls
(so the same numbers), without its per-call mask building, cache bookkeeping and output
wrapping, which cost more than the arithmetic for a small LM on a CPU. Fixed buffer shapes are
also what CUDA graphs and ``torch.compile`` need.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

logger = logging.getLogger(__name__)


def supports_static_steps(model: Any) -> bool:
    """Whether :class:`StaticSteps` can run this model's LM: Qwen2 / Llama-shaped layers, full
    attention everywhere, sdpa or eager attention, and 1-D rotary positions."""
    decoder = model.llm.get_decoder()
    config = model.llm.config
    layers = getattr(decoder, "layers", None)
    if getattr(model, "_grid_rotary", None) is not None or layers is None or not hasattr(decoder, "rotary_emb"):
        return False
    if set(getattr(config, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        return False
    if config._attn_implementation not in ("sdpa", "eager"):
        return False
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")
    return all(
        all(hasattr(layer.self_attn, name) for name in needed)
        and hasattr(layer, "input_layernorm")
        and hasattr(layer, "post_attention_layernorm")
        and hasattr(layer, "mlp")
        for layer in layers
    )


class StaticSteps:
    """The LM's decoder fed one position per row per step from a static KV cache.

    ``cache``: transformers' cache after the prefill of ``prompt_length`` positions;
    ``max_new``: how many steps follow. ``compile_mode``: run each step through ``torch.compile``
    with this mode (``"default"``, ``"reduce-overhead"``: CUDA graphs, ...); None runs it eagerly.
    """

    def __init__(
        self, model: Any, cache: Any, prompt_length: int, max_new: int, compile_mode: str | None = None
    ) -> None:
        self.compile_mode = compile_mode
        self.decoder = model.llm.get_decoder()
        config = model.llm.config
        self.attention = ALL_ATTENTION_FUNCTIONS[config._attn_implementation]
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for index in range(len(self.decoder.layers)):
            keys, values = cache.layers[index].keys, cache.layers[index].values
            shape = (*keys.shape[:2], prompt_length + max_new, keys.shape[-1])
            self.keys.append(keys.new_zeros(shape))
            self.values.append(values.new_zeros(shape))
            self.keys[-1][:, :, :prompt_length] = keys
            self.values[-1][:, :, :prompt_length] = values
        self.length = prompt_length

    def step(self, embeds: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``embeds`` ``(B, 1, H)`` at ``position_ids`` ``(B, 1)`` -> last hidden states ``(B, H)``.

        ``mask``: ``(B, 1, 1, L)`` boolean over the positions so far (this one included), or None
        when every row sees all of them."""
        if self.length >= self.keys[0].shape[2]:
            raise ValueError(f"the static cache holds {self.keys[0].shape[2]} positions; all are used")
        self.length += 1
        run = decoder_step if self.compile_mode is None else compiled(decoder_step, self.compile_mode)
        return run(self.decoder, self.attention, self.keys, self.values, embeds, position_ids, mask, self.length)


def compiled(function: Callable, mode: str) -> Callable:
    """``function`` through ``torch.compile(mode=mode, dynamic=True)``, made once per function and
    mode (the cache length changes every step: dynamic shapes keep that to a few graphs instead of
    one per length). If compiling or running the compiled code fails (a backend this machine lacks,
    a mode this device cannot use), a warning says so and the eager ``function`` runs from then on:
    the steps it is used for write the same values again when rerun, so a retry is safe."""
    key = (function, mode)
    if key not in _COMPILED:
        # A graph per depth head, batch size and first / second / later depth is more than
        # dynamo's default of 8 per function, past which it would run the rest eagerly.
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        _COMPILED[key] = torch.compile(function, mode=mode, dynamic=True)

    def run(*args: Any) -> Any:
        if _COMPILED[key] is function:
            return function(*args)
        if mode in ("reduce-overhead", "max-autotune") and torch.cuda.is_available():
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


_COMPILED: dict[tuple[Callable, str], Callable] = {}
RECOMPILE_LIMIT = 64


def decoder_step(
    decoder: Any,
    attention_function: Callable,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    embeds: torch.Tensor,
    position_ids: torch.Tensor,
    mask: torch.Tensor | None,
    length: int,
) -> torch.Tensor:
    """The decoder layers on one new position per row, written at index ``length - 1`` of the
    static ``keys`` / ``values`` (one ``(B, kv_heads, L, head_dim)`` buffer per layer), attending
    to the first ``length`` positions; ``(B, 1, H)`` -> ``(B, H)``."""
    position = length - 1
    hidden = embeds
    cos, sin = decoder.rotary_emb(hidden, position_ids)
    for index, layer in enumerate(decoder.layers):
        attention = layer.self_attn
        residual = hidden
        normed = layer.input_layernorm(hidden)
        shape = (*normed.shape[:-1], -1, attention.head_dim)
        query = attention.q_proj(normed).view(shape).transpose(1, 2)
        key = attention.k_proj(normed).view(shape).transpose(1, 2)
        value = attention.v_proj(normed).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        keys[index][:, :, position : position + 1] = key
        values[index][:, :, position : position + 1] = value
        output, _ = attention_function(
            attention,
            query,
            keys[index][:, :, :length],
            values[index][:, :, :length],
            mask,
            dropout=0.0,
            scaling=attention.scaling,
            sliding_window=getattr(attention, "sliding_window", None),
        )
        hidden = residual + attention.o_proj(output.reshape(*normed.shape[:-1], -1).contiguous())
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return decoder.norm(hidden)[:, -1]
