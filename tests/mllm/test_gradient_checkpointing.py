"""Gradient checkpointing of the unified model's LM: the same loss and gradients as without."""

from __future__ import annotations

import copy

import pytest
import torch
from mllm_fixtures import tiny_qwen2

from mllm.modeling import DualTokenMLLMForCausalLM
from mllm.vocab import VocabLayout

TEXT = 200


def _model() -> DualTokenMLLMForCausalLM:
    llm = tiny_qwen2(TEXT, layers=3)
    return DualTokenMLLMForCausalLM.from_llm(llm, VocabLayout(TEXT, 16, 16, 64), depth_head_layers=1).train()


def _loss_and_grads(model: DualTokenMLLMForCausalLM) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    text = torch.randint(0, TEXT, (2, 12), generator=torch.Generator().manual_seed(1))
    ids = torch.stack([text, torch.full_like(text, -1)], dim=-1)
    out = model(input_ids=ids, labels=ids.masked_fill(ids < 0, -100), attention_mask=torch.ones_like(text))
    out.loss.backward()
    return out.loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _loss_grads_and_saved(model: DualTokenMLLMForCausalLM) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """The loss, the gradients, and how many tensors autograd saved for the backward pass."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(1) or tensor, lambda tensor: tensor):
        loss, grads = _loss_and_grads(model)
    return loss, grads, len(saved)


@pytest.mark.parametrize("entry", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
def test_checkpointed_lm_gives_the_same_loss_and_gradients(entry):
    plain = _model()
    checkpointed = copy.deepcopy(plain)
    if not hasattr(checkpointed, entry):
        pytest.skip(f"this transformers has no {entry}")
    getattr(checkpointed, entry)()
    layers = checkpointed.llm.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert layers[0]._gradient_checkpointing_func.keywords["use_reentrant"] is False
    loss, grads, kept = _loss_grads_and_saved(checkpointed)
    plain_loss, plain_grads, plain_kept = _loss_grads_and_saved(plain)
    assert kept < plain_kept / 2  # the layers' activations are recomputed in the backward pass, not kept
    torch.testing.assert_close(loss, plain_loss)
    assert grads.keys() == plain_grads.keys() and len(grads) > 10
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
