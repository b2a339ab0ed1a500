"""The typed config of an LLM stage (``configs/stages/*/*.yaml``) and its validation.

``model:`` builds the first stage's model. Its fields that are also fields of
:class:`~mllm.config.DualTokenMLLMConfig` (``read``, ``write``, ``input_fusion``, the depth
head's size, the image positions and attention) take their defaults from that class's
signature and are validated by building one (:meth:`ModelConfig.model_options`), so a default
or an allowed value changes in one place; the YAML keys stay flat under ``model:``. The rest of
``model:`` is what only training needs: where the base LM and the text tokenizer come from,
the chat template's name, the code-embedding start, the dtype and the attention backend.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import types
import typing
from dataclasses import Field, dataclass, field, fields
from typing import Any

from mllm.config import DualTokenMLLMConfig
from mllm.generation import SamplingConfig
from mllm.losses import LOSS_TERMS
from mllm.vocab import ROW_GROUPS
from tokenizer.config import ConfigError
from training.config import DeepSpeedConfig, LoopConfig, OptimConfig

SOURCES = ("vqa", "t2i", "caption")
CODE_EMBEDDING_INITS = ("random", "codebook", "mean")
VQA_TURNS = ("conversation", "independent")
# idle_heads is not a weight a stage may set: it is exactly zero, there only to give heads
# without a target in a batch a zero gradient (mllm.losses, SlotLossesMixin._idle_heads_term).
WEIGHTED_LOSS_TERMS = tuple(term for term in LOSS_TERMS if term != "idle_heads")

_MODEL_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(DualTokenMLLMConfig.__init__).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}
_MODEL_FIELD = "model_field"  # metadata marking a ModelConfig field as a DualTokenMLLMConfig field


def _model_field(name: str) -> Field:
    """A field of DualTokenMLLMConfig with that class's default (a list where it has a tuple, as YAML gives)."""
    default = _MODEL_DEFAULTS[name]
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata={_MODEL_FIELD: True})
    return field(default=default, metadata={_MODEL_FIELD: True})


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_weight(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


# --------------------------------------------------------------------- model.llm_config
_NO_TYPE = object()  # a key whose type the config class does not state: any value passes here


def _llm_config_keys(config_class: type) -> dict[str, Any]:
    """The keys a transformers config class takes, each with its type (``_NO_TYPE`` when unstated).

    The keys are the class's ``__init__`` parameters (for the dataclass configs of transformers 5
    these include ``PretrainedConfig``'s common ones), the keys of a default instance's ``to_dict``
    (``output_attentions`` ...) and the aliases of ``attribute_map`` (GPT-2's ``hidden_size``).
    A type is the parameter's annotation, or the type of its default where there is none.
    """
    return dict(_cached_llm_config_keys(config_class))


@functools.cache
def _cached_llm_config_keys(config_class: type) -> tuple[tuple[str, Any], ...]:
    import torch

    try:
        hints = typing.get_type_hints(config_class, localns={"torch": torch})
    except Exception:  # an annotation that does not resolve: fall back to the defaults' types
        hints = {}
    keys: dict[str, Any] = {}
    for name, parameter in inspect.signature(config_class.__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        hint = hints.get(name, parameter.annotation)
        if hint is parameter.empty or isinstance(hint, str):
            default = parameter.default
            hint = _NO_TYPE if default is parameter.empty or default is None else type(default)
        keys[name] = hint
    try:
        defaults = config_class().to_dict()
    except Exception:  # a config class that needs arguments: its signature is all there is
        defaults = {}
    for name in defaults:
        if not name.startswith("_"):
            keys.setdefault(name, _NO_TYPE)
    for alias, target in getattr(config_class, "attribute_map", {}).items():
        keys.setdefault(alias, keys.get(target, _NO_TYPE))
    return tuple(keys.items())


def _type_matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value (None, bool, int, float, str, list, dict) fits a type annotation."""
    if hint is _NO_TYPE or hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_type_matches(value, arm) for arm in args)
    if origin is typing.Literal:
        return value in args
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and len(args) > 1 and args[-1] is not Ellipsis:  # tuple[int, str]: one type per place
            return len(value) == len(args) and all(map(_type_matches, value, args))
        return all(_type_matches(element, args[0]) for element in value) if args else True
    if origin is dict or hint is dict or typing.is_typeddict(hint):
        return isinstance(value, dict)
    if isinstance(hint, type) and hint.__module__.startswith("torch"):
        return isinstance(value, str)  # torch.dtype: YAML names it ("bfloat16")
    if isinstance(hint, type):
        return isinstance(value, (hint, dict))  # a sub-config class is given as a mapping
    return True


def _describe_type(hint: Any) -> str:
    """A type annotation as a config file's reader would say it: ``int``, ``list of str or null``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        arms = [_describe_type(arm) for arm in args if arm is not type(None)]
        return " or ".join(dict.fromkeys(arms + (["null"] if type(None) in args else [])))
    if origin is typing.Literal:
        return "one of " + "|".join(map(str, args))
    if hint is type(None):
        return "null"
    if origin in (list, tuple, typing.Sequence):
        return f"list of {_describe_type(args[0])}" if args else "list"
    if origin is dict or typing.is_typeddict(hint):
        return "mapping"
    if isinstance(hint, type) and hint.__module__.startswith("torch"):
        return "a torch dtype name"
    return getattr(hint, "__name__", str(hint))


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[-2:]) if len(lines) > 1 else (lines[0] if lines else type(error).__name__)


def validate_llm_config(llm_config: Any) -> dict[str, Any]:
    """``model.llm_config`` checked against the transformers config class of its ``model_type``.

    transformers keeps an unknown keyword as a plain attribute (``num_hiden_layers: 2`` builds the
    default depth without a word) and reports a wrong type with a long traceback, so both are
    caught here, when the YAML loads: an unknown key lists the valid ones (closest first), a wrong
    type names ``model.llm_config.KEY`` and the expected type. Keys that transformers converts
    (``rope_theta`` -> ``rope_parameters``, ``torch_dtype`` -> ``dtype``) pass. Returns a copy in
    which an integer given for a float field is a float (YAML reads ``10000`` as an int, and
    transformers' strict config classes refuse it).
    """
    from transformers import CONFIG_MAPPING

    if not isinstance(llm_config, dict):
        raise ConfigError(f"model.llm_config must be a mapping of transformers config keys, got {llm_config!r}")
    model_type = llm_config.get("model_type")
    if model_type is None:
        raise ConfigError("model.llm_config.model_type is missing; it names the transformers config (qwen2, llama ...)")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=5, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else " (see transformers.CONFIG_MAPPING)"
        raise ConfigError(f"model.llm_config.model_type={model_type!r} is not a transformers model type{hint}")
    config_class = CONFIG_MAPPING[model_type]
    keys = _llm_config_keys(config_class)
    checked: dict[str, Any] = {"model_type": model_type}
    for key, value in llm_config.items():
        if key == "model_type":
            continue
        hint = keys.get(key, _NO_TYPE)
        if not _type_matches(value, hint):
            numeric = isinstance(value, str) and _parses_as_float(value)
            advice = f" (YAML reads {value} as text: write it with a decimal point, e.g. 1.0e-6)" if numeric else ""
            raise ConfigError(
                f"model.llm_config.{key}={value!r}; expected {_describe_type(hint)} "
                f"({config_class.__name__}.{key}){advice}"
            )
        if isinstance(value, int) and not isinstance(value, bool) and float in _arms(hint) and int not in _arms(hint):
            value = float(value)
        checked[key] = value
    try:
        built = config_class(**{key: value for key, value in checked.items() if key != "model_type"}).to_dict()
    except Exception as error:  # transformers' own validation (strict dataclasses, value checks)
        raise ConfigError(f"model.llm_config ({config_class.__name__}): {_first_line(error)}") from None
    # A key outside the class's own that transformers kept verbatim is one it does not read.
    unknown = [key for key in checked if key not in keys and key != "model_type" and key in built]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(keys), n=3, cutoff=0.6)
        valid = close + sorted(name for name in keys if name not in close)
        guess = f"did you mean {' or '.join(close)}? " if close else ""
        raise ConfigError(
            f"unknown key model.llm_config.{key} for model_type {model_type!r} ({config_class.__name__}); "
            f"{guess}valid keys: {', '.join(valid)}"
        )
    return checked


