"""The Shapes world as a torch ``Dataset`` of tensors (one split of a :class:`ShapesWorld`)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from tokenizer.images import uint8_image_to_tensor
from training.data.shapes.world import ShapesWorld


class ShapesImageDataset(Dataset):
    """A torch ``Dataset`` over one split of a :class:`ShapesWorld`.

    Items: ``{"image": (3, H, W) float32 in [-1, 1], "caption": str, "label": int, "index": int}``.
    ``single_object=True`` serves :meth:`ShapesWorld.sample_single` (zero-shot evaluation).
    """

    def __init__(self, world: ShapesWorld, split: str, single_object: bool = False) -> None:
        self.world = world
        self.split = split
        self.single_object = single_object
        self._length = world.split_size(split)

    def __len__(self) -> int:
        return self._length

    def objects(self, index: int) -> list[tuple[str, str]]:
        """(colour, shape) of each object in item ``index`` (what an image checker should find)."""
        sample = (self.world.sample_single if self.single_object else self.world.sample)(self.split, index)
        return [(obj.colour, obj.shape) for obj in sample.objects]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for ShapesImageDataset of length {self._length}")
        sample = (self.world.sample_single if self.single_object else self.world.sample)(self.split, index)
        return {
            "image": uint8_image_to_tensor(sample.image),
            "caption": sample.caption,
            "label": sample.label,
            "index": index,
        }
