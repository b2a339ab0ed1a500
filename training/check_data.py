"""``dualtoken check-data``: find every bad image of a training config's data in one pass.

    dualtoken check-data configs/tokenizer/tiny.yaml --set data.kind=imagefolder --set "data.path=data/{split}"
    dualtoken check-data configs/stages/tiny/understand.yaml

A stage-0 / stage-1 config: every split of its ``data:`` section (``train``, and ``val`` / ``test``
when ``data.path`` holds ``{split}``) is read through the reader and the decoder that training
uses, with the same settings. An LLM stage config: every image named by its conversation and
text-image files, training and held-out, decoded as ``dualtoken tokenize-codes`` would (with the
settings recorded in ``data.codes`` when it exists). Each bad file is printed as
``name<TAB>reason``; the command exits with status 0 when every image decodes and 2 otherwise.
Training meets the same files one at a time (``data.on_bad_image``); this lists them all at once.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from tokenizer.config import ConfigError
from tokenizer.images import ImageLoadError, load_image
from training.config import load_config, read_yaml
from training.data.bad_images import image_name
from training.data.image_data import DataConfig, build_image_reader
from training.data.readers import MetadataError

# Top-level keys that only one kind of config has.
_STAGE0_KEYS = {"teacher"}
_STAGE1_KEYS = {"tokenizer", "teacher_path", "init_tokenizer", "decoder_only", "loss", "discriminator"}
_LLM_KEYS = {"model", "stage", "lora", "eval"}
PROBE_SIZE = 32  # decoding decides whether an image is bad; a small resize keeps the check fast


@dataclass
class BadImage:
    name: str
    reason: str


class _ImagePaths(Dataset):
    """Image files by key, decoded as ``tokenize-codes`` decodes them."""

    def __init__(self, images: list[tuple[str, Path]], image_size: int, convert_to_rgb: bool) -> None:
        self.images, self.image_size, self.convert_to_rgb = images, image_size, convert_to_rgb

    def __len__(self) -> int:
        return len(self.images)

    def image_name(self, index: int) -> str:
        return self.images[index][0]

    def __getitem__(self, index: int) -> Any:
        key, path = self.images[index]
        return load_image(
            path,
            name=key,
            image_size=self.image_size,
            convert_to_rgb=self.convert_to_rgb,
            convert_hint="pass --convert-to-rgb to tokenize-codes",
        )


class _Probe(Dataset):
    """``(index, "")`` when item ``index`` of ``reader`` reads, else ``(index, reason)``."""

    def __init__(self, reader: Dataset) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[int, str]:
        try:
            self.reader[index]
        except (ImageLoadError, MetadataError) as error:
            return index, " ".join(str(error).split())
        return index, ""


def find_bad_images(reader: Dataset, desc: str = "checking", num_workers: int = 0) -> list[BadImage]:
    """Every item of ``reader`` whose image (or metadata) cannot be read, in index order."""
    probe = DataLoader(_Probe(reader), batch_size=64, num_workers=num_workers, collate_fn=list)
    bad = []
    with tqdm(total=len(reader), desc=desc, unit="image") as progress:
        for results in probe:
            bad += [BadImage(image_name(reader, index), reason) for index, reason in results if reason]
            progress.update(len(results))
    return bad


def image_readers(config: DataConfig) -> list[tuple[str, Dataset]]:
    """``(split, reader)`` for each split a stage-0 / stage-1 ``data:`` section provides."""
    if config.kind == "shapes":
        return []
    splits = ("train", "val", "test") if "{split}" in (config.path or "") else ("train",)
    return [(split, build_image_reader(config, split)) for split in splits]


def llm_images(config: Any) -> tuple[list[tuple[str, Path]], int, bool]:
    """``(images, image_size, convert_to_rgb)`` of an LLM stage: every distinct image file named by its
    data files, with the decoding settings of its code shards (``tokenize-codes``' defaults without them)."""
    from training.data.code_shards import META_NAME, CodeShardsMeta
    from training.mllm_data import read_sources

    images: dict[Path, str] = {}
    for val in (False, True):
        conversations, pairs = read_sources(config.data, val=val)
        for record in [*conversations, *pairs]:
            if record.image_key is not None:
                images.setdefault(Path(os.path.normpath(record.image)), record.image_key)
    meta_path = Path(config.data.codes) / META_NAME
    convert_to_rgb = CodeShardsMeta.from_file(meta_path).convert_to_rgb if meta_path.is_file() else False
    return [(key, path) for path, key in images.items()], PROBE_SIZE, convert_to_rgb


def config_class(path: str | Path) -> type:
    """Which stage's config ``path`` holds, from its top-level keys."""
    from training.mllm_config import MLLMStageConfig
    from training.tokenizer_config import Stage1Config
    from training.train_teacher import Stage0Config

    keys = set(read_yaml(path))
    for wanted, schema in ((_LLM_KEYS, MLLMStageConfig), (_STAGE1_KEYS, Stage1Config), (_STAGE0_KEYS, Stage0Config)):
        if keys & wanted:
            return schema
    raise ConfigError(
        f"{path}: not a training config (expected the keys of a stage-0 / stage-1 config, such as tokenizer "
        f"or teacher, or of an LLM stage, such as model and stage; found {sorted(keys)})"
    )


def check(path: str | Path, overrides: list[str] | None = None, num_workers: int = 0) -> tuple[int, list[BadImage]]:
    """``(number of images checked, the bad ones)`` of the data that config ``path`` trains on."""
    schema = config_class(path)
    config = load_config(schema, path, overrides)
    if isinstance(config.data, DataConfig):
        checks = [(f"{split} ({config.data.kind})", reader) for split, reader in image_readers(config.data)]
        if not checks:
            print(f"{path}: data.kind=shapes renders its images; there are no files to check")
    else:
        images, size, convert = llm_images(config)
        checks = [("images of the data files", _ImagePaths(images, size, convert))]
    total, bad = 0, []
    for desc, reader in checks:
        bad += find_bad_images(reader, desc, num_workers)
        total += len(reader)
    return total, bad


def main(argv: list[str] | None = None) -> list[BadImage]:
    parser = argparse.ArgumentParser(prog="dualtoken check-data", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a training YAML: stage 0 / 1 (configs/tokenizer/) or an LLM stage")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--num-workers", type=int, default=0, help="image-decoding processes")
    args = parser.parse_args(argv)
    total, bad = check(args.config, args.overrides, args.num_workers)
    for image in bad:
        print(f"{image.name}\t{image.reason}")
    if bad:
        raise ImageLoadError(
            f"{len(bad)} of {total} images are bad (listed above); fix or remove them, or train with "
            "data.on_bad_image=skip (tokenize-codes --on-bad-image skip) to leave them out"
        )
    if total:
        print(f"{args.config}: all {total} images decode")
    return bad


if __name__ == "__main__":
    main()
