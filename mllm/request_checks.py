"""The checks on a request to :class:`~mllm.inference.Pipeline`, made before any model runs.

:class:`PipelineError` is what a bad input raises, naming the argument and what was expected;
the limits on a request (prompt length, answer length, guidance, temperature, seed) and the
functions that check prompts, histories, list arguments, integers and sampling settings, and
decode text that arrives as bytes. The ``chat`` and ``generate`` commands use the same checks
on their flags.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC
from typing import Any

from mllm.generation import SamplingConfig

MAX_PROMPT_CHARS = 2000
MAX_NEW_TOKENS = 32_768  # the bound on an answer when the model's config states no context length
# Guidance beyond this scales logit differences past what float32 softmax resolves (the paper uses
# about 3); temperatures below MIN_TEMPERATURE overflow the scaled logits (use 0 for greedy).
MAX_CFG = 1000.0
MIN_TEMPERATURE = 1e-4
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a 64-bit seed; seed + k must stay below this


class PipelineError(ValueError):
    """Input the pipeline cannot take (empty, oversized or undecodable prompt, not an image, bad
    option); raised before any model runs, naming the argument and what was expected."""


def decode_text(value: Any, what: str) -> str:
    """``value`` as a str: bytes are decoded as UTF-8; anything else, or text that is not valid
    UTF-8 (undecodable command-line bytes arrive as lone surrogates), raises :class:`PipelineError`
    naming ``what`` and the position of the first bad byte."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise PipelineError(
                f"the {what} is not valid UTF-8: byte 0x{value[error.start]:02x} at position {error.start}"
            ) from None
    if not isinstance(value, str):
        raise PipelineError(f"the {what} is a {type(value).__name__}; expected a str")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(value[error.start])
        # Python decodes a byte it cannot read (from argv, or a file read with surrogateescape) as U+DC80..U+DCFF.
        bad = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise PipelineError(f"the {what} is not valid UTF-8: {bad} at position {error.start}") from None
    return value


def check_prompt(text: Any, what: str) -> str:
    """``text`` as a non-empty str of at most :data:`MAX_PROMPT_CHARS` (bytes decoded as UTF-8), or
    :class:`PipelineError` naming ``what``."""
    text = decode_text(text, what)
    if not text.strip():
        raise PipelineError(f"empty {what}: give some text")
    if len(text) > MAX_PROMPT_CHARS:
        raise PipelineError(f"the {what} has {len(text):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
    return text


def item_name(kind: str, items: SequenceABC[Any], index: int) -> str:
    """``question`` for a batch of one, ``question at questions[2]`` in a larger one."""
    return kind if len(items) == 1 else f"{kind} at {kind}s[{index}]"


def check_sequence(value: Any, what: str, allow_empty: bool = False) -> SequenceABC[Any]:
    """A list or tuple argument (a lone string is refused: it would be read one character at a time)."""
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, SequenceABC):
        raise PipelineError(f"{what} is a {type(value).__name__}; expected a list")
    if not value and not allow_empty:
        raise PipelineError(f"{what} is empty; expected at least one")
    return value


def check_history(history: Any, what: str) -> list[tuple[str, str]]:
    """``history`` as a list of ``(question, answer)`` strings (None = no history)."""
    if history is None:
        return []
    checked = []
    for index, turn in enumerate(check_sequence(history, what, allow_empty=True)):
        if isinstance(turn, (str, bytes)) or not isinstance(turn, SequenceABC) or len(turn) != 2:
            raise PipelineError(f"{what}[{index}] is {turn!r:.60}; expected a (question, answer) pair of strings")
        question = check_prompt(turn[0], f"{what}[{index}] question")
        checked.append((question, decode_text(turn[1], f"{what}[{index}] answer")))
    return checked


def check_integer(value: Any, name: str, low: int, high: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < low
        or (high is not None and value > high)
    ):
        expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise PipelineError(f"{name}={value!r}; expected {expected}")
    return int(value)


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise PipelineError(f"{name}={value!r}; expected a finite number")
    return float(value)


def check_sampling(
    cfg: float, top_k: int, top_p: float, temperature: float, label: Callable[[str], str] = str
) -> SamplingConfig:
    """The sampling settings as a :class:`SamplingConfig`, or :class:`PipelineError` naming the bad one.

    ``label`` turns an argument name into what the user typed (the commands pass ``--top-p`` style).
    """
    cfg = _real(cfg, label("cfg"))
    if not 0.0 <= cfg <= MAX_CFG:
        raise PipelineError(f"{label('cfg')}={cfg!r}; expected a guidance scale in [0, {MAX_CFG:g}] (1 = off)")
    temperature = _real(temperature, label("temperature"))
    if temperature != 0.0 and not MIN_TEMPERATURE <= temperature:
        raise PipelineError(
            f"{label('temperature')}={temperature!r}; expected 0 (greedy) or a number >= {MIN_TEMPERATURE:g}"
        )
    top_p = _real(top_p, label("top_p"))
    if not 0.0 < top_p <= 1.0:
        raise PipelineError(f"{label('top_p')}={top_p!r}; expected a number in (0, 1]")
    top_k = check_integer(top_k, label("top_k"), 0)
    return SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, cfg=cfg)


def check_sampling_config(sampling: Any) -> SamplingConfig:
    if not isinstance(sampling, SamplingConfig):
        raise PipelineError(f"sampling is a {type(sampling).__name__}; expected a SamplingConfig or None")
    fields = dataclasses.asdict(sampling)
    return check_sampling(label=lambda name: f"sampling.{name}", **fields)


__all__ = [
    "MAX_CFG",
    "MAX_NEW_TOKENS",
    "MAX_PROMPT_CHARS",
    "MIN_TEMPERATURE",
    "SEED_LIMIT",
    "PipelineError",
    "check_history",
    "check_integer",
    "check_prompt",
    "check_sampling",
    "check_sampling_config",
    "check_sequence",
    "decode_text",
    "item_name",
]
