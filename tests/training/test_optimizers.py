"""Muon for hidden matrices + AdamW for the rest (``optim.name: muon``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenizer.config import ConfigError
from training.common import build_optimizer
from training.config import OptimConfig
from training.optimizers import MuonAdamW, hidden_matrices, orthogonalize


class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight  # tied, as in the tiny LM

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(self.norm(self.body(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
def test_orthogonalize_pushes_every_singular_value_towards_one(shape, dtype):
    torch.manual_seed(0)
    # A badly conditioned matrix: singular values from 0.01 to 1.
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
    k = min(shape)
    m = u[:, :k] @ torch.diag(torch.logspace(-2, 0, k)) @ v[:, :k].T
    out = orthogonalize(m, dtype=dtype)
    assert out.shape == m.shape and out.dtype == torch.float32
    # The quintic iteration trades exactness for speed: the values land in about [0.5, 1.2].
    sv = torch.linalg.svdvals(out)
    assert sv.max() < 1.25 and sv.min() > 0.45
    # Same singular vectors: in the input's singular bases the output is diagonal.
    d = u[:, :k].T @ out @ v[:, :k]
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2  # bf16 rounding blurs it a little
    assert (d - torch.diag(torch.diagonal(d))).norm() < tolerance * d.norm()


def test_a_stack_is_orthogonalised_matrix_by_matrix():
    torch.manual_seed(0)
    stack = torch.randn(3, 24, 8) * torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1)
    together = orthogonalize(stack, dtype=torch.float32)
    for matrix, out in zip(stack, together, strict=True):
        torch.testing.assert_close(out, orthogonalize(matrix, dtype=torch.float32), rtol=1e-4, atol=1e-5)


def test_hidden_matrices_take_linear_and_attention_weights_not_embeddings_or_tied_heads():
    model = _TiedLM()
    found = {id(p) for p in hidden_matrices(model)}
    names = {name for name, p in model.named_parameters() if id(p) in found}
    assert names == {"body.0.weight", "body.2.weight", "attn.in_proj_weight", "attn.out_proj.weight"}


def test_hidden_matrices_leave_an_untied_lm_head_to_adamw():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    found = {id(p) for p in hidden_matrices(model)}
    names = {name for name, p in model.named_parameters() if id(p) in found}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" not in names
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"} <= names
    assert len(names) == 7  # q, k, v, o, gate, up, down


def test_adamw_groups_step_exactly_like_torch_adamw():
    torch.manual_seed(0)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    ours = MuonAdamW([{"params": a.parameters()}], lr=1e-2, betas=(0.9, 0.98), weight_decay=0.1)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.98), weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(7, 5)
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_muon_step_has_the_adamw_rms_and_the_momentum_direction():
    weight = nn.Parameter(torch.zeros(64, 16))
    opt = MuonAdamW([{"params": [weight], "use_muon": True}], lr=1e-2, momentum=0.0, nesterov=False)
    weight.grad = torch.randn(64, 16)
    opt.step()
    # lr * 0.2 * sqrt(64) scales an orthogonal update whose entries have RMS 1 / sqrt(64).
    rms = weight.detach().pow(2).mean().sqrt().item()
    assert rms == pytest.approx(1e-2 * 0.2, rel=0.25)
    assert torch.sum(weight.detach() * -weight.grad) > 0


def test_muon_rejects_a_non_matrix_in_its_group():
    with pytest.raises(ValueError, match=r"non-matrix parameters of shapes \[\(4,\)\]"):
        MuonAdamW([{"params": [nn.Parameter(torch.zeros(4))], "use_muon": True}])


def test_build_optimizer_splits_the_model_and_learns():
    torch.manual_seed(0)
    model = _TiedLM()
    opt = build_optimizer(model.parameters(), OptimConfig(name="muon", lr=3e-3, weight_decay=0.0), model)
    assert isinstance(opt, MuonAdamW)
    muon, adamw = opt.param_groups
    assert muon["use_muon"] and len(muon["params"]) == 4 and not adamw["use_muon"]
    assert muon["ns_steps"] == 5
    three = build_optimizer(model.parameters(), OptimConfig(name="muon", muon_ns_steps=3), model)
    assert three.param_groups[0]["ns_steps"] == 3
    ids = torch.randint(0, 11, (8, 6))
    losses = []
    for _ in range(60):
        opt.zero_grad()
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 11), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # The state survives a save / load round trip (exact resume).
    again = build_optimizer(model.parameters(), OptimConfig(name="muon", lr=3e-3, weight_decay=0.0), model)
    again.load_state_dict(opt.state_dict())
    for p in model.parameters():
        for key, value in opt.state[p].items():
            torch.testing.assert_close(again.state[p][key], value)


def test_muon_step_equals_one_matrix_at_a_time():
    # Matrices of one shape (either orientation) share a batched iteration; the update is the
    # same as stepping each alone.
    torch.manual_seed(0)
    weights = [torch.randn(8, 20), torch.randn(20, 8), torch.randn(8, 20), torch.randn(6, 6)]
    grads = [torch.randn_like(w) for w in weights]
    together = [nn.Parameter(w.clone()) for w in weights]
    alone = [nn.Parameter(w.clone()) for w in weights]
    optimizers = [MuonAdamW([{"params": together, "use_muon": True}], lr=0.1, weight_decay=0.1)]
    optimizers += [MuonAdamW([{"params": [p], "use_muon": True}], lr=0.1, weight_decay=0.1) for p in alone]
    for _ in range(3):
        for p, g in zip(together + alone, grads + grads, strict=True):
            p.grad = g.clone()
        for opt in optimizers:
            opt.step()
    for x, y in zip(together, alone, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_deepspeed_refuses_muon_before_it_starts():
    from training.config import DeepSpeedConfig
    from training.distributed import TrainEngine

    model = nn.Linear(4, 4)
    optimizer = build_optimizer(model.parameters(), OptimConfig(name="muon"), model)
    with pytest.raises(ConfigError, match="optim.name='muon' orthogonalises whole weight matrices"):
        TrainEngine(model, optimizer, None, 1.0, DeepSpeedConfig(enabled=True))


def test_bad_optimizer_settings_are_named():
    with pytest.raises(ConfigError, match=r"optim.name='sgd'; expected one of adamw\|muon"):
        OptimConfig(name="sgd")
    with pytest.raises(ConfigError, match=r"optim.muon_momentum=1.0; expected in \[0, 1\)"):
        OptimConfig(name="muon", muon_momentum=1.0)
    with pytest.raises(ConfigError, match=r"optim.muon_ns_steps=0; expected >= 1"):
        OptimConfig(name="muon", muon_ns_steps=0)
    with pytest.raises(ConfigError, match="optim.name='muon' is not supported here"):
        build_optimizer([nn.Parameter(torch.zeros(2, 2))], OptimConfig(name="muon"))
