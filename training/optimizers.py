"""Muon for the hidden weight matrices, AdamW for everything else, in one optimizer.

Muon (Jordan et al., 2024) replaces each matrix's momentum by its nearest semi-orthogonal
matrix (a few Newton-Schulz iterations) before the step. The update is rescaled by
``0.2 * sqrt(max(rows, cols))`` so that its RMS matches an AdamW update's, as in "Muon is
Scalable for LLM Training" (Liu et al., 2025); the learning rate and weight decay tuned for
AdamW then carry over. Embeddings, norms, biases and output classifiers are not hidden
matrices and keep AdamW. One optimizer (not two) so that the engine, the learning-rate
schedule, gradient clipping and checkpoints treat it like any other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

# Quintic Newton-Schulz coefficients from the Muon reference implementation.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(
    matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Approximately ``U V^T`` for ``matrix = U S V^T`` (singular values pushed towards 1).

    ``matrix`` is one matrix or a stack of them (``(..., rows, cols)``, each normalised on its
    own). The iterations run in ``dtype``: bf16 (the reference's choice) halves their cost on
    CPUs with bf16 instructions and on GPUs; the result comes back in fp32.
    """
    a, b, c = NS_COEFFICIENTS
    x = matrix.float()
    x = (x / (x.norm(dim=(-2, -1), keepdim=True) + eps)).to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).float()


def hidden_matrices(module: nn.Module) -> list[nn.Parameter]:
    """The weight matrices Muon should own: every ``nn.Linear`` weight and attention input
    projection, except embeddings and output heads (a tied LM head shares the embedding's
    weight; an untied one is what a Hugging Face model's ``get_output_embeddings`` returns)."""
    embedded = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    for sub in module.modules():
        head = sub.get_output_embeddings() if hasattr(sub, "get_output_embeddings") else None
        if isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), torch.Tensor):
            embedded.add(id(head.weight))
    found: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            weights = [sub.weight]
        elif isinstance(sub, nn.MultiheadAttention) and sub.in_proj_weight is not None:
            weights = [sub.in_proj_weight]
        else:
            continue
        for weight in weights:
            if weight.ndim == 2 and id(weight) not in embedded:
                found[id(weight)] = weight
    return list(found.values())


class MuonAdamW(torch.optim.Optimizer):
    """Param groups with ``use_muon=True`` step by Muon, the others by AdamW.

    Both kinds share ``lr`` and ``weight_decay`` (decoupled); ``betas`` / ``eps`` are AdamW's,
    ``momentum`` / ``nesterov`` / ``ns_steps`` Muon's.
    """

    needs_whole_matrices = True  # DeepSpeed ZeRO's flat partitions would break the orthogonalisation

    def __init__(
        self,
        params: Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            use_muon=False,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                bad = [tuple(p.shape) for p in group["params"] if p.ndim != 2]
                if bad:
                    raise ValueError(f"Muon param group holds non-matrix parameters of shapes {bad}")

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - the torch.optim signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["use_muon"]:
                self._muon(group, params)
            else:
                self._adamw(group, params)
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        # Matrices of one shape (up to a transpose) are orthogonalised together, in one batched
        # iteration: far cheaper than one by one for the many small matrices of a small model.
        by_shape: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for param in params:
            grad = param.grad.float()
            state = self.state[param]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(grad)
            buffer = state["momentum_buffer"]
            buffer.mul_(group["momentum"]).add_(grad)
            direction = grad.add(buffer, alpha=group["momentum"]) if group["nesterov"] else buffer
            tall = param.shape[0] > param.shape[1]
            key = tuple(sorted(param.shape)) if tall else tuple(param.shape)
            by_shape.setdefault(key, []).append((param, direction.mT if tall else direction))
        lr, decay = group["lr"], group["weight_decay"]
        for items in by_shape.values():
            updates = orthogonalize(torch.stack([d for _, d in items]), group["ns_steps"])
            for (param, _), update in zip(items, updates, strict=True):
                if update.shape != param.shape:
                    update = update.mT
                if decay:
                    param.mul_(1 - lr * decay)
                param.add_(update.to(param.dtype), alpha=-lr * 0.2 * math.sqrt(max(param.shape)))

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, decay, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for param in params:
            grad = param.grad.float()
            state = self.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
            state["step"] += 1
            step = float(state["step"])
            if decay:
                param.mul_(1 - lr * decay)
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(eps)
            param.addcdiv_(state["exp_avg"].to(param.dtype), denom, value=-lr / (1 - beta1**step))
