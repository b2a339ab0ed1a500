"""Residual vector quantizer with one codebook shared across depths (RQ-VAE style).

DualToken quantises each branch (pixel and semantic) with a residual VQ of depth ``D``
whose levels all read **one** ``codebook_size x code_dim`` codebook (docs/architecture.md, "The method";
RQ-VAE, Lee et al. 2022, section 3.1). At depth ``d`` the residual ``r_d`` is replaced by
its nearest codebook row ``e[c_d]`` (squared L2) and ``r_{d+1} = r_d - e[c_d]``; the
quantised vector is the sum of the chosen rows.

The codebook is learned one of two ways, chosen by ``QuantizerConfig.ema``:

- ``ema=True`` (paper): a buffer updated by exponential moving averages of the residuals
  assigned to each code, pooled over all depths, with Laplace-smoothed counts (van den
  Oord et al. 2017, appendix A.1). Counts and sums are all-reduced across ranks, so every
  rank keeps the same codebook.
- ``ema=False``: an ``nn.Parameter`` trained by the optimiser through the VQ-VAE codebook
  loss ``||sg(latents) - partial_sum_d||^2``.

In both modes codes whose EMA assignment count falls below ``dead_code_threshold`` are
restarted from vectors of the current batch, and ``kmeans_init`` seeds the codebook from
the first training batch. All state changes happen in training mode only; in eval mode
the module is a pure function of its input.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizer.config import QuantizerConfig
from tokenizer.devices import autocast_disabled

logger = logging.getLogger(__name__)

# Largest distance matrix (vectors x codes, float32) built at once: 64M elements = 256 MiB.
MAX_DISTANCE_ELEMENTS = 64 * 1024 * 1024


@dataclass
class QuantizerOutput:
    """What :meth:`ResidualVectorQuantizer.forward` returns.

    Attributes:
        quantized: ``(..., code_dim)``, dtype of the input: sum over depths of the chosen
            codebook rows. When the input requires grad, the gradient passes straight
            through to it (``latents + sg(sum - latents)``).
        codes: ``(..., depth)`` int64 indices into the shared codebook.
        commitment_loss: scalar, mean over depths of ``mse(latents, sg(partial_sum_d))``,
            plus the codebook loss ``mse(sg(latents), partial_sum_d)`` when ``ema=False``.
        residual_norms: ``(depth,)`` detached mean squared residual after each depth.
    """

    quantized: Tensor
    codes: Tensor
    commitment_loss: Tensor
    residual_norms: Tensor


def nearest_codes(
    vectors: Tensor,
    codebook: Tensor,
    max_elements: int = MAX_DISTANCE_ELEMENTS,
    codebook_sq_norms: Tensor | None = None,
) -> Tensor:
    """Index of the nearest codebook row (squared L2) for each vector.

    Args:
        vectors: ``(N, code_dim)`` float.
        codebook: ``(codebook_size, code_dim)`` float, same dtype and device.
        max_elements: largest ``rows x codebook_size`` distance block computed at once.
        codebook_sq_norms: ``(codebook_size,)`` precomputed ``||e||^2`` (saves a pass per depth).

    Returns:
        ``(N,)`` int64 indices; ties go to the lowest index.
    """
    codebook_size = codebook.shape[0]
    # ||r||^2 - 2 r.e + ||e||^2; the ||r||^2 term is the same for every code of a row, so it
    # cannot change the argmin and is left out (one fewer N x K pass).
    if codebook_sq_norms is None:
        codebook_sq_norms = codebook.pow(2).sum(dim=-1)
    rows_per_chunk = max(1, max_elements // codebook_size)
    if vectors.shape[0] <= rows_per_chunk:
        return torch.addmm(codebook_sq_norms, vectors, codebook.t(), beta=1.0, alpha=-2.0).argmin(dim=-1)
    indices = torch.empty(vectors.shape[0], dtype=torch.long, device=vectors.device)
    for start in range(0, vectors.shape[0], rows_per_chunk):
        chunk = vectors[start : start + rows_per_chunk]
        distances = torch.addmm(codebook_sq_norms, chunk, codebook.t(), beta=1.0, alpha=-2.0)
        indices[start : start + rows_per_chunk] = distances.argmin(dim=-1)
    return indices


def kmeans(samples: Tensor, num_clusters: int, num_iters: int = 10) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means seeded with distinct random samples.

    With fewer samples than clusters the centroids are random samples drawn with
    replacement (duplicates end up with zero count, so dead-code restart replaces them).

    Args:
        samples: ``(N, code_dim)`` float32.
        num_clusters: ``K``.
        num_iters: Lloyd iterations.

    Returns:
        ``centroids`` ``(K, code_dim)`` and ``counts`` ``(K,)`` float32: how many samples
        are nearest to each centroid after the last iteration.
    """
    num_samples = samples.shape[0]
    if num_samples < num_clusters:
        centroids = samples[torch.randint(num_samples, (num_clusters,), device=samples.device)]
    else:
        centroids = samples[torch.randperm(num_samples, device=samples.device)[:num_clusters]].clone()
        for _ in range(num_iters):
            assignment = nearest_codes(samples, centroids)
            counts = torch.bincount(assignment, minlength=num_clusters).to(samples.dtype)
            sums = torch.zeros_like(centroids).index_add_(0, assignment, samples)
            # An empty cluster keeps its previous centroid instead of collapsing to 0.
            non_empty = counts > 0
            centroids[non_empty] = sums[non_empty] / counts[non_empty, None]
    counts = torch.bincount(nearest_codes(samples, centroids), minlength=num_clusters).to(samples.dtype)
    return centroids, counts


