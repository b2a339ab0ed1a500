"""What a bad training image does, under ``data.on_bad_image``.

``error`` stops training after a checkpoint; ``skip`` gives way to the next good item
(:class:`BadImageGuard`), counted and listed in ``output_dir/bad_images.txt`` by
:class:`BadImageLog`. :func:`image_name` names the file of a reader's item as its errors do.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from tokenizer.config import ConfigError
from tokenizer.files import write_text_atomic
from tokenizer.images import ImageLoadError

logger = logging.getLogger(__name__)

ON_BAD_IMAGE: tuple[str, ...] = ("error", "skip")
BAD_IMAGES_FILE = "bad_images.txt"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def image_name(reader: Dataset, index: int) -> str:
    """The file of item ``index`` of a reader, as its errors name it."""
    name = getattr(reader, "image_name", None)
    return name(index) if name is not None else f"item {index}"


_LOG_LIMIT = 100_000  # names remembered for "logged once"; a bound on memory for huge datasets
_logged: set[str] = set()


def _log_once(name: str, reason: str) -> None:
    if name in _logged:
        return
    if len(_logged) < _LOG_LIMIT:
        _logged.add(name)
    logger.warning("left out a bad image (data.on_bad_image=skip): %s", reason)


class BadImageGuard(Dataset):
    """A reader whose bad images give way to the next good item, each named in the item it gave way to.

    ``guard[i]`` is ``reader[i]`` when its image decodes; otherwise it is the item of the next
    index whose image does (i + 1, i + 2, ..., wrapping around), with ``bad_images`` listing the
    ``(name, reason)`` of every bad image passed over (an empty list when none was). Which item
    takes a bad one's place depends only on the index and the files, never on what was read
    before, so a step-indexed sampler gives a resumed run the batches of an uninterrupted one,
    whichever DataLoader worker reads them. ``log``: log each bad image once (for datasets read
    in the main process; a training loop logs through :class:`BadImageLog` instead).
    """

    def __init__(self, reader: Dataset, log: bool = False) -> None:
        self.reader = reader
        self.log = log
        self._bad: dict[int, tuple[str, str]] = {}  # known bad indices: not decoded twice

    def __len__(self) -> int:
        return len(self.reader)

    def image_name(self, index: int) -> str:
        return image_name(self.reader, index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        size = len(self.reader)
        passed: list[tuple[str, str]] = []
        for offset in range(size):
            position = (index + offset) % size
            if position not in self._bad:
                try:
                    item = self.reader[position]
                except ImageLoadError as error:
                    self._bad[position] = (image_name(self.reader, position), _one_line(error))
                else:
                    item["bad_images"] = passed
                    return item
            passed.append(self._bad[position])
            if self.log:
                _log_once(*self._bad[position])
        raise ImageLoadError(f"all {size} images are bad (the first: {passed[0][1]})")


class BadImageLog:
    """The training loop's side of ``data.on_bad_image``, for batches read through a :class:`BadImageGuard`.

    With ``skip`` it logs each bad image once, counts them and keeps the list in
    ``output_dir/bad_images.txt`` (``name<TAB>reason`` lines, rewritten atomically as images are
    found, so a resumed run goes on counting from it). With ``error`` it tells the loop to stop
    at the first batch that met one, and words the error. ``enabled``: this process writes the
    list (rank 0).
    """

    def __init__(self, on_bad_image: str, output_dir: Path, resumed: bool = False, enabled: bool = True) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ConfigError(f"data.on_bad_image={on_bad_image!r}; expected {'|'.join(ON_BAD_IMAGE)}")
        self.on_bad_image = on_bad_image
        self.path = Path(output_dir) / BAD_IMAGES_FILE
        self.enabled = enabled
        self.found: dict[str, str] = {}  # name -> reason, in the order met
        self.first: tuple[str, str] | None = None  # on_bad_image=error: the image that stops the run
        if resumed and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                name, _, reason = line.partition("\t")
                self.found[name] = reason

    @property
    def count(self) -> int:
        return len(self.found)

    def meet(self, batch: dict[str, Any]) -> bool:
        """Take (and remove) the bad images ``batch`` passed over; True when the run must stop."""
        bad = batch.pop("bad_images", None) or []
        if not bad:
            return False
        if self.on_bad_image == "error":
            self.first = bad[0]
            return True
        new = [(name, reason) for name, reason in bad if name not in self.found]
        for name, reason in new:
            self.found[name] = reason
            logger.warning("left out a bad image (data.on_bad_image=skip): %s", reason)
        if new:
            self._write()
        return False

    def stop_error(self, step: int, checkpoint: Path) -> ImageLoadError:
        """The one-line error of a run stopped by a bad image, after ``checkpoint`` (of ``step``) was written."""
        reason = self.first[1] if self.first is not None else "another rank met a bad image (its log names it)"
        return ImageLoadError(
            f"{reason}; stopped before step {step + 1} with a checkpoint in {checkpoint}: fix or remove the file "
            "and run the same command to resume from it, or set data.on_bad_image=skip to leave bad images out"
        )

    def summary(self) -> dict[str, float]:
        """With ``skip``: log the count and where the list is, write the list, return ``{"bad_images": count}``."""
        if self.on_bad_image != "skip":
            return {}
        self._write()
        if self.found:
            logger.warning("left out %d bad image(s), listed in %s", self.count, self.path)
        return {"bad_images": float(self.count)}

    def _write(self) -> None:
        if self.enabled:
            lines = "".join(f"{name}\t{reason}\n" for name, reason in self.found.items())
            write_text_atomic(self.path, lines)
