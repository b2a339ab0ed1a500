"""The model of an LLM stage: building the first one, choosing what trains, writing its folder.

:func:`build_model` makes a fresh unified model (a base LM from a config or from pretrained
weights, a text tokenizer extended with the code shards' layout) and never loads a stage's
weights; later stages load the previous stage's folder (:func:`mllm.model_folder.load_model_folder`).
:func:`save_model_folder` writes that folder, LoRA adapters merged (peft).
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import torch

from mllm.chat import QWEN_TEMPLATE, ChatTemplate
from mllm.inference import write_sampling
from mllm.model_folder import METRICS_FILE, SIDECAR
from mllm.modeling import DualTokenMLLMForCausalLM, init_code_embeddings, pick_attn_implementation
from mllm.vocab import (
    TINY_CHAT_TOKENS,
    extend_tokenizer,
    init_rows_from_text_mean,
    row_mask,
    shapes_corpus,
    train_sentencepiece,
)
from tokenizer.config import ConfigError
from tokenizer.files import atomic_directory
from tokenizer.pretrained import resolve_pretrained
from training.data.code_store import CodeStore
from training.mllm_config import LoraConfig, ModelConfig
from training.mllm_data import DESCRIBE_PROMPT


def build_model(
    model_config: ModelConfig, store: CodeStore, device: str | torch.device | None = "cpu"
) -> tuple[DualTokenMLLMForCausalLM, Any]:
    """A fresh unified model and its extended text tokenizer, sized by the code shards' layout.

    ``device`` is where the model will run: it picks the attention kernel (with the weights' dtype)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    meta = store.meta
    if model_config.text_tokenizer:
        source = resolve_pretrained(model_config.text_tokenizer, "model.text_tokenizer", required_file=None)
        text_tokenizer = AutoTokenizer.from_pretrained(str(source))
    else:
        from training.data.shapes import ShapesWorld, ShapesWorldConfig

        corpus = shapes_corpus(ShapesWorld(ShapesWorldConfig()), limit=4000)
        corpus += [DESCRIBE_PROMPT, *TINY_CHAT_TOKENS]
        import tempfile

        # The tokenizer holds its model in memory: the folder it was trained into can go (the
        # stage saves it with the model).
        with tempfile.TemporaryDirectory(prefix="dualtoken-sp-") as folder:
            text_tokenizer = train_sentencepiece(corpus, folder, model_config.sentencepiece_vocab)
    dtype = getattr(torch, model_config.dtype)
    # from_config builds fp32 weights; only a pretrained LM is loaded in model_config.dtype.
    attn = pick_attn_implementation(
        model_config.attn_implementation, device, dtype if model_config.llm_pretrained else torch.float32
    )
    if model_config.llm_pretrained:
        source = resolve_pretrained(model_config.llm_pretrained, "model.llm_pretrained")
        llm = AutoModelForCausalLM.from_pretrained(str(source), attn_implementation=attn, dtype=dtype)
    else:
        payload = dict(model_config.llm_config)
        payload.setdefault("vocab_size", len(text_tokenizer))
        llm_config = AutoConfig.for_model(**payload)
        llm = AutoModelForCausalLM.from_config(llm_config, attn_implementation=attn)
    layout = extend_tokenizer(text_tokenizer, meta.semantic_codebook_size, meta.pixel_codebook_size)
    template = QWEN_TEMPLATE if model_config.chat_template == "qwen" else ChatTemplate()
    model = DualTokenMLLMForCausalLM.from_llm(
        llm,
        layout,
        semantic_depth=meta.semantic_depth,
        pixel_depth=meta.pixel_depth,
        grid_size=tuple(meta.grid),
        **model_config.model_options(),
        chat_template=template.to_dict(),
        attn_implementation=attn,
    )
    if model_config.code_embedding_init == "codebook":
        semantic, pixel = tokenizer_codebooks(store)
        init_code_embeddings(model, semantic, pixel)
    elif model_config.code_embedding_init == "mean":
        for weight in _embedding_weights(model):
            init_rows_from_text_mean(weight, layout)
    return model, text_tokenizer


def _embedding_weights(model: DualTokenMLLMForCausalLM) -> list[torch.nn.Parameter]:
    """The input embedding's weight, and the LM head's when it is not tied to it."""
    weights = [model.get_input_embeddings().weight]
    output = model.llm.get_output_embeddings()
    if output is not None and output.weight is not weights[0]:
        weights.append(output.weight)
    return weights


def tokenizer_codebooks(store: CodeStore) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The semantic and pixel codebooks of the visual tokenizer that wrote ``store``.

    The tokenizer is found through the shards' ``meta.json`` and must be the one that wrote
    them (same weight fingerprint), or the rows would describe another tokenizer's codes.
    """
    from tokenizer import DualTokenizer
    from training.data.code_shards import tokenizer_fingerprint

    meta = store.meta
    path = Path(meta.tokenizer_path)
    if not path.is_dir():
        raise ConfigError(
            f"model.code_embedding_init=codebook needs the tokenizer that wrote {store.out_dir} "
            f"({meta.tokenizer_path}, from its meta.json), which is not a folder"
        )
    visual_tokenizer = DualTokenizer.from_pretrained(path)
    if tokenizer_fingerprint(visual_tokenizer) != meta.tokenizer_fingerprint:
        raise ConfigError(
            f"{path} is not the tokenizer that wrote {store.out_dir} (weight fingerprints differ); "
            "re-tokenise or set model.code_embedding_init=random"
        )
    pixel = visual_tokenizer.pixel_quantizer.codebook if visual_tokenizer.pixel_quantizer is not None else None
    return visual_tokenizer.semantic_quantizer.codebook, pixel


def select_trainable(
    model: torch.nn.Module, trainable: list[str], frozen: list[str], embedding_rows: list[str] | None = None
) -> list[str]:
    """Set ``requires_grad`` from name globs (LoRA adapters always train); returns the trainable names.

    ``embedding_rows`` (``stage.embedding_rows``): the row groups of the input embedding and LM
    head that train; the other rows' gradients are zeroed (:func:`restrict_embedding_rows`).
    """
    names = []
    for name, param in model.named_parameters():
        wanted = any(fnmatch.fnmatchcase(name, glob) for glob in trainable) or "lora_" in name
        wanted = wanted and not any(fnmatch.fnmatchcase(name, glob) for glob in frozen)
        param.requires_grad_(wanted)
        if wanted:
            names.append(name)
    if not names:
        raise ConfigError(
            f"stage.trainable={trainable} (minus stage.frozen={frozen}) matches no parameter; "
            f"names look like {[n for n, _ in list(model.named_parameters())[:3]]}"
        )
    if embedding_rows is not None:
        restrict_embedding_rows(model, embedding_rows)
    return names


def restrict_embedding_rows(model: DualTokenMLLMForCausalLM, groups: list[str]) -> int:
    """Zero the gradient of every embedding / LM-head row outside ``groups``; returns the rows that train.

    A gradient hook rather than a separate parameter keeps the checkpoint layout of the LM. AdamW
    leaves a row whose gradient is always zero where it is only without weight decay, so the
    hook needs ``optim.weight_decay: 0`` to keep those rows exactly (:class:`MLLMStageConfig`
    refuses anything else).
    """
    weights = [weight for weight in _embedding_weights(model) if weight.requires_grad]
    if not weights:
        raise ConfigError(
            f"stage.embedding_rows={groups} restricts the embedding's rows, but no embedding trains: add "
            "'llm.model.embed_tokens.*' (or the LM's embedding name) to stage.trainable"
        )
    mask = row_mask(model.layout, groups, weights[0].shape[0])
    keep = mask.unsqueeze(1)
    for weight in weights:
        # The mask follows the gradient: the model may move to its device after this call.
        weight.register_hook(lambda grad: grad * keep.to(device=grad.device, dtype=grad.dtype))
    return int(mask.sum())


def apply_lora(model: DualTokenMLLMForCausalLM, config: LoraConfig) -> None:
    """Wrap the base LM's linear layers with LoRA adapters (peft)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=list(config.target_modules)
    )
    model.llm = get_peft_model(model.llm, peft_config)