def code_histogram(codes: Tensor, codebook_size: int) -> Tensor:
    """Per-depth histogram of codes, to accumulate over many batches.

    Args:
        codes: ``(..., depth)`` integer codes in ``[0, codebook_size)``.
        codebook_size: ``K``.

    Returns:
        ``(depth, K)`` int64 counts.
    """
    _check_code_range(codes, codebook_size)
    depth = codes.shape[-1]
    flat = codes.reshape(-1, depth)
    # Offset depth d into its own block of K bins so one bincount covers all depths.
    offsets = torch.arange(depth, device=codes.device) * codebook_size
    return torch.bincount((flat + offsets).reshape(-1), minlength=depth * codebook_size).view(depth, codebook_size)


def _perplexity(counts: Tensor) -> float:
    """``exp(entropy)`` of the distribution given by non-negative ``counts`` (0.0 if empty)."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    probs = counts[counts > 0] / total
    return math.exp(float(-(probs * probs.log()).sum()))


def code_usage_from_counts(counts: Tensor) -> dict:
    """Codebook usage statistics from a per-depth histogram.

    Args:
        counts: ``(depth, codebook_size)`` non-negative counts (e.g. summed
            :func:`code_histogram` outputs over an evaluation set).

    Returns:
        ``{"usage": float, "usage_per_depth": list[float], "perplexity_per_depth":
        list[float], "perplexity": float}``: ``usage`` is the fraction of codebook entries
        used at any depth; perplexities are ``exp(entropy)`` of the code distribution per
        depth and pooled over all depths (between 1 and ``codebook_size``; 0.0 when there
        are no codes).
    """
    if counts.ndim != 2:
        raise ValueError(f"counts must have shape (depth, codebook_size); got {tuple(counts.shape)}")
    counts = counts.detach().double()
    codebook_size = counts.shape[1]
    return {
        "usage": float((counts.sum(dim=0) > 0).sum()) / codebook_size,
        "usage_per_depth": [float((row > 0).sum()) / codebook_size for row in counts],
        "perplexity_per_depth": [_perplexity(row) for row in counts],
        "perplexity": _perplexity(counts.sum(dim=0)),
    }


def code_usage_stats(codes: Tensor, codebook_size: int) -> dict:
    """Codebook usage statistics of ``codes`` ``(..., depth)``; see :func:`code_usage_from_counts`."""
    return code_usage_from_counts(code_histogram(codes, codebook_size))


def _check_code_range(codes: Tensor, codebook_size: int) -> None:
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor; got dtype {codes.dtype}")
    if codes.ndim == 0:
        raise ValueError("codes must have shape (..., depth); got a scalar")
    if codes.numel() == 0:
        return
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= codebook_size:
        raise ValueError(
            f"codes must lie in [0, {codebook_size}) (codebook_size={codebook_size}); got values in [{low}, {high}]"
        )


class ResidualVectorQuantizer(nn.Module):
    """Residual VQ of ``depth`` levels over one shared ``codebook_size x code_dim`` codebook.

    Args:
        config: sizes and the update rule (see :class:`tokenizer.config.QuantizerConfig`).
        kmeans_iters: Lloyd iterations of the k-means initialisation.
        process_group: group whose ranks share the codebook (default: the whole world).

    State (all in ``state_dict``): ``codebook`` ``(K, code_dim)`` (a Parameter when
    ``ema=False``, else a buffer), ``cluster_size`` ``(K,)`` EMA of per-step assignment
    counts (both modes: it drives dead-code restarts), ``embed_sum`` ``(K, code_dim)`` EMA of
    the assigned residual sums (``ema=True`` only) and ``initialized`` (bool).

    Under ``torch.distributed`` every rank must call ``forward`` in training mode the same
    number of times (it all-reduces and broadcasts). Keep the module in float32: the EMA
    state loses most of its precision if the module is cast to bfloat16.
    """

    codebook: Tensor
    cluster_size: Tensor
    embed_sum: Tensor
    initialized: Tensor

    def __init__(
        self,
        config: QuantizerConfig,
        kmeans_iters: int = 10,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if kmeans_iters < 0:
            raise ValueError(f"kmeans_iters={kmeans_iters}; expected >= 0")
        self.config = config
        self.kmeans_iters = kmeans_iters
        self.process_group = process_group

        # Unit Gaussian rows match the scale of normalised projections; with kmeans_init the
        # first training batch overwrites them anyway.
        codebook = torch.randn(config.codebook_size, config.code_dim)
        # Every code starts as if it had already been assigned `prior_count` vectors at its own
        # position: unused codes then stay put under EMA instead of drifting to 0, and a code
        # used at least `dead_code_threshold` times per step is not restarted while the EMA
        # warms up (an all-zero start would restart everything used fewer than 1/(1-decay) times).
        prior_count = max(config.dead_code_threshold, 1.0)
        if config.ema:
            self.register_buffer("codebook", codebook)
            self.register_buffer("embed_sum", codebook * prior_count)
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("cluster_size", torch.full((config.codebook_size,), prior_count))
        # False until the first training forward has (k-means-)initialised the codebook and
        # synchronised it from rank 0; persistent so a loaded checkpoint is not re-initialised.
        self.register_buffer("initialized", torch.tensor(False))
        self._warned_uninitialized = False

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"codebook_size={c.codebook_size}, code_dim={c.code_dim}, depth={c.depth}, ema={c.ema}, "
            f"decay={c.decay}, dead_code_threshold={c.dead_code_threshold}, kmeans_init={c.kmeans_init}"
        )

    # ------------------------------------------------------------------ forward

    def forward(self, latents: Tensor) -> QuantizerOutput:
        """Quantise ``latents`` ``(..., code_dim)`` (any leading dims, any float dtype).

        In training mode this also initialises the codebook on the first call and then
        updates the EMA statistics and restarts dead codes (after the codes are chosen, so
        ``quantized`` and ``codes`` always refer to the same codebook) -- also under
        ``torch.no_grad``; use :meth:`encode` to read codes without updating. Distances are
        computed in float32 with autocast disabled.
        """
        if latents.ndim == 0 or latents.shape[-1] != self.config.code_dim:
            raise ValueError(
                f"latents must have shape (..., code_dim={self.config.code_dim}); got {tuple(latents.shape)}"
            )
        if not latents.is_floating_point():
            raise ValueError(f"latents must be a floating-point tensor; got dtype {latents.dtype}")
        leading_shape = latents.shape[:-1]
        with autocast_disabled(latents.device):
            flat_latents = latents.reshape(-1, self.config.code_dim).float()
            if self.training and not bool(self.initialized):
                self._initialize(flat_latents.detach())
            elif not self.training and self.config.kmeans_init and not self._warned_uninitialized:
                if not bool(self.initialized):
                    logger.warning("quantizer used in eval mode before k-means initialisation; codes are meaningless")
                self._warned_uninitialized = True

            codes, partial_sums, residual_inputs, residual_norms = self._quantize(
                flat_latents.detach(), keep_residuals=self.training
            )
            commitment_loss = torch.stack([F.mse_loss(flat_latents, partial.detach()) for partial in partial_sums])
            if not self.config.ema:
                # Rebuild the partial sums with a graph to the codebook Parameter (same
                # arithmetic as in _quantize, so the values are identical).
                commitment_loss = commitment_loss + torch.stack(
                    [F.mse_loss(partial, flat_latents.detach()) for partial in self._partial_sums(codes)]
                )
            commitment_loss = commitment_loss.mean()

            summed = partial_sums[-1]
            if torch.is_grad_enabled() and latents.requires_grad:
                # Straight-through estimator; skipped otherwise so eval output equals lookup() exactly.
                summed = flat_latents + (summed - flat_latents).detach()
            quantized = summed.to(latents.dtype).reshape(latents.shape)

            if self.training:
                self._update_codebook(codes, residual_inputs)

        return QuantizerOutput(
            quantized=quantized,
            codes=codes.reshape(*leading_shape, self.config.depth),
            commitment_loss=commitment_loss,
            residual_norms=residual_norms,
        )

    @torch.no_grad()
    def encode(self, latents: Tensor) -> Tensor:
        """Codes ``(..., depth)`` of ``latents`` ``(..., code_dim)`` without touching any state.

        Unlike ``forward`` this never initialises or updates the codebook, even in training
        mode (use it to tokenise images while training something else).
        """
        if latents.ndim == 0 or latents.shape[-1] != self.config.code_dim:
            raise ValueError(
                f"latents must have shape (..., code_dim={self.config.code_dim}); got {tuple(latents.shape)}"
            )
        with autocast_disabled(latents.device):
            codes = self._quantize(latents.reshape(-1, self.config.code_dim).float())[0]
        return codes.reshape(*latents.shape[:-1], self.config.depth)

    @torch.no_grad()
    def _quantize(
        self, flat_latents: Tensor, keep_residuals: bool = False
    ) -> tuple[Tensor, list[Tensor], Tensor | None, Tensor]:
        """Greedy residual assignment of ``flat_latents`` ``(N, code_dim)`` float32.

        Returns ``codes`` ``(N, depth)``, the partial sums ``[(N, code_dim)] * depth``, the
        residual fed to every depth ``(depth, N, code_dim)`` (only with ``keep_residuals``,
        else None) and the mean squared residual after each depth ``(depth,)``.
        """
        codebook = self.codebook.detach().float()
        codebook_sq_norms = codebook.pow(2).sum(dim=-1)
        residual = flat_latents
        codes, partial_sums, residual_inputs, residual_norms = [], [], [], []
        for depth_index in range(self.config.depth):
            residual_inputs.append(residual)
            depth_codes = nearest_codes(residual, codebook, codebook_sq_norms=codebook_sq_norms)
            chosen = codebook[depth_codes]
            partial_sums.append(chosen if depth_index == 0 else partial_sums[-1] + chosen)
            residual = residual - chosen
            codes.append(depth_codes)
            residual_norms.append(residual.pow(2).mean())
        stacked_inputs = torch.stack(residual_inputs) if keep_residuals else None
        return torch.stack(codes, dim=-1), partial_sums, stacked_inputs, torch.stack(residual_norms)

    def _partial_sums(self, codes: Tensor) -> list[Tensor]:
        """``[sum_{j<=d} codebook[codes[..., j]] for d < codes.shape[-1]]``, differentiable in the codebook."""
        codebook = self.codebook.float()
        partial_sums: list[Tensor] = []
        for depth_index in range(codes.shape[-1]):
            chosen = F.embedding(codes[..., depth_index], codebook)
            partial_sums.append(chosen if depth_index == 0 else partial_sums[-1] + chosen)
        return partial_sums

    # ------------------------------------------------------------------ lookup

    def lookup(self, codes: Tensor) -> Tensor:
        """Sum of the codebook rows of ``codes`` ``(..., depth)`` -> ``(..., code_dim)`` float32.

        Raises:
            ValueError: if the last dim is not ``depth`` or a code is outside ``[0, codebook_size)``.
        """
        if codes.ndim == 0 or codes.shape[-1] != self.config.depth:
            raise ValueError(f"codes must have shape (..., depth={self.config.depth}); got {tuple(codes.shape)}")
        return self.lookup_partial(codes, self.config.depth)

    def lookup_partial(self, codes: Tensor, upto: int) -> Tensor:
        """Sum of the first ``upto`` depths of ``codes`` ``(..., k)`` -> ``(..., code_dim)`` float32.

        ``codes`` may hold only the depths decoded so far: ``upto <= k <= depth``.
        """
        depth = self.config.depth
        if not 0 <= upto <= depth:
            raise ValueError(f"upto={upto}; expected an integer in [0, depth={depth}]")
        if codes.ndim == 0 or not upto <= codes.shape[-1] <= depth:
            raise ValueError(
                f"codes must have shape (..., k) with upto={upto} <= k <= depth={depth}; got {tuple(codes.shape)}"
            )
        _check_code_range(codes, self.config.codebook_size)
        if upto == 0:
            return self.codebook.new_zeros(*codes.shape[:-1], self.config.code_dim, dtype=torch.float32)
        return self._partial_sums(codes[..., :upto].long())[-1]

    @torch.no_grad()
    def code_usage(self, codes: Tensor) -> dict:
        """Usage statistics of ``codes`` ``(..., depth)``; see :func:`code_usage_from_counts`."""
        if codes.ndim == 0 or codes.shape[-1] != self.config.depth:
            raise ValueError(f"codes must have shape (..., depth={self.config.depth}); got {tuple(codes.shape)}")
        return code_usage_stats(codes, self.config.codebook_size)

    # ------------------------------------------------------------------ training-time state

    def _is_distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def _is_source_rank(self) -> bool:
        return not self._is_distributed() or dist.get_rank(self.process_group) == 0

    def _broadcast(self, tensor: Tensor) -> None:
        if self._is_distributed():
            source = 0 if self.process_group is None else dist.get_global_rank(self.process_group, 0)
            dist.broadcast(tensor, src=source, group=self.process_group)

    @torch.no_grad()
    def _initialize(self, flat_latents: Tensor) -> None:
        """K-means (if configured) on rank 0's depth-0 inputs ``(N, code_dim)``, then broadcast."""
        if self.config.kmeans_init and self._is_source_rank():
            centroids, counts = kmeans(flat_latents, self.config.codebook_size, self.kmeans_iters)
            self.codebook.copy_(centroids)
            # The k-means cluster sizes are the EMA prior: empty clusters count as dead and are
            # restarted after the first update.
            self.cluster_size.copy_(counts)
            if self.config.ema:
                self.embed_sum.copy_(centroids * counts[:, None])
        # Without k-means this still aligns ranks that were built from different seeds.
        for tensor in self._state_tensors():
            self._broadcast(tensor)
        self.initialized.fill_(True)

    def _state_tensors(self) -> list[Tensor]:
        tensors = [self.codebook.data, self.cluster_size]
        if self.config.ema:
            tensors.append(self.embed_sum)
        return tensors

    @torch.no_grad()
    def _update_codebook(self, codes: Tensor, residual_inputs: Tensor) -> None:
        """EMA update and dead-code restart from one training batch.

        Args:
            codes: ``(N, depth)`` chosen codes.
            residual_inputs: ``(depth, N, code_dim)`` float32 residual fed to each depth.
        """
        config = self.config
        flat_codes = codes.t().reshape(-1)  # depth-major, to match residual_inputs
        flat_residuals = residual_inputs.reshape(-1, config.code_dim)
        # One shared codebook serves every depth, so its statistics pool all depths.
        counts = torch.bincount(flat_codes, minlength=config.codebook_size).float()
        if config.ema:
            sums = torch.zeros(config.codebook_size, config.code_dim, device=codes.device)
            sums.index_add_(0, flat_codes, flat_residuals)
            packed = torch.cat([counts[:, None], sums], dim=1)
        else:
            packed = counts[:, None]
        if self._is_distributed():
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.process_group)

        self.cluster_size.mul_(config.decay).add_(packed[:, 0], alpha=1.0 - config.decay)
        if config.ema:
            self.embed_sum.mul_(config.decay).add_(packed[:, 1:], alpha=1.0 - config.decay)
            # Laplace smoothing keeps rarely used codes from dividing by ~0 while preserving the total.
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + config.eps) / (total + config.codebook_size * config.eps) * total
            self.codebook.copy_(self.embed_sum / smoothed[:, None])

        self._restart_dead_codes(flat_residuals)

    @torch.no_grad()
    def _restart_dead_codes(self, candidates: Tensor) -> None:
        """Move codes with EMA count below the threshold onto random batch residuals.

        Candidates are the residuals fed to *every* depth (not just depth 0): the shared
        codebook must also cover the small deep residuals, and the EMA pools the same
        vectors. Rank 0 draws them and broadcasts; the dead mask itself is identical on all
        ranks because it is computed from all-reduced statistics.
        """
        threshold = self.config.dead_code_threshold
        dead = self.cluster_size < threshold
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        replacements = torch.empty(num_dead, self.config.code_dim, device=candidates.device)
        if self._is_source_rank():
            num_candidates = candidates.shape[0]
            if num_candidates >= num_dead:
                picks = torch.randperm(num_candidates, device=candidates.device)[:num_dead]
            else:
                picks = torch.randint(num_candidates, (num_dead,), device=candidates.device)
            replacements.copy_(candidates[picks])
        self._broadcast(replacements)
        replacements = replacements.to(self.codebook.dtype)
        self.codebook.data[dead] = replacements
        self.cluster_size[dead] = threshold
        if self.config.ema:
            self.embed_sum[dead] = replacements * threshold