def _arms(hint: Any) -> tuple[Any, ...]:
    """The alternatives of a union annotation (``float | None`` -> float, NoneType); else the annotation."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class ModelConfig:
    """How the first stage builds the model (later stages load ``stage.init`` instead)."""

    llm_config: dict[str, Any] = field(default_factory=dict)  # a transformers config dict (model_type: qwen2 ...)
    llm_pretrained: str | None = None  # local folder or hub id of a causal LM; wins over llm_config
    text_tokenizer: str | None = None  # HF tokenizer folder; None = train sentencepiece on the Shapes world
    sentencepiece_vocab: int = 256
    chat_template: str = "tiny"  # tiny | qwen
    read: list[str] = _model_field("read")
    write: list[str] = _model_field("write")
    input_fusion: str = _model_field("input_fusion")
    depth_head_layers: int = _model_field("depth_head_layers")
    depth_head_heads: int = _model_field("depth_head_heads")
    depth_head_hidden: int = _model_field("depth_head_hidden")
    # Row + column embeddings added to every image slot, so that the LM knows where in the grid a
    # slot sits without working it out from 1-D positions: false | learned (true) | sincos (fixed
    # 2-D sine-cosine features of norm image_position_scale; mllm.positions.sincos_grid_table) |
    # projector (the same features added to the visual projector's input, so that a slot's
    # embedding mixes what it shows with where it is; needs input_fusion concat_mlp or sum_mlp) |
    # gated (the features scaled channel by channel by a learned linear map of the slot's codes,
    # added to the slot's embedding: the content path stays as it is).
    image_position_embedding: bool | str = _model_field("image_position_embedding")
    image_position_scale: float = _model_field("image_position_scale")
    # causal | bidirectional: with bidirectional, every slot of an image the model reads attends to
    # its whole image (a prefix-LM block); generated images and text stay causal. Needs SDPA or eager.
    image_attention: str = _model_field("image_attention")
    # 1d | 2d: with 2d, the slots of a read image rotate by their row and column in two of every
    # three rotary frequencies (mllm.positions.GridRotaryEmbedding; M-RoPE-like); text and generated
    # images keep the LM's own 1-D rotary positions. Needs a rotary LM (Llama / Qwen2 families).
    image_rope: str = _model_field("image_rope")
    # none | sincos: with sincos, the slots of an image the model draws get fixed 2-D sine-cosine row
    # and column features (norm image_position_scale) added to their input, so that the slot that
    # predicts the next one knows where in the grid it is; images the model reads are left alone.
    # Parameter-free. With it, image_position_embedding places the slots of read images only.
    generated_position_embedding: str = _model_field("generated_position_embedding")
    # > 0: the text cross-entropy over the extended vocabulary (and the depth heads' over their
    # codebooks) runs this many targets at a time, each chunk checkpointed, so the whole fp32
    # logits never exist (mllm.losses.chunked_nll; 0 = off, the sums of the demo's numbers).
    loss_chunk_size: int = _model_field("loss_chunk_size")
    # random | codebook | mean: how the rows added to the LM's embedding (boundary and code tokens)
    # start. random: the LM's own initialiser. codebook: the visual code rows (and the depth heads'
    # code embeddings) as a fixed linear map of the DualToken tokenizer's code vectors
    # (mllm.modeling.init_code_embeddings). mean: every new row at the mean text row
    # (mllm.vocab.init_rows_from_text_mean), for a pretrained LM whose text rows must not be disturbed.
    code_embedding_init: str = "random"
    max_length: int = 0  # 0 = the LM's max_position_embeddings
    attn_implementation: str = "auto"  # auto = FlashAttention-2 when installed (GPU), else SDPA
    gradient_checkpointing: bool = False
    dtype: str = "float32"  # weights dtype when loading a pretrained LM (bfloat16 on GPUs)

    def model_options(self) -> dict[str, Any]:
        """The DualTokenMLLMConfig fields of this section, by name (``DualTokenMLLMForCausalLM.from_llm``'s options)."""
        return {spec.name: getattr(self, spec.name) for spec in fields(self) if spec.metadata.get(_MODEL_FIELD)}

    def __post_init__(self) -> None:
        _require(
            self.chat_template in ("tiny", "qwen"), f"model.chat_template={self.chat_template!r}; expected tiny|qwen"
        )
        _require(
            self.code_embedding_init in CODE_EMBEDDING_INITS,
            f"model.code_embedding_init={self.code_embedding_init!r}; expected {'|'.join(CODE_EMBEDDING_INITS)}",
        )
        try:
            DualTokenMLLMConfig(**self.model_options())  # validates the fields (the code layout comes later)
        except ValueError as error:
            raise ConfigError(f"model.{error}") from None
        if self.llm_config:
            self.llm_config = validate_llm_config(self.llm_config)
        _require(
            bool(self.llm_config) or bool(self.llm_pretrained),
            "model.llm_config or model.llm_pretrained is required to build the first stage's model",
        )


@dataclass
class StageConfig:
    name: str = "stage"
    init: str | None = None  # a previous stage's model folder; None = build from `model`
    trainable: list[str] = field(default_factory=lambda: ["*"])  # parameter-name globs
    frozen: list[str] = field(default_factory=list)  # globs removed from `trainable`
    loss_weights: dict[str, float] = field(default_factory=lambda: {"text": 1.0, "pixel": 1.0, "semantic": 1.0})
    uncond_prob: float = 0.1  # caption dropped -> learns the unconditional branch for CFG
    # loss_weights.contrast > 0 adds, for every captioned text-to-image item, the same image under
    # another record's caption, and the term softplus(-contrast_beta * margin) (see model.forward).
    contrast_beta: float = 0.1
    # One weight per pixel RVQ depth: the pixel loss becomes the weighted mean of the per-depth
    # cross-entropies (null = plain mean). Deeper depths hold fine residuals that stay near their
    # unigram entropy in short runs; lower weights there leave the LM's gradient to depth 1.
    pixel_depth_weights: list[float] | None = None
    # loss_weights.grounding > 0: answers whose data gives boxes (the Shapes writer gives the
    # objects each answer is about) train the first `grounding_heads` attention heads of decoder
    # layer `grounding_layer` (null = the middle layer) to look at those image slots from the
    # position that predicts the answer (see model.forward).
    grounding_layer: int | None = None
    grounding_heads: int = 1
    # Text-to-image pairs with boxes (the Shapes writer gives its objects'): the pixel
    # cross-entropy of the slots under the caption's objects counts this many times (1 = plain).
    object_pixel_weight: float = 1.0
    # Text-to-image items: this fraction of the generated slots get random pixel codes as their
    # input (their targets stay true; semantic codes, when written, are left alone), so the next
    # slot cannot just be copied from its neighbours and has to come from the caption as well
    # (0 = off). Held-out losses are computed on clean inputs.
    image_input_noise: float = 0.0
    # Row groups of the input embedding (and of the LM head, tied or not) that train, when the
    # embedding is among `trainable`: some of text | boundary | semantic | pixel (null = every row).
    # The other rows get a zero gradient, so a stage can teach the LM its new tokens without
    # moving the pretrained text rows (with tied embeddings those are the LM head too).
    embedding_rows: list[str] | None = None

    @property
    def contrast(self) -> bool:
        return self.loss_weights.get("contrast", 0.0) > 0

    @property
    def grounding(self) -> bool:
        return self.loss_weights.get("grounding", 0.0) > 0

    def __post_init__(self) -> None:
        _require(0.0 <= self.uncond_prob < 1.0, f"stage.uncond_prob={self.uncond_prob}; expected in [0, 1)")
        unknown = set(self.loss_weights) - set(WEIGHTED_LOSS_TERMS)
        _require(not unknown, f"stage.loss_weights has unknown terms {sorted(unknown)}; expected {WEIGHTED_LOSS_TERMS}")
        for name, weight in self.loss_weights.items():
            # A negative weight would train the model away from its data (and contrast < 0 would
            # silently mean off): 0 switches a term off.
            _require(
                _is_weight(weight),
                f"stage.loss_weights.{name}={weight!r}; expected a finite number >= 0 (0 switches the term off)",
            )
        _require(self.contrast_beta > 0, f"stage.contrast_beta={self.contrast_beta}; expected > 0")
        _require(
            self.grounding_layer is None or (isinstance(self.grounding_layer, int) and self.grounding_layer >= 0),
            f"stage.grounding_layer={self.grounding_layer!r}; expected a decoder layer index >= 0 or null (the middle one)",
        )
        _require(
            _is_weight(self.object_pixel_weight) and self.object_pixel_weight > 0,
            f"stage.object_pixel_weight={self.object_pixel_weight!r}; expected a finite number > 0 (1 = plain mean)",
        )
        _require(
            _is_weight(self.image_input_noise) and self.image_input_noise < 1.0,
            f"stage.image_input_noise={self.image_input_noise!r}; expected a fraction in [0, 1) (0 = off)",
        )
        _require(
            isinstance(self.grounding_heads, int) and self.grounding_heads >= 1,
            f"stage.grounding_heads={self.grounding_heads!r}; expected an integer >= 1",
        )
        if self.embedding_rows is not None:
            _require(
                isinstance(self.embedding_rows, list) and set(self.embedding_rows) <= set(ROW_GROUPS),
                f"stage.embedding_rows={self.embedding_rows!r}; expected a list of some of {'|'.join(ROW_GROUPS)} "
                "(null = every row)",
            )
        weights = self.pixel_depth_weights
        if weights is not None:
            _require(
                isinstance(weights, list) and all(_is_weight(w) for w in weights) and any(w > 0 for w in weights),
                f"stage.pixel_depth_weights={weights!r}; expected a list of finite numbers >= 0, one per pixel "
                "depth, not all 0",
            )


@dataclass
class MLLMDataConfig:
    codes: str = "runs/tiny/data/train/codes"  # code shards of the training images (training/data/code_shards.py)
    val_codes: str | None = None  # code shards of the held-out images (default: `codes`)
    conversations: list[str] = field(default_factory=list)  # LLaVA-format JSON / JSONL files
    text_image: list[str] = field(default_factory=list)  # text-to-image JSONL files
    image_root: str | None = None  # default: each file's folder
    mix: dict[str, float] = field(default_factory=lambda: {"vqa": 1.0, "t2i": 1.0, "caption": 0.0})
    val_conversations: list[str] = field(default_factory=list)
    val_text_image: list[str] = field(default_factory=list)
    # How a VQA record's turns are trained: "conversation" (one dialogue, later turns see the
    # earlier ones) or "independent" (each question-answer pair sees the image and itself only,
    # positions as in a one-question prompt; for sets of independent questions such as the
    # Shapes world's, whose other questions would give answers away).
    vqa_turns: str = "conversation"
    # A record whose sequence is longer than the model's context (model.max_length): "drop" leaves
    # it out before training; "truncate" cuts the sequence to the context where the cut keeps every
    # image block whole and leaves a label (else drops it). Both are counted in the log and in
    # metrics.json (overlong_dropped, overlong_truncated).
    overlong: str = "drop"

    def __post_init__(self) -> None:
        _require(
            self.overlong in ("drop", "truncate"), f"data.overlong={self.overlong!r}; expected drop|truncate"
        )
        _require(
            self.vqa_turns in VQA_TURNS, f"data.vqa_turns={self.vqa_turns!r}; expected one of {'|'.join(VQA_TURNS)}"
        )
        unknown = set(self.mix) - set(SOURCES)
        _require(not unknown, f"data.mix has unknown sources {sorted(unknown)}; expected a subset of {SOURCES}")
        _require(any(w > 0 for w in self.mix.values()), "data.mix gives every source weight 0")
        _require(all(w >= 0 for w in self.mix.values()), "data.mix weights must be >= 0")


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    merge_on_save: bool = True  # the final model folder holds merged weights (adapter saved beside it)


@dataclass
class EvalConfig:
    vqa_samples: int = 256  # held-out questions answered greedily at the end of the stage
    max_new_tokens: int = 8
    batch_size: int = 32


@dataclass
class MLLMStageConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(llm_config={"model_type": "qwen2"}))
    stage: StageConfig = field(default_factory=StageConfig)
    data: MLLMDataConfig = field(default_factory=MLLMDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Image-sampling settings written to the model folder's sampling.json (mllm.inference.read_sampling),
    # the defaults Pipeline.generate, `dualtoken generate` and the evaluation use with this model:
    # some of temperature, top_k, top_p, cfg (empty = no file: SamplingConfig's defaults apply).
    sampling: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = {spec.name for spec in fields(SamplingConfig)}
        unknown = sorted(set(self.sampling) - known)
        _require(not unknown, f"sampling has unknown settings {unknown}; expected some of {sorted(known)}")
        for name, value in self.sampling.items():
            _require(
                isinstance(value, (int, float)) and not isinstance(value, bool),
                f"sampling.{name}={value!r}; expected a number",
            )
        try:
            SamplingConfig(**self.sampling)
        except ValueError as error:
            raise ConfigError(f"sampling.{error}") from None
        _require(
            self.stage.embedding_rows is None or self.optim.weight_decay == 0,
            f"stage.embedding_rows={self.stage.embedding_rows} keeps the other rows by giving them a zero gradient, "
            f"which AdamW's weight decay would still shrink: set optim.weight_decay=0 (got {self.optim.weight_decay})",
        )
