"""The user-facing API: ask about an image, draw an image from text.

    pipe = Pipeline.from_pretrained("runs/tiny/mllm/joint/model")
    pipe.answer("photo.png", "what colour is the circle?")          # -> "red"
    images = pipe.generate("a large red circle", n=4, cfg=3.0, seed=0)  # -> list of (H, W, 3) uint8

Both the chat command and the evaluation harness use this class, so what they measure is
what a user gets. Images go through the visual tokenizer (semantic codes in, pixel codes
out); the model folder's ``dualtoken.json`` names it (override with
``visual_tokenizer_path``). A model folder may also hold ``sampling.json``, the image-sampling
settings it draws best with (``tiny-mllm`` writes the ones it scored the model with); options
left out of :meth:`Pipeline.generate` come from it, else from :class:`~mllm.generation.SamplingConfig`'s defaults.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence as SequenceABC
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllm.chat import ConversationError, SequenceBuilder
from mllm.generation import SamplingConfig, generate_image_codes, generate_text
from mllm.model_folder import load_model_folder
from mllm.modeling import DualTokenMLLMForCausalLM

SAMPLING_FILE = "sampling.json"
MAX_PROMPT_CHARS = 2000
ImageLike = Any  # a path, a PIL image, an (H, W, 3) uint8 array, or a (3, H, W) tensor in [-1, 1]


class PipelineError(ValueError):
    """Input the pipeline cannot take (empty or oversized prompt, not an image, bad option)."""


def _sampling_fields() -> dict[str, type]:
    return {field.name: type(field.default) for field in dataclasses.fields(SamplingConfig)}


def read_sampling(model_dir: Path) -> SamplingConfig:
    """:class:`SamplingConfig`'s defaults updated from the folder's ``sampling.json`` (if there is one)."""
    path = Path(model_dir) / SAMPLING_FILE
    if not path.is_file():
        return SamplingConfig()
    fields = _sampling_fields()
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PipelineError(f"{path}: not JSON ({error})") from None
    if not isinstance(stored, dict):
        raise PipelineError(f"{path}: expected an object with some of {sorted(fields)}")
    settings = {}
    for key, value in stored.items():
        if key not in fields:
            raise PipelineError(f"{path}: unknown setting {key!r}; expected some of {sorted(fields)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PipelineError(f"{path}: {key}={value!r}; expected a number")
        settings[key] = fields[key](value)
    try:
        return SamplingConfig(**settings)
    except ValueError as error:
        raise PipelineError(f"{path}: {error}") from None


def write_sampling(model_dir: Path, **settings: float) -> None:
    """Record the image-sampling settings a model draws best with in its folder."""
    from tokenizer.files import write_text_atomic

    unknown = set(settings) - set(_sampling_fields())
    if unknown:
        raise PipelineError(
            f"unknown sampling settings {sorted(unknown)}; expected some of {sorted(_sampling_fields())}"
        )
    write_text_atomic(Path(model_dir) / SAMPLING_FILE, json.dumps(settings, indent=2) + "\n")


def resolve_visual_tokenizer_path(model_dir: Path, recorded: str | None) -> Path:
    """The visual tokenizer of a model folder: ``<model>/dualtoken_tokenizer`` or the recorded path."""
    candidates = [model_dir / "dualtoken_tokenizer"]
    if recorded:
        recorded_path = Path(recorded)
        candidates += [recorded_path, model_dir / recorded_path]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"model folder {model_dir} names DualToken tokenizer {recorded!r}, which does not exist; "
        "pass visual_tokenizer_path=... (--tokenizer) to point at it"
    )


class Pipeline:
    """A unified model, its text tokenizer and its visual tokenizer, ready for chat and drawing."""

    def __init__(
        self,
        model: DualTokenMLLMForCausalLM,
        text_tokenizer: Any,
        visual_tokenizer: Any,
        max_length: int | None = None,
        sampling: SamplingConfig | None = None,
    ):
        self.model = model.eval()
        self.sampling = sampling or SamplingConfig()  # image-sampling defaults
        self.text_tokenizer = text_tokenizer
        self.visual_tokenizer = visual_tokenizer.eval()
        self.builder = SequenceBuilder.for_model(text_tokenizer, model.config, max_length)
        self.pad_id = text_tokenizer.pad_token_id if text_tokenizer.pad_token_id is not None else 0
        end_ids = self.builder.text_ids(self.builder.template.end)
        self.stop_ids = (end_ids[0],) if end_ids else ()

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, visual_tokenizer_path: str | Path | None = None, device: str = "cpu"
    ) -> Pipeline:
        from tokenizer.model import DualTokenizer

        directory = Path(directory)
        model, text_tokenizer, sidecar = load_model_folder(directory)
        model = model.to(device)
        path = (
            Path(visual_tokenizer_path)
            if visual_tokenizer_path
            else resolve_visual_tokenizer_path(directory, sidecar.get("tokenizer_path"))
        )
        visual_tokenizer = DualTokenizer.from_pretrained(path).to(device)
        return cls(model, text_tokenizer, visual_tokenizer, sampling=read_sampling(directory))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ images in
    def _image_tensor(self, image: ImageLike) -> torch.Tensor:
        from tokenizer.images import load_image

        size = self.visual_tokenizer.backbone.image_size
        if isinstance(image, (str, Path)):
            return load_image(Path(image), name=str(image), image_size=size, convert_to_rgb=True)
        if isinstance(image, torch.Tensor):
            tensor = image.float()
        else:
            array = np.asarray(image)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
                raise PipelineError(f"expected an (H, W, 3) uint8 image, got {array.dtype} {array.shape}")
            tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1.0
        if tensor.dim() != 3 or tensor.shape[0] != 3:
            raise PipelineError(f"expected a (3, H, W) image tensor, got shape {tuple(tensor.shape)}")
        if tensor.shape[-2:] != (size, size):
            tensor = torch.nn.functional.interpolate(tensor[None], size=(size, size), mode="bilinear")[0]
        return tensor

    @torch.no_grad()
    def encode(self, images: SequenceABC[ImageLike]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(semantic, pixel)`` codes, each ``(B, h, w, D)``."""
        batch = torch.stack([self._image_tensor(image) for image in images]).to(self.device)
        codes = self.visual_tokenizer.encode(batch)
        return codes.semantic_codes.cpu(), codes.pixel_codes.cpu()

    # ------------------------------------------------------------------ answers
    def answer(
        self,
        image: ImageLike | None,
        question: str,
        history: list[tuple[str, str]] | None = None,
        max_new_tokens: int = 16,
        sampling: SamplingConfig | None = None,
        seed: int = 0,
    ) -> str:
        """Answer ``question`` about ``image``; ``history`` holds earlier ``(question, answer)`` turns."""
        return self.answer_batch([image], [question], [history or []], max_new_tokens, sampling, seed)[0]

    def answer_batch(
        self,
        images: SequenceABC[ImageLike | None],
        questions: SequenceABC[str],
        histories: SequenceABC[list[tuple[str, str]]] | None = None,
        max_new_tokens: int = 16,
        sampling: SamplingConfig | None = None,
        seed: int = 0,
    ) -> list[str]:
        histories = histories or [[] for _ in questions]
        if not len(images) == len(questions) == len(histories):
            raise PipelineError("images, questions and histories must have the same length")
        encoded = [None] * len(images)
        with_image = [i for i, image in enumerate(images) if image is not None]
        if with_image:
            semantic, pixel = self.encode([images[i] for i in with_image])
            for row, index in enumerate(with_image):
                encoded[index] = (semantic[row], pixel[row])
        prompts = []
        for question, history, codes in zip(questions, histories, encoded, strict=True):
            _check_prompt(question, "question")
            turns: list[tuple[str, str]] = []
            for old_question, old_answer in history:
                turns += [("user", old_question), ("assistant", old_answer)]
            turns.append(("user", question))
            if codes is not None:
                first_role, first_text = turns[0]
                turns[0] = (first_role, f"<image>\n{first_text.replace('<image>', '').strip()}")
            prompts.append(
                self.builder.conversation(
                    turns,
                    semantic=codes[0] if codes else None,
                    pixel=codes[1] if codes else None,
                    train=False,
                    add_generation_prompt=True,
                )
            )
        generator = torch.Generator(device=self.device).manual_seed(seed)
        outputs = generate_text(
            self.model,
            prompts,
            max_new_tokens,
            sampling or SamplingConfig(temperature=0.0),
            self.stop_ids,
            self.pad_id,
            generator,
        )
        return [self.text_tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]

    # ------------------------------------------------------------------ images out
    def generate_codes(
        self,
        prompts: str | SequenceABC[str],
        n: int = 1,
        cfg: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        seed: int = 0,
        use_cache: bool = True,
        seeds: SequenceABC[int] | None = None,
    ) -> torch.Tensor:
        """Pixel codes ``(len(prompts) * n, h, w, D)``: ``n`` samples per prompt, prompt-major.

        Image k is drawn with its own generator seeded ``seed + k`` (or ``seeds[k]``), so an
        image does not depend on what else is in the batch: ``generate(p, n=4, seed=0)[2]``
        equals ``generate(p, seed=2)[0]``. ``cfg`` / ``top_k`` / ``top_p`` / ``temperature``
        left at None come from :attr:`sampling` (the model folder's ``sampling.json``).
        """
        cfg = self.sampling.cfg if cfg is None else cfg
        top_k = self.sampling.top_k if top_k is None else top_k
        top_p = self.sampling.top_p if top_p is None else top_p
        temperature = self.sampling.temperature if temperature is None else temperature
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if n < 1:
            raise PipelineError(f"n={n}; expected >= 1")
        if cfg < 0:
            raise PipelineError(f"cfg={cfg}; expected >= 0 (1 = no guidance)")
        for prompt in prompts:
            _check_prompt(prompt, "prompt")
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, cfg=cfg)
        sequences = [self.builder.generation(prompt, train=False) for prompt in prompts for _ in range(n)]
        unconditional = self.builder.generation("", train=False) if cfg != 1.0 else None
        seeds = list(seeds) if seeds is not None else [seed + k for k in range(len(sequences))]
        if len(seeds) != len(sequences):
            raise PipelineError(f"{len(seeds)} seeds for {len(sequences)} images")
        generators = [torch.Generator(device=self.device).manual_seed(int(value)) for value in seeds]
        return generate_image_codes(
            self.model, sequences, unconditional, sampling.cfg, sampling, self.pad_id, generators, use_cache=use_cache
        )

    @torch.no_grad()
    def decode(self, pixel_codes: torch.Tensor, depths: int | None = None) -> list[np.ndarray]:
        """Pixel codes -> ``(H, W, 3)`` uint8 images; ``depths``: only the first RVQ levels (None = all).

        One image at a time: convolutions pick different kernels for different batch sizes, and
        an image must not depend (even in its last bits) on the rest of its batch.
        """
        codes = pixel_codes.to(self.device)
        try:
            images = torch.cat(
                [self.visual_tokenizer.decode(codes[row : row + 1], depths) for row in range(codes.shape[0])]
            )
        except ValueError as error:
            raise PipelineError(str(error)) from None
        images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return list(images)

    def generate(
        self, prompts: str | SequenceABC[str], decode_depths: int | None = None, **options: Any
    ) -> list[np.ndarray]:
        """Images for ``prompts`` (``n`` per prompt, prompt-major); options as :meth:`generate_codes`.

        ``decode_depths``: draw only the first RVQ depths of the sampled codes (None = all).
        """
        return self.decode(self.generate_codes(prompts, **options), decode_depths)


def _check_prompt(text: str, what: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise PipelineError(f"empty {what}: give some text")
    if len(text) > MAX_PROMPT_CHARS:
        raise PipelineError(f"the {what} has {len(text):,} characters; the limit is {MAX_PROMPT_CHARS:,}")


__all__ = ["Pipeline", "PipelineError", "ConversationError"]
