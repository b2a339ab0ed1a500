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
import numbers
from collections.abc import Callable, Iterator
from collections.abc import Sequence as SequenceABC
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllm.chat import ConversationError, Sequence, SequenceBuilder
from mllm.generation import SamplingConfig, compile_mode_for, generate_image_codes, generate_text
from mllm.model_folder import IMAGE_RESIZE_FIELD, check_image_resize, load_model_folder, recorded_image_resize
from mllm.modeling import DualTokenMLLMForCausalLM
from mllm.request_checks import (
    MAX_NEW_TOKENS,
    SEED_LIMIT,
    PipelineError,
    check_history,
    check_integer,
    check_prompt,
    check_sampling,
    check_sampling_config,
    check_sequence,
    item_name,
)
from mllm.sampling_file import SAMPLING_FILE, read_sampling, write_sampling
from mllm.text_stream import TextStream
from tokenizer.devices import autocast

ImageLike = Any  # a path, a PIL image, an (H, W, 3) uint8 array, or a (3, H, W) tensor in [-1, 1]


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
        image_resize: str | None = None,
        compile: bool | str = False,
    ):
        """``image_resize``: how images that are not square are made square for the visual tokenizer,
        ``"pad"`` (pad-to-square, LLaVA's choice) or ``"crop"`` (centre crop); None is ``"pad"``.
        :meth:`from_pretrained` passes the mode the model folder records (the one training used).
        ``compile``: decode through ``torch.compile`` (True: CUDA graphs on CUDA, else ``"default"``;
        or a mode name; :func:`~mllm.generation.compile_mode_for`); the first call compiles."""
        self.image_resize = check_image_resize("pad" if image_resize is None else image_resize, IMAGE_RESIZE_FIELD)
        self.model = model.eval()
        self.compile_mode = compile_mode_for(self.device, compile)
        self.sampling = sampling or SamplingConfig()  # image-sampling defaults
        self.text_tokenizer = text_tokenizer
        self.visual_tokenizer = visual_tokenizer.eval()
        self.builder = SequenceBuilder.for_model(text_tokenizer, model.config, max_length)
        self.pad_id = text_tokenizer.pad_token_id if text_tokenizer.pad_token_id is not None else 0
        end_ids = self.builder.text_ids(self.builder.template.end)
        self.stop_ids = (end_ids[0],) if end_ids else ()

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        visual_tokenizer_path: str | Path | None = None,
        device: str | torch.device | None = "auto",
        image_resize: str | None = None,
        compile: bool | str = False,
    ) -> Pipeline:
        """The model folder ``directory`` and its DualToken tokenizer, both on ``device``
        (``auto``: the first CUDA GPU when there is one, else the CPU; :mod:`tokenizer.devices`).

        ``image_resize`` (``"pad"`` or ``"crop"``): None uses the folder's recorded mode
        (``dualtoken.json``'s ``image_resize``, how training made its images square), else ``"pad"``.
        """
        from tokenizer.devices import resolve_device
        from tokenizer.model import DualTokenizer

        directory = Path(directory)
        # Checked before the weights load; None: the mode training used, as the folder records it.
        image_resize = recorded_image_resize(directory) if image_resize is None else image_resize
        check_image_resize("pad" if image_resize is None else image_resize, IMAGE_RESIZE_FIELD)
        device = resolve_device(device)
        model, text_tokenizer, sidecar = load_model_folder(directory, device=device)
        path = (
            Path(visual_tokenizer_path)
            if visual_tokenizer_path
            else resolve_visual_tokenizer_path(directory, sidecar.get("tokenizer_path"))
        )
        visual_tokenizer = DualTokenizer.from_pretrained(path, device=device)
        sampling = read_sampling(directory)
        return cls(model, text_tokenizer, visual_tokenizer, None, sampling, image_resize, compile)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ images in
    def _image_tensor(self, image: ImageLike) -> torch.Tensor:
        """One image as the tokenizer's (3, S, S) input in [-1, 1].

        Images that are not S x S are made square by ``self.image_resize``: ``"pad"``
        (pad-to-square) or ``"crop"`` (centre crop), through :func:`tokenizer.images.fit_square`;
        an S x S image is used as it is.
        """
        from PIL import Image

        from tokenizer.images import fit_square, load_image, uint8_image_to_tensor

        size = self.visual_tokenizer.backbone.image_size
        mode = self.image_resize
        if isinstance(image, (str, Path)):
            return load_image(Path(image), name=str(image), image_size=size, resize=mode)
        if isinstance(image, torch.Tensor):
            tensor = image.float()
            if tensor.dim() != 3 or tensor.shape[0] != 3:
                raise PipelineError(f"expected a (3, H, W) image tensor, got shape {tuple(tensor.shape)}")
            if tensor.shape[-2:] == (size, size):
                return tensor
            if tensor.shape[-1] == tensor.shape[-2]:
                return torch.nn.functional.interpolate(tensor[None], size=(size, size), mode="bilinear")[0]
            array = tensor.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        else:
            array = np.asarray(image)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
                raise PipelineError(f"expected an (H, W, 3) uint8 image, got {array.dtype} {array.shape}")
        if array.shape[:2] != (size, size):
            array = np.asarray(fit_square(Image.fromarray(array), size, mode))
        return uint8_image_to_tensor(array)

    @torch.no_grad()
    def encode(self, images: SequenceABC[ImageLike]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(semantic, pixel)`` codes, each ``(B, h, w, D)``."""
        tensors = []
        for index, image in enumerate(images):
            try:
                tensors.append(self._image_tensor(image))
            except PipelineError as error:
                raise PipelineError(f"images[{index}]: {error}") from None
        batch = torch.stack(tensors).to(self.device)
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
        on_text: Callable[[str], None] | None = None,
    ) -> str:
        """Answer ``question`` about ``image``; ``history`` holds earlier ``(question, answer)`` turns.
        ``on_text(piece)`` receives the answer piece by piece as it is drawn (the pieces make the answer)."""
        histories = [check_history(history, "history")]
        stream = None if on_text is None else lambda row, piece: on_text(piece)
        return self.answer_batch([image], [question], histories, max_new_tokens, sampling, seed, on_text=stream)[0]

    def answer_batch(
        self,
        images: SequenceABC[ImageLike | None],
        questions: SequenceABC[str],
        histories: SequenceABC[list[tuple[str, str]]] | None = None,
        max_new_tokens: int = 16,
        sampling: SamplingConfig | None = None,
        seed: int = 0,
        seeds: SequenceABC[int] | None = None,
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[str]:
        """Answers to ``questions``, one per image (None: no image), each with its own history.

        All questions run as one left-padded batch. With sampling (``temperature > 0``) answer k
        is drawn from its own generator seeded ``seed + k`` (or ``seeds[k]``), so it does not
        depend on the other questions in the batch. Every input is checked before any model
        runs: a bad one raises :class:`PipelineError` naming the argument and what was expected.
        ``on_text(k, piece)`` receives answer k piece by piece as it is drawn (:class:`~mllm.text_stream.TextStream`).
        """
        items = check_sequence(questions, "questions")
        questions = [check_prompt(text, item_name("question", items, index)) for index, text in enumerate(items)]
        images = list(check_sequence(images, "images", allow_empty=True))
        if histories is None:
            checked_histories = [[] for _ in questions]
        else:
            checked_histories = [
                check_history(history, f"histories[{index}]")
                for index, history in enumerate(check_sequence(histories, "histories", allow_empty=True))
            ]
        if not len(images) == len(questions) == len(checked_histories):
            raise PipelineError(
                f"{len(images)} images, {len(questions)} questions and {len(checked_histories)} histories; "
                "expected the same number of each"
            )
        context = self.builder.max_length
        max_new_tokens = check_integer(max_new_tokens, "max_new_tokens", 1, context or MAX_NEW_TOKENS)
        sampling = SamplingConfig(temperature=0.0) if sampling is None else check_sampling_config(sampling)
        if seeds is None:
            seed = check_integer(seed, "seed", 0, SEED_LIMIT - len(questions))
            seed_list = [seed + k for k in range(len(questions))]
        else:
            seed_list = [check_integer(value, f"seeds[{k}]", 0, SEED_LIMIT - 1) for k, value in enumerate(seeds)]
            if len(seed_list) != len(questions):
                raise PipelineError(f"{len(seed_list)} seeds for {len(questions)} questions; expected one seed each")
        grid = self.model.config.grid_size
        for index, (question, history, image) in enumerate(zip(questions, checked_histories, images, strict=True)):
            placeholder = None
            if image is not None:  # codes of the right shape: a prompt's length does not depend on their values
                placeholder = (
                    torch.zeros(*grid, self.model.config.semantic_depth, dtype=torch.long),
                    torch.zeros(*grid, self.model.config.pixel_depth, dtype=torch.long),
                )
            what = item_name("question", questions, index)
            length = len(self._answer_prompt(question, history, placeholder, what))
            if context is not None and length + max_new_tokens > context:
                raise PipelineError(
                    f"{what}: the prompt (with its image and history) takes {length} of the model's "
                    f"{context} positions, which leaves {context - length} for the answer; "
                    f"max_new_tokens={max_new_tokens} would run past the context (lower it or shorten the history)"
                )
        encoded: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(images)
        with_image = [i for i, image in enumerate(images) if image is not None]
        if with_image:
            semantic, pixel = self.encode([images[i] for i in with_image])
            for row, index in enumerate(with_image):
                encoded[index] = (semantic[row], pixel[row])
        prompts = [
            self._answer_prompt(question, history, codes, item_name("question", questions, index))
            for index, (question, history, codes) in enumerate(zip(questions, checked_histories, encoded, strict=True))
        ]
        generators = [torch.Generator(device=self.device).manual_seed(value) for value in seed_list]
        streams = [TextStream(self.text_tokenizer, lambda piece, k=k: on_text(k, piece)) for k in range(len(prompts))]

        def on_tokens(tokens: list[int]) -> None:
            for stream, token in zip(streams, tokens, strict=True):
                if token >= 0:
                    stream.add(token)

        options = {"compile_mode": self.compile_mode, "on_tokens": None if on_text is None else on_tokens}
        with autocast(self.device):
            outputs = generate_text(
                self.model, prompts, max_new_tokens, sampling, self.stop_ids, self.pad_id, generators, **options
            )
        answers = [self.text_tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]
        if on_text is not None:
            for stream in streams:
                stream.finish()
        return answers

    def _answer_prompt(
        self,
        question: str,
        history: list[tuple[str, str]],
        codes: tuple[torch.Tensor, torch.Tensor] | None,
        what: str,
    ) -> Sequence:
        turns: list[tuple[str, str]] = []
        for old_question, old_answer in history:
            turns += [("user", old_question), ("assistant", old_answer)]
        turns.append(("user", question))
        if codes is not None:
            first_role, first_text = turns[0]
            turns[0] = (first_role, f"<image>\n{first_text.replace('<image>', '').strip()}")
        try:
            return self.builder.conversation(
                turns,
                semantic=codes[0] if codes else None,
                pixel=codes[1] if codes else None,
                train=False,
                add_generation_prompt=True,
            )
        except ConversationError as error:
            raise PipelineError(f"{what}: {error}") from None

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
        Every input is checked before sampling starts (:class:`PipelineError` names the
        argument), including that each prompt leaves room for the image in the model's context.
        """
        plan = self._plan_generation(prompts, n, cfg, top_k, top_p, temperature, seed, seeds)
        return self._sample_codes(plan.prompts, plan.seeds, plan.sampling, use_cache)

    def _plan_generation(
        self,
        prompts: str | SequenceABC[str],
        n: int,
        cfg: float | None,
        top_k: int | None,
        top_p: float | None,
        temperature: float | None,
        seed: int,
        seeds: SequenceABC[int] | None,
    ) -> _GenerationPlan:
        """Check every generation input; the prompts (``n`` each, prompt-major), their seeds and the sampling."""
        sampling = check_sampling(
            cfg=self.sampling.cfg if cfg is None else cfg,
            top_k=self.sampling.top_k if top_k is None else top_k,
            top_p=self.sampling.top_p if top_p is None else top_p,
            temperature=self.sampling.temperature if temperature is None else temperature,
        )
        single = isinstance(prompts, (str, bytes, bytearray))
        texts = [check_prompt(prompts, "prompt")] if single else []
        if not single:
            items = check_sequence(prompts, "prompts")
            texts = [check_prompt(prompt, item_name("prompt", items, index)) for index, prompt in enumerate(items)]
        n = check_integer(n, "n", 1)
        for index, text in enumerate(texts):
            self._check_fits(text, "the prompt" if len(texts) == 1 else f"the prompt at prompts[{index}]")
        count = len(texts) * n
        if seeds is None:
            seed = check_integer(seed, "seed", 0, SEED_LIMIT - count)
            seed_list = [seed + k for k in range(count)]
        else:
            seed_list = [check_integer(value, f"seeds[{k}]", 0, SEED_LIMIT - 1) for k, value in enumerate(seeds)]
            if len(seed_list) != count:
                raise PipelineError(f"{len(seed_list)} seeds for {count} images; expected one seed per image")
        return _GenerationPlan([text for text in texts for _ in range(n)], seed_list, sampling)

    def _check_fits(self, text: str, what: str) -> None:
        """Refuse a prompt after which the image (its slots, then ``<image_gen_end>`` and the end
        token, as in training) would run past the model's context."""
        try:
            length = len(self.builder.generation(text, train=False))
        except ConversationError as error:
            raise PipelineError(f"{what}: {error}") from None
        context = self.builder.max_length
        slots = self.model.config.image_slots
        closing = 1 + len(self.builder.text_ids(self.builder.template.end))
        if context is not None and length + slots + closing > context:
            raise PipelineError(
                f"{what} takes {length} positions; with the image's {slots} slots and {closing} closing tokens "
                f"that is {length + slots + closing}, over the model's context of {context}; shorten the prompt"
            )

    def _sample_codes(
        self, prompts: list[str], seeds: list[int], sampling: SamplingConfig, use_cache: bool
    ) -> torch.Tensor:
        sequences = [self.builder.generation(prompt, train=False) for prompt in prompts]
        unconditional = self.builder.generation("", train=False) if sampling.cfg != 1.0 else None
        generators = [torch.Generator(device=self.device).manual_seed(value) for value in seeds]
        with autocast(self.device):
            return generate_image_codes(
                self.model,
                sequences,
                unconditional,
                sampling.cfg,
                sampling,
                self.pad_id,
                generators,
                use_cache=use_cache,
                compile_mode=self.compile_mode,
            )

    def check_decode_depths(self, depths: int | None, name: str = "decode_depths") -> int | None:
        """``depths`` for :meth:`decode`: None (all) or an integer in [1, the model's pixel depth]."""
        if depths is None:
            return None
        depth = self.model.config.pixel_depth
        if isinstance(depths, bool) or not isinstance(depths, numbers.Integral) or not 1 <= depths <= depth:
            raise PipelineError(f"{name}={depths!r}; expected None (all) or an integer in [1, {depth}]")
        return int(depths)

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

        ``decode_depths``: draw only the first RVQ depths of the sampled codes (None = all). All
        images are held in memory; :meth:`generate_batches` draws many without that.
        """
        decode_depths = self.check_decode_depths(decode_depths)
        return self.decode(self.generate_codes(prompts, **options), decode_depths)

    def generate_batches(
        self,
        prompts: str | SequenceABC[str],
        n: int = 1,
        batch_size: int = 8,
        decode_depths: int | None = None,
        cfg: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        seed: int = 0,
        use_cache: bool = True,
    ) -> Iterator[list[np.ndarray]]:
        """The images of :meth:`generate`, ``batch_size`` at a time, in the same order and with the
        same seeds (image k is drawn from ``seed + k``), so any number of images fits in memory.

        Every input is checked here, before the first batch is drawn; options as :meth:`generate_codes`.
        """
        decode_depths = self.check_decode_depths(decode_depths)
        batch_size = check_integer(batch_size, "batch_size", 1)
        plan = self._plan_generation(prompts, n, cfg, top_k, top_p, temperature, seed, None)
        return self._batches(plan, batch_size, decode_depths, use_cache)

    def _batches(
        self, plan: _GenerationPlan, batch_size: int, decode_depths: int | None, use_cache: bool
    ) -> Iterator[list[np.ndarray]]:
        for start in range(0, len(plan.prompts), batch_size):
            end = start + batch_size
            codes = self._sample_codes(plan.prompts[start:end], plan.seeds[start:end], plan.sampling, use_cache)
            yield self.decode(codes, decode_depths)


@dataclasses.dataclass
class _GenerationPlan:
    """Checked generation inputs: one prompt and one seed per image, and the sampling settings."""

    prompts: list[str]
    seeds: list[int]
    sampling: SamplingConfig


__all__ = ["Pipeline", "ConversationError", "SAMPLING_FILE", "read_sampling", "write_sampling"]
