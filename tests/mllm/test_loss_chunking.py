"""The chunked text cross-entropy: the same loss and gradients, without the full logits."""

from __future__ import annotations

import copy

import pytest
import torch
from mllm_fixtures import tiny_qwen2
from transformers import Qwen2Config

from mllm.config import DualTokenMLLMConfig
from mllm.modeling import DualTokenMLLMForCausalLM
from mllm.vocab import VocabLayout

TEXT, SEM, PIX = 300, 48, 80
BATCH, LENGTH = 2, 27  # per row: 16 text slots and a generated 2 x 4 image (with its two boundary slots)
GRID, IMAGE_AT = (2, 4), 12


@pytest.fixture(scope="module")
def model() -> DualTokenMLLMForCausalLM:
    llm = tiny_qwen2(TEXT)
    layout = VocabLayout(TEXT, SEM, PIX, 64)
    return DualTokenMLLMForCausalLM.from_llm(
        llm, layout, grid_size=GRID, depth_head_layers=1, depth_head_heads=2, pixel_depth=2
    ).train()


def _batch() -> dict[str, torch.Tensor]:
    """Slots ``(B, L, 3)``: text (the token id in column 0), then a generated image (its pixel codes
    in columns 1-2, semantic column empty) between its boundary tokens, then text again."""
    generator = torch.Generator().manual_seed(3)
    text = torch.randint(0, TEXT, (BATCH, LENGTH), generator=generator)
    ids = torch.stack([text, torch.full_like(text, -1), torch.full_like(text, -1)], dim=-1)
    layout = VocabLayout(TEXT, SEM, PIX, 64)
    image = slice(IMAGE_AT + 1, IMAGE_AT + 1 + GRID[0] * GRID[1])
    ids[:, IMAGE_AT, 0] = layout.gen_start_id
    ids[:, image, 0] = -1
    ids[:, image, 1:] = layout.pixel_ids(torch.randint(0, PIX, (BATCH, GRID[0] * GRID[1], 2), generator=generator))
    ids[:, image.stop, 0] = layout.gen_end_id
    labels = ids.masked_fill(ids < 0, -100)
    labels[0, :3] = -100  # unlabelled positions are left out of every chunk
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(text)}


def _loss_and_grads(model: DualTokenMLLMForCausalLM, chunk: int) -> tuple[dict, dict]:
    model = copy.deepcopy(model)
    model.config.loss_chunk_size = chunk
    out = model(**_batch())
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {name: value.detach() for name, value in out.losses.items()}, grads


# 16 pixel slots and 34 text targets: chunks that divide both, one or neither.
@pytest.mark.parametrize("chunk", [1, 6, 8, 17])
def test_chunked_loss_and_gradients_equal_the_whole(model, chunk):
    whole_losses, whole_grads = _loss_and_grads(model, 0)
    losses, grads = _loss_and_grads(model, chunk)
    assert set(losses) == set(whole_losses) >= {"text", "text_acc", "pixel", "pixel_acc"}
    for name, value in whole_losses.items():
        torch.testing.assert_close(losses[name], value, msg=name)
    assert grads.keys() == whole_grads.keys()
    assert "llm.lm_head.weight" in grads or "llm.model.embed_tokens.weight" in grads
    for name, grad in whole_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def _logit_rows(model: DualTokenMLLMForCausalLM, chunk: int) -> dict[str, int]:
    """Largest row count of a logits tensor: ``written`` by the LM head, and kept by autograd for
    the backward pass, vocabulary-wide (``kept_text``) or pixel-codebook-wide (``kept_pixel``)."""
    model = copy.deepcopy(model)
    model.config.loss_chunk_size = chunk
    widths = {"kept_text": model.get_output_embeddings().weight.shape[0], "kept_pixel": PIX}
    rows = {"written": 0, "kept_text": 0, "kept_pixel": 0}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # (views of) weights are no logits

    def record_output(module, args, output):
        rows["written"] = max(rows["written"], output.reshape(-1, output.shape[-1]).shape[0])

    def pack(tensor):
        for name, width in widths.items():
            if tensor.dim() >= 2 and width in tensor.shape and tensor.untyped_storage().data_ptr() not in weights:
                rows[name] = max(rows[name], tensor.numel() // width)  # logits per class, any layout
        return tensor

    hook = model.get_output_embeddings().register_forward_hook(record_output)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(**_batch())
    out.loss.backward()
    hook.remove()
    return rows


def test_chunking_never_builds_or_keeps_the_whole_logits(model):
    labelled = BATCH * (LENGTH - 1 - GRID[0] * GRID[1]) - 2  # text targets; labels[0, 1:3] masked
    whole = _logit_rows(model, 0)
    # The probe sees the whole logits when they exist: text targets, and pixel slots x depths.
    assert whole == {"written": labelled, "kept_text": labelled, "kept_pixel": BATCH * GRID[0] * GRID[1] * 2}
    # Chunked: never more than one chunk's logits at a time, and none kept for the backward pass.
    assert _logit_rows(model, 8) == {"written": 8, "kept_text": 0, "kept_pixel": 0}


def test_loss_chunk_size_is_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="loss_chunk_size=-1"):
        DualTokenMLLMConfig(loss_chunk_size=-1)
    config = DualTokenMLLMConfig(text_config=Qwen2Config(), loss_chunk_size=512)
    config.save_pretrained(tmp_path)
    assert DualTokenMLLMConfig.from_pretrained(tmp_path).loss_chunk_size == 512