def merge_lora(model: DualTokenMLLMForCausalLM) -> None:
    """Fold LoRA adapters into the base weights (no-op without LoRA)."""
    if hasattr(model.llm, "merge_and_unload"):
        model.llm = model.llm.merge_and_unload()


def save_model_folder(
    model: DualTokenMLLMForCausalLM,
    text_tokenizer: Any,
    directory: Path,
    sidecar: dict[str, Any],
    metrics: dict[str, float],
    state_dict: dict[str, torch.Tensor] | None = None,
    merge: bool = True,
    sampling: dict[str, float] | None = None,
) -> Path:
    """Write model + text tokenizer + sidecar + metrics through a staging folder, then its manifest, then rename.

    ``sampling`` (the stage's ``sampling:`` section), when not empty, becomes the folder's
    ``sampling.json``: the image-sampling defaults of every caller that loads the folder.
    """
    if hasattr(model.llm, "peft_config") and merge and state_dict is not None:
        raise ConfigError("merging LoRA under ZeRO-3 is not supported; set lora.merge_on_save=false")
    with atomic_directory(directory) as staging:
        if hasattr(model.llm, "peft_config"):
            model.llm.save_pretrained(str(staging / "adapter"))
            if merge:
                import copy

                model = copy.deepcopy(model)
                merge_lora(model)
        model.save_pretrained(str(staging), state_dict=state_dict, safe_serialization=True)
        text_tokenizer.save_pretrained(str(staging))
        (staging / SIDECAR).write_text(json.dumps(sidecar, indent=2, default=str))
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        if sampling:
            write_sampling(staging, **sampling)
    return directory
