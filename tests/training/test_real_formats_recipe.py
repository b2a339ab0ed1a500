"""The 3B recipe's pieces on a tiny Qwen2: mean-initialised new rows, row-restricted embedding
training, and the checks on the stage config's ``embedding_rows`` and ``sampling`` sections."""

from __future__ import annotations

import pytest
import torch
from real_format_models import build_qwen_tokenizer
from transformers import Qwen2Config, Qwen2ForCausalLM

from mllm.modeling import DualTokenMLLMForCausalLM
from mllm.vocab import extend_tokenizer, init_rows_from_text_mean, row_ranges
from tokenizer.config import ConfigError
from training.config import load_config
from training.mllm_config import MLLMStageConfig
from training.mllm_model import select_trainable

PAPER_ALIGN = "configs/stages/qwen2_5_3b/align.yaml"


@pytest.fixture(scope="module")
def text_tokenizer():
    return build_qwen_tokenizer()


def _model(text_tokenizer) -> DualTokenMLLMForCausalLM:
    import copy

    text_tokenizer = copy.deepcopy(text_tokenizer)
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(text_tokenizer) + 13,  # more rows than tokens, as Qwen2.5 has
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        )
    ).eval()
    layout = extend_tokenizer(text_tokenizer, 16, 16)
    return DualTokenMLLMForCausalLM.from_llm(llm, layout, semantic_depth=2, pixel_depth=2, grid_size=(2, 2))


def test_mean_init_leaves_text_logits_and_rows_alone(text_tokenizer) -> None:
    model = _model(text_tokenizer)
    weight = model.get_input_embeddings().weight
    text = row_ranges(model.layout)["text"].stop
    before = weight.detach().clone()
    ids = torch.tensor([text_tokenizer("a red circle on the left")["input_ids"]])
    with torch.no_grad():
        logits_before = model.llm(input_ids=ids).logits
        init_rows_from_text_mean(weight, model.layout)
        logits_after = model.llm(input_ids=ids).logits
    assert torch.equal(weight[:text], before[:text])
    torch.testing.assert_close(weight[text:], before[:text].mean(dim=0).expand_as(weight[text:]))
    torch.testing.assert_close(logits_after[..., :text], logits_before[..., :text])
    # Tied head: every new token scores the mean text logit, not a random one.
    mean_logit = logits_after[..., :text].mean(dim=-1, keepdim=True)
    torch.testing.assert_close(
        logits_after[..., text:], mean_logit.expand_as(logits_after[..., text:]), atol=1e-4, rtol=1e-4
    )


def test_embedding_rows_train_only_the_named_groups(text_tokenizer) -> None:
    model = _model(text_tokenizer)
    select_trainable(model, ["llm.model.embed_tokens.*"], [], ["boundary", "pixel"])
    weight = model.get_input_embeddings().weight
    layout = model.layout
    ids = torch.tensor([[5, layout.gen_start_id, layout.pixel_offset + 3, layout.semantic_offset + 1, 7]])
    model.llm(input_ids=ids, labels=ids).loss.backward()
    ranges = row_ranges(layout)
    grad_rows = set(torch.nonzero(weight.grad.abs().sum(dim=1)).flatten().tolist())
    assert grad_rows, "no row got a gradient"
    assert all(row in ranges["boundary"] or row in ranges["pixel"] for row in grad_rows)
    assert layout.pixel_offset + 3 in grad_rows and layout.gen_start_id in grad_rows


def test_embedding_rows_need_a_trainable_embedding(text_tokenizer) -> None:
    model = _model(text_tokenizer)
    with pytest.raises(ConfigError, match=r"stage\.embedding_rows.*no embedding trains"):
        select_trainable(model, ["pixel_head.*", "visual_projector.*", "llm.model.norm.*"], [], ["pixel"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage.embedding_rows=[pixels]", r"stage\.embedding_rows=\['pixels'\]; expected a list of some of"),
        ("optim.weight_decay=0.01", r"set optim\.weight_decay=0"),
        ("sampling.topk=5", r"sampling has unknown settings \['topk'\]"),
        ("sampling.top_p=1.5", r"sampling\.top_p=1\.5"),
    ],
)
def test_bad_recipe_sections_are_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(MLLMStageConfig, PAPER_ALIGN, [override])


def test_the_paper_stages_state_the_recipe() -> None:
    stages = {
        name: load_config(MLLMStageConfig, f"configs/stages/qwen2_5_3b/{name}.yaml")
        for name in ("align", "understand", "generate", "joint")
    }
    assert stages["align"].model.code_embedding_init == "mean"
    assert stages["align"].stage.embedding_rows == ["boundary", "semantic"]
    assert stages["generate"].stage.embedding_rows == ["boundary", "pixel"]
    paper_sampling = {"cfg": 3.0, "top_k": 900, "top_p": 0.96, "temperature": 1.0}
    assert stages["generate"].sampling == stages["joint"].sampling == paper_sampling
    assert [stages[name].optim.lr for name in stages] == [1e-3, 2e-5, 1e-4, 1e-5]  # the paper's four rates
