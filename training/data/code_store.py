"""Reading code shards: :class:`CodeStore` maps every image key of a shard folder to its codes.

The folder layout and ``meta.json`` are described in :mod:`training.data.code_shards`, which
writes them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from training.data.code_shards import META_NAME, CodeShardsError, CodeShardsMeta, normalise_key


class CodeStore:
    """All code shards of ``out_dir``, memory-mapped; ``get(key)`` is O(1).

    ``get`` returns ``(pixel_codes (h, w, D_pixel), semantic_codes (h, w, D_semantic))`` int64.
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        import datasets

        self.out_dir = Path(out_dir)
        meta_path = self.out_dir / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} is missing: {self.out_dir} is not a code-shard folder "
                "(write one with python -m training.data.code_shards)"
            )
        self._meta = CodeShardsMeta.from_file(meta_path)
        if not self._meta.complete:
            raise CodeShardsError(
                f"{self.out_dir} is incomplete ({len(self._meta.shards)} of {self._meta.num_shards} shards); "
                "rerun the tokenisation to finish it"
            )
        height, width = self._meta.grid
        shapes = {
            "pixel": (height, width, self._meta.pixel_depth),
            "semantic": (height, width, self._meta.semantic_depth),
        }
        # Blocks are the shards' arrow record batches, viewed as numpy without copying (memory-mapped).
        self._blocks: list[tuple[np.ndarray, np.ndarray]] = []
        self._index: dict[str, tuple[int, int]] = {}
        for name in self._meta.shards:
            shard = self.out_dir / name
            if not shard.is_dir():
                raise CodeShardsError(f"{meta_path} lists {name}, but {shard} does not exist")
            table = datasets.load_from_disk(str(shard)).data.table
            for column, shape in shapes.items():
                kind = table.schema.field(column).type
                expected = pa.list_(pa.from_numpy_dtype(np.dtype(self._meta.dtype)), int(np.prod(shape)))
                if kind != expected:
                    raise CodeShardsError(
                        f"{shard}: column {column!r} has type {kind}; meta.json says {expected} "
                        f"(h, w, D = {shape}, dtype {self._meta.dtype})"
                    )
            keys = table.column("key").to_pylist()
            first_row = 0  # of the current chunk within the shard
            for chunk_pixel, chunk_semantic in zip(
                table.column("pixel").chunks, table.column("semantic").chunks, strict=True
            ):
                block = len(self._blocks)
                self._blocks.append(
                    (
                        chunk_pixel.flatten().to_numpy(zero_copy_only=True).reshape(-1, *shapes["pixel"]),
                        chunk_semantic.flatten().to_numpy(zero_copy_only=True).reshape(-1, *shapes["semantic"]),
                    )
                )
                for row, key in enumerate(keys[first_row : first_row + len(chunk_pixel)]):
                    if key in self._index:
                        raise CodeShardsError(f"{shard}: key {key!r} appears twice in {self.out_dir}")
                    self._index[key] = (block, row)
                first_row += len(chunk_pixel)
        if len(self._index) != self._meta.num_codes:  # num_images less the bad ones left out
            raise CodeShardsError(
                f"{self.out_dir}: the shards hold {len(self._index)} images; meta.json says {self._meta.num_codes}"
            )

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers (spawn) re-open the memory-mapped shards instead of pickling their contents.
        return {"out_dir": self.out_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["out_dir"])

    @property
    def skipped_images(self) -> set[str]:
        """Keys of the images ``--on-bad-image skip`` left out as unreadable (they have no codes)."""
        return {key for keys in self._meta.bad_images.values() for key in keys}

    @property
    def meta(self) -> CodeShardsMeta:
        return self._meta

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[str]:
        """Image keys, sorted (the shard order)."""
        return list(self._index)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (str, os.PathLike)) and normalise_key(key) in self._index

    def get(self, key: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes of image ``key``: pixel (h, w, D_pixel), semantic (h, w, D_semantic), int64.

        Raises:
            KeyError: no image ``key`` in this store (the message names the key and the folder).
        """
        location = self._index.get(normalise_key(key))
        if location is None:
            raise KeyError(
                f"image {os.fspath(key)!r} has no codes in {self.out_dir} ({len(self)} images); "
                "tokenise it with python -m training.data.code_shards"
            )
        block, row = location
        pixel, semantic = self._blocks[block]
        return torch.from_numpy(pixel[row].astype(np.int64)), torch.from_numpy(semantic[row].astype(np.int64))


__all__ = ["CodeStore"]
