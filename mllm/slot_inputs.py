"""The model's input side: which slots hold images, the prefill attention mask, and slot embeddings.

:class:`SlotInputsMixin` turns ``(B, L)`` text ids or ``(B, L, C)`` slot ids (the sequence
format of :mod:`mllm.modeling`) into the LM's input embeddings, fusing a slot's code
embeddings (``input_fusion``) and adding image positions, and builds the attention mask of a
prefill that is not plainly causal.
"""

from __future__ import annotations

import torch
from torch import nn

from mllm.positions import sincos_grid_table


class SlotInputsMixin:
    """Slot indexing, masks and input embeddings of :class:`~mllm.modeling.DualTokenMLLMForCausalLM`.

    Reads the host model's ``config``, ``layout``, ``llm``, ``get_input_embeddings()`` and its
    own input modules ``visual_projector``, ``image_rows``, ``image_cols`` and
    ``image_position_gate`` (each None when the config does not use it).
    """

    def read_slot_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, L, C)`` ids -> ``(B, L)``: each slot of an image the model reads, its index in the
        image (raster order); -1 elsewhere (text, boundaries, images being generated)."""
        read = self.read_image_blocks(input_ids) >= 0
        index = self.image_slot_index(input_ids)
        return torch.where(read, index, torch.full_like(index, -1))

    def is_image_slot(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` text ids or ``(B, L, C)`` slot ids -> ``(B, L)`` bool: the slot holds image codes."""
        layout = self.layout
        is_code = layout.is_semantic(input_ids) | layout.is_pixel(input_ids)
        return is_code.any(dim=-1) if input_ids.dim() == 3 else is_code

    def image_slot_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, L, C)`` ids -> ``(B, L)``: each image slot's index in its image (raster order), -1 elsewhere.

        An image is a contiguous run of image slots; a run longer than one image (two images
        back to back) restarts the count every ``grid_size`` slots.
        """
        is_image = self.is_image_slot(input_ids)
        count = is_image.long().cumsum(dim=-1)
        # The count just before each run starts: the running maximum of the count at non-image slots.
        before = torch.where(is_image, torch.zeros_like(count), count).cummax(dim=-1).values
        index = (count - before - 1) % self.config.image_slots
        return torch.where(is_image, index, torch.full_like(index, -1))

    def read_image_blocks(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, L, C)`` ids -> ``(B, L)``: for slots of an image the model *reads* (between
        ``<image>`` and ``</image>``) the number of that image in its row (0, 1, ...), -1 elsewhere
        (text, boundary tokens, images being generated)."""
        first = input_ids[..., 0] if input_ids.dim() == 3 else input_ids
        layout = self.layout
        starts = (first == layout.image_start_id).long().cumsum(dim=-1)
        ends = (first == layout.image_end_id).long().cumsum(dim=-1)
        inside = self.is_image_slot(input_ids) & (starts > ends)
        return torch.where(inside, starts - 1, torch.full_like(starts, -1))

    def prefill_attention_mask(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dtype: torch.dtype,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The additive ``(B, 1, L, L)`` mask of a prefill that is not plainly causal, else None.

        Causal with padding masked, and two rules on top. With ``image_attention="bidirectional"``
        every slot of a read image sees its whole image (a prefix-LM block, as PaLI / Gemma 3
        do). With ``segment_ids`` (independent turns, see
        :meth:`mllm.chat.SequenceBuilder.independent_turns`) a slot of segment k >= 1 sees the
        shared prefix (segment 0) and its own segment only."""
        bidirectional = self.config.image_attention == "bidirectional"
        blocks = self.read_image_blocks(input_ids) if bidirectional else None
        if blocks is not None and not bool((blocks >= 0).any()):
            blocks = None
        if blocks is None and segment_ids is None:
            return None
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        allowed = (positions[None, :] <= positions[:, None]).unsqueeze(0)  # (1, q, k) causal
        if segment_ids is not None:
            seen = (segment_ids[:, None, :] == 0) | (segment_ids[:, None, :] == segment_ids[:, :, None])
            allowed = allowed & seen
        if blocks is not None:
            same_image = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
            allowed = allowed | same_image
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, :]  # padding rows stay finite (additive mask)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)

    def embed_image_positions(self, embeds: torch.Tensor, slot_index: torch.Tensor) -> torch.Tensor:
        """Add the row and column embeddings to the image slots (``slot_index >= 0``).

        ``projector`` and ``gated`` positions are not added here: they depend on the slot's codes
        (:meth:`_fuse_slot_vectors`)."""
        mode = self.config.image_position_embedding
        if mode in ("none", "projector", "gated"):
            return embeds
        columns = self.config.grid_size[1]
        index = slot_index.clamp_min(0)
        if mode == "learned":
            positions = self.image_rows(index // columns) + self.image_cols(index % columns)
        else:
            positions = self._sincos_rows(index, embeds.shape[-1])
        return embeds + positions.to(embeds.dtype) * (slot_index >= 0).unsqueeze(-1).to(embeds.dtype)

    def _sincos_rows(self, index: torch.Tensor, width: int) -> torch.Tensor:
        # Built once per width and device: a sampler asks at every slot, and copying a fresh
        # table to an accelerator each time would wait for it.
        tables = self.__dict__.setdefault("_sincos_tables", {})
        key = (width, index.device, tuple(self.config.grid_size), self.config.image_position_scale)
        if key not in tables:
            with torch.inference_mode(False):  # a plain tensor even when a sampler asks first
                table = sincos_grid_table(self.config.grid_size, width, self.config.image_position_scale)
                tables[key] = table.to(index.device)
        return tables[key][index]

    def embed_slots(self, input_ids: torch.Tensor, image_slot_index: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L)`` or ``(B, L, C)`` ids (``-1`` = empty) -> ``(B, L, H)`` input embeddings.

        With ``image_position_embedding`` each image slot also gets its row and column
        embedding; ``image_slot_index`` (``(B, L)``, -1 off images) gives the slots' indices
        in their image, and is derived from the runs of image slots in ``input_ids`` when
        omitted (a sampler feeding one slot at a time with a KV cache must pass it).
        """
        embed = self.get_input_embeddings()
        if input_ids.dim() == 2:
            return embed(input_ids)
        if input_ids.dim() != 3 or input_ids.shape[-1] != self.config.slot_width:
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)}; expected (B, L) or (B, L, {self.config.slot_width}) "
                f"(semantic depth {self.config.semantic_depth} + pixel depth {self.config.pixel_depth})"
            )
        index = drawn = slots = None
        generated = self.config.generated_position_embedding != "none"
        if self.config.image_position_embedding != "none" or generated:
            index = slots = self.image_slot_index(input_ids) if image_slot_index is None else image_slot_index
            if generated:  # drawn slots get their own positions below; read ones keep image_position_embedding's
                drawn = (slots >= 0) & (self.read_image_blocks(input_ids) < 0)
                index = slots.masked_fill(drawn, -1)
        valid = (input_ids >= 0).unsqueeze(-1)
        embeds = self._fuse_slot_vectors(input_ids, embed(input_ids.clamp_min(0)) * valid, index)
        if index is not None:
            embeds = self.embed_image_positions(embeds, index)
        if drawn is not None:
            embeds = self.embed_generated_positions(embeds, drawn, slots)
        return embeds

    def embed_generated_positions(
        self, embeds: torch.Tensor, drawn: torch.Tensor, slot_index: torch.Tensor
    ) -> torch.Tensor:
        """Add the sine-cosine row and column features to the slots of images being drawn
        (``drawn``, ``(B, L)`` bool; ``slot_index``: their indices in their image).

        A slot the model writes is fed back as the input that predicts the next one, so its own
        place in the grid is what the LM needs to know which part of the caption to draw next.
        Under 1-D rotary positions alone it has to count slots since ``<image_gen_start>``
        modulo the grid width. Read images (between ``<image>`` and ``</image>``) are placed by
        ``image_position_embedding`` only (none by default: there a position added to every
        slot averages out of the answer's read-out, :meth:`_fuse_slot_vectors`). A sampler
        feeding one slot at a time passes its ``slot_index``; such a slot has no ``<image>``
        before it in the chunk, so it counts as drawn, which it is.
        """
        # No early return when nothing is drawn (adding zero rows is exact): reading the mask on
        # the host would stop a sampler's device queue at every slot.
        rows = self._sincos_rows(slot_index.clamp_min(0), embeds.shape[-1]).to(embeds.dtype)
        return embeds + rows * drawn.unsqueeze(-1).to(embeds.dtype)

    def _fuse_slot_vectors(
        self, input_ids: torch.Tensor, vectors: torch.Tensor, slot_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, L, C, H)`` per-column embeddings -> ``(B, L, H)`` slot inputs (``input_fusion``).

        Positions that depend on what a slot shows (``slot_index``: ``(B, L)``, -1 off images):

        - ``projector``: the sine-cosine table (as wide as the projector's input) is added to an
          image slot's input before the projector, so the slot's embedding is a nonlinear
          function of its codes *and* its place, as a ViT's patch feature is.
        - ``gated``: the slot's embedding is left as it is, and the sine-cosine table, scaled
          channel by channel by a linear map of the slot's code vectors, is added to it.

        A position added regardless of content (``learned``, ``sincos``) is the same on every
        slot whatever it shows, so it averages out of an even pooling of the image, which is
        how a freshly trained LM reads it: the answer cannot learn where anything is.
        """
        mode = self.config.image_position_embedding
        if self.visual_projector is None:
            fused = content = vectors.sum(dim=2)
        else:
            split = self.config.semantic_depth
            semantic, pixel = vectors[:, :, :split].sum(dim=2), vectors[:, :, split:].sum(dim=2)
            is_image = self.is_image_slot(input_ids).unsqueeze(-1)
            content = fused_in = (
                torch.cat([semantic, pixel], dim=-1) if self.config.input_fusion == "concat_mlp" else semantic + pixel
            )
            if mode == "projector" and slot_index is not None:
                rows = self._sincos_rows(slot_index.clamp_min(0), fused_in.shape[-1])
                fused_in = fused_in + rows.to(fused_in.dtype) * (slot_index >= 0).unsqueeze(-1).to(fused_in.dtype)
            fused = torch.where(is_image, self.visual_projector(fused_in), semantic + pixel)
        if mode == "gated" and slot_index is not None:
            rows = self._sincos_rows(slot_index.clamp_min(0), fused.shape[-1]).to(fused.dtype)
            on = (slot_index >= 0).unsqueeze(-1).to(fused.dtype)
            fused = fused + rows * self.image_position_gate(content) * on
        return fused

    def new_position_gate(self) -> nn.Linear:
        """The ``gated`` mode's gate: reads the slot's code vectors (the projector's input, so
        twice the width with concat fusion) and scales the sine-cosine table channel by channel
        (initialised at std 1 in ``_init_weights``)."""
        hidden = self.llm.config.hidden_size
        content = 2 * hidden if self.config.input_fusion == "concat_mlp" else hidden
        return nn.Linear(content, hidden)
