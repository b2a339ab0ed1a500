"""Paper-scale check on one GPU: a few training steps of both models, then reconstruct, answer, draw.

    python scripts/gpu_check.py --out runs/gpu_check            # paper shapes, one H100 / H200
    python scripts/gpu_check.py --tiny --out runs/gpu_check     # the same code at tiny shapes, CPU

Shapes come from the project's own configs: the tokenizer of
``configs/tokenizer/so400m_384_rvq8.yaml`` (SigLIP so400m/14 at 384 px: 27 x 27 = 729 tokens,
RVQ depth 8 per branch, 16,384 codes each) and the LM of ``configs/stages/qwen2_5_3b/joint.yaml``
(Qwen2.5-3B: hidden 2048, 36 layers, 16 heads, 2 KV heads, intermediate 11008, its 151,665-token
text vocabulary extended by 2 x 16,384 code tokens). ``--tiny`` takes ``configs/tokenizer/tiny.yaml``
and ``configs/stages/tiny/joint.yaml`` instead. Weights are random unless ``--teacher`` (a SigLIP
folder) and ``--llm`` (a causal-LM folder with its text tokenizer) are given; nothing is downloaded.

Both stages train through :class:`training.distributed.TrainEngine` under DeepSpeed ZeRO-2 with
bf16 on a GPU when DeepSpeed is installed (plain PyTorch otherwise, recorded in the JSON), with
the stage-1 losses of :func:`training.train_tokenizer.generator_losses` and the unified model's
own losses; attention is FlashAttention-2 when installed, SDPA otherwise. Inference runs through
:class:`mllm.inference.Pipeline`. One JSON, ``gpu_check.json``, is written into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mllm.chat import QWEN_TEMPLATE, ChatTemplate, SequenceBuilder, collate_sequences  # noqa: E402
from mllm.generation import COMPILE_MODES, generate_image_codes  # noqa: E402
from mllm.inference import Pipeline  # noqa: E402
from mllm.modeling import DualTokenMLLMForCausalLM  # noqa: E402
from mllm.vocab import TINY_CHAT_TOKENS, extend_tokenizer  # noqa: E402
from tokenizer.backbone_factory import build_backbone  # noqa: E402
from tokenizer.devices import pick_attn_implementation, resolve_device  # noqa: E402
from tokenizer.model import DualTokenizer  # noqa: E402
from training import distributed  # noqa: E402
from training.common import autocast  # noqa: E402
from training.config import DeepSpeedConfig, load_config  # noqa: E402
from training.mllm_config import MLLMStageConfig  # noqa: E402
from training.tokenizer_config import Stage1Config  # noqa: E402
from training.train_tokenizer import Teacher, generator_losses, load_teacher  # noqa: E402

logger = logging.getLogger("gpu_check")

# Dense bf16 peak of one card (NVIDIA datasheets, SXM, without sparsity); the MFU's denominator.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
QWEN2_5_TEXT_TOKENS = 151_665  # len(tokenizer) of Qwen2.5; its LM's embedding has 151,936 rows
PAPER = {"tokenizer": "configs/tokenizer/so400m_384_rvq8.yaml", "stage": "configs/stages/qwen2_5_3b/joint.yaml"}
TINY = {"tokenizer": "configs/tokenizer/tiny.yaml", "stage": "configs/stages/tiny/joint.yaml"}
# --tiny: the tiny configs shrunk further (32 px: a 4 x 4 grid; a 2-layer LM) so that the whole
# check takes about a minute on two CPU cores; checkpointing and the chunked loss are on, to run them.
TINY_TOKENIZER = [
    "data.image_size=32",
    "data.shapes.image_size=32",
    "tokenizer.backbone.image_size=32",
    "tokenizer.backbone.gradient_checkpointing=true",
]
TINY_STAGE = [
    "model.llm_config.hidden_size=64",
    "model.llm_config.intermediate_size=128",
    "model.llm_config.num_hidden_layers=2",
    "model.depth_head_layers=1",
    "model.depth_head_hidden=64",
    "model.gradient_checkpointing=true",
    "model.loss_chunk_size=32",
]
CAPTION = "a red circle above a blue square"
QUESTION = "what is in the image?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU, under 2 minutes)")
    parser.add_argument("--teacher", help="a local SigLIP folder for the tokenizer (default: random weights)")
    parser.add_argument("--llm", help="a local causal-LM folder with its text tokenizer (default: random weights)")
    parser.add_argument("--steps", type=int, help="timed training steps per stage after one warm-up (3; --tiny: 2)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cpu")
    parser.add_argument("--no-deepspeed", action="store_true", help="plain PyTorch even when DeepSpeed is installed")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer length for the latency")
    parser.add_argument(
        "--image-batches", type=int, nargs="+", default=[1, 8], help="batch sizes for seconds per generated image"
    )
    parser.add_argument(
        "--compile",
        default="auto",
        choices=("auto", "none", *COMPILE_MODES),
        help="also time generation with Pipeline(compile=MODE); auto: reduce-overhead (CUDA graphs) on CUDA, "
        "none elsewhere; none: eager only",
    )
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 3)
    if args.steps < 1:
        parser.error(f"--steps={args.steps}; expected >= 1")
    if any(size < 1 for size in args.image_batches):
        parser.error(f"--image-batches={args.image_batches}; expected sizes >= 1")
    for flag in ("teacher", "llm"):
        path = getattr(args, flag)
        if path is not None and not Path(path, "config.json").is_file():
            parser.error(f"--{flag}={path} is not a local model folder (no config.json); nothing is downloaded")
    return args


# ----------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    """CUDA: the peak of allocated memory since the last reset; CPU: the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "none: MFU is reported on NVIDIA H100 / H200 only"
    name = torch.cuda.get_device_name(device)
    for card, flops in PEAK_BF16_FLOPS.items():
        if card in name:
            return flops, f"{flops / 1e12:.0f} TFLOP/s dense bf16 ({card} SXM datasheet) for {name}"
    return None, f"none: no peak known for {name}"


def timed(function: Any, device: torch.device) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    result = function()
    sync(device)
    return result, time.perf_counter() - start


def count(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def deepspeed_config(args: argparse.Namespace) -> tuple[DeepSpeedConfig, str]:
    if args.no_deepspeed:
        return DeepSpeedConfig(enabled=False), "off (--no-deepspeed): plain PyTorch"
    if importlib.util.find_spec("deepspeed") is None:
        return DeepSpeedConfig(enabled=False), "unavailable — deepspeed not installed: plain PyTorch"
    return DeepSpeedConfig(enabled=True, zero_stage=2), "ZeRO-2"


# ----------------------------------------------------------------------------- stage 1
def train_tokenizer(
    args: argparse.Namespace, device: torch.device, ds: DeepSpeedConfig, precision: str, world: int
) -> tuple[DualTokenizer, dict[str, Any]]:
    """A few stage-1 steps (the generator losses, no GAN, no perceptual network: their weights are
    downloads), then encode + decode throughput. Returns the tokenizer (eval mode) and its numbers."""
    config = load_config(
        Stage1Config, REPO / (TINY if args.tiny else PAPER)["tokenizer"], TINY_TOKENIZER if args.tiny else []
    )
    config.loss.perceptual = 0.0
    config.loss.gan = 0.0
    # Random weights are drawn on the device itself (a CPU init of the paper shapes takes minutes).
    if args.teacher:
        backbone, teacher = load_teacher(args.teacher)
    else:
        with device:
            backbone = build_backbone(config.tokenizer.backbone)
        frozen = copy.deepcopy(backbone).requires_grad_(False).eval()
        teacher = Teacher(vision=frozen, text_tower=None, text_tokenizer=None)
    with device:
        visual_tokenizer = DualTokenizer(config.tokenizer, backbone=backbone)
    visual_tokenizer.backbone.set_gradient_checkpointing(config.tokenizer.backbone.gradient_checkpointing)
    visual_tokenizer.to(device)
    teacher.vision.to(device)
    batch = 4 if args.tiny else config.loop.batch_size
    size = config.tokenizer.backbone.image_size
    optimizer = torch.optim.AdamW([p for p in visual_tokenizer.parameters() if p.requires_grad], lr=1e-5)
    engine = distributed.TrainEngine(visual_tokenizer, optimizer, None, 1.0, ds, batch, precision, world)
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = (torch.rand(batch, 3, size, size, generator=generator) * 2 - 1).to(device)
    semantic_layer = config.tokenizer.taps.semantic_layer

    def step() -> float:
        with autocast(precision, device):
            losses = generator_losses(engine(images), images, teacher, semantic_layer, config.loss, None)
        engine.backward(losses["total"])
        engine.step()
        return float(losses["total"].detach())

    engine.train()
    reset_peak(device)
    logger.info("stage 1: warm-up step at batch %d, %d px", batch, size)
    step()
    losses, seconds = timed(lambda: [step() for _ in range(args.steps)], device)
    tokens = visual_tokenizer.grid_size**2
    vit = count(visual_tokenizer.backbone)
    flops = args.steps * batch * tokens * (6 * vit + 2 * count(teacher.vision))
    numbers: dict[str, Any] = {
        "steps": args.steps,
        "batch_size": batch,
        "image_size": size,
        "tokens_per_image": tokens,
        "vit_parameters": vit,
        "trainable_parameters": count(visual_tokenizer, trainable_only=True),
        "gradient_checkpointing": config.tokenizer.backbone.gradient_checkpointing,
        "loss_terms": "reconstruction (mse + l1), semantic tap + pooled distillation, commitment",
        "losses": losses,
        "steps_per_s": args.steps / seconds,
        "images_per_s": args.steps * batch / seconds,
        "tokens_per_s": args.steps * batch * tokens / seconds,
        "model_flops": flops,
        "flops_counted": "6 x ViT parameters x tokens (trained) + 2 x teacher ViT parameters x tokens "
        "(its forward); the pixel decoder and quantizers are left out, so the MFU is a lower bound",
        "peak_memory_gb": peak_memory_gb(device),
    }
    numbers["achieved_flops_per_s"] = flops / seconds
    logger.info("stage 1: %.2f steps/s, %.1f images/s", numbers["steps_per_s"], numbers["images_per_s"])
    engine = optimizer = teacher = None  # the optimizer state goes before the inference checks
    free(device)
    visual_tokenizer.eval()
    with torch.no_grad():
        reset_peak(device)
        timed(lambda: visual_tokenizer.decode(visual_tokenizer.encode(images).pixel_codes), device)  # warm-up
        _, seconds = timed(lambda: visual_tokenizer.decode(visual_tokenizer.encode(images).pixel_codes), device)
    numbers["reconstruct"] = {
        "batch_size": batch,
        "images_per_s": batch / seconds,
        "peak_memory_gb": peak_memory_gb(device),
    }
    logger.info("reconstruct: %.1f images/s", numbers["reconstruct"]["images_per_s"])
    return visual_tokenizer, numbers


# ----------------------------------------------------------------------------- the LLM stage
def word_tokenizer(size: int, template: ChatTemplate) -> Any:
    """A ``size``-entry word-level text tokenizer (no download): the chat template's markers, the
    words of the prompts used here, then filler words; it has the real one's vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    markers = sorted(set(TINY_CHAT_TOKENS) | {"<|im_start|>", "<|im_end|>"})
    words = ["<unk>", "<pad>", *markers, *dict.fromkeys(f"{CAPTION} {QUESTION} user assistant system".split())]
    vocab = {word: index for index, word in enumerate(words)}
    vocab.update({f"w{index}": index for index in range(len(vocab), size)})
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    text_tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", pad_token="<pad>")
    text_tokenizer.add_special_tokens({"additional_special_tokens": markers})
    return text_tokenizer


def build_mllm(
    args: argparse.Namespace, config: MLLMStageConfig, visual_tokenizer: DualTokenizer, device: torch.device
) -> tuple[DualTokenMLLMForCausalLM, Any, str]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_config = config.model
    template = QWEN_TEMPLATE if model_config.chat_template == "qwen" else ChatTemplate()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attn = pick_attn_implementation(model_config.attn_implementation, device, dtype)
    if args.llm:
        text_tokenizer = AutoTokenizer.from_pretrained(args.llm)
        llm = AutoModelForCausalLM.from_pretrained(args.llm, attn_implementation=attn).to(device)
    else:
        size = model_config.sentencepiece_vocab if args.tiny else QWEN2_5_TEXT_TOKENS
        text_tokenizer = word_tokenizer(size, template)
        payload = dict(model_config.llm_config)
        payload.setdefault("vocab_size", len(text_tokenizer))
        with device:
            llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**payload), attn_implementation=attn)
    semantic, pixel = visual_tokenizer.config.semantic_quantizer, visual_tokenizer.config.pixel_quantizer
    layout = extend_tokenizer(text_tokenizer, semantic.codebook_size, pixel.codebook_size)
    grid = visual_tokenizer.grid_size
    model = DualTokenMLLMForCausalLM.from_llm(
        llm,
        layout,
        semantic_depth=semantic.depth,
        pixel_depth=pixel.depth,
        grid_size=(grid, grid),
        **model_config.model_options(),
        chat_template=template.to_dict(),
        attn_implementation=attn,
    )
    if model_config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to(device), text_tokenizer, attn


def mllm_batches(builder: SequenceBuilder, visual_tokenizer: DualTokenizer, batch: int, pad_id: int) -> list[dict]:
    """A text-to-image batch and a VQA batch (one source per step, as the stage's sampler draws)."""
    grid = visual_tokenizer.grid_size
    semantic_config, pixel_config = visual_tokenizer.config.semantic_quantizer, visual_tokenizer.config.pixel_quantizer
    generator = torch.Generator().manual_seed(0)

    def codes(config: Any) -> torch.Tensor:
        return torch.randint(0, config.codebook_size, (grid, grid, config.depth), generator=generator)

    t2i = [builder.generation(CAPTION, codes(pixel_config), codes(semantic_config)) for _ in range(batch)]
    vqa = [
        builder.conversation(
            [("user", f"<image>\n{QUESTION}"), ("assistant", CAPTION)],
            semantic=codes(semantic_config),
            pixel=codes(pixel_config),
        )
        for _ in range(batch)
    ]
    return [collate_sequences(t2i, pad_id), collate_sequences(vqa, pad_id)]


def train_mllm(
    args: argparse.Namespace,
    visual_tokenizer: DualTokenizer,
    device: torch.device,
    ds: DeepSpeedConfig,
    precision: str,
    world: int,
) -> tuple[DualTokenMLLMForCausalLM, Any, dict[str, Any]]:
    config = load_config(
        MLLMStageConfig, REPO / (TINY if args.tiny else PAPER)["stage"], TINY_STAGE if args.tiny else []
    )
    model, text_tokenizer, attn = build_mllm(args, config, visual_tokenizer, device)
    builder = SequenceBuilder.for_model(text_tokenizer, model.config, config.model.max_length or None)
    pad_id = text_tokenizer.pad_token_id if text_tokenizer.pad_token_id is not None else 0
    batch = 4 if args.tiny else config.loop.batch_size
    batches = mllm_batches(builder, visual_tokenizer, batch, pad_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    engine = distributed.TrainEngine(model, optimizer, None, 1.0, ds, batch, precision, world)
    stage = config.stage

    def step(number: int) -> float:
        inputs = {key: value.to(device) for key, value in batches[number % 2].items()}
        with autocast(precision, device):
            out = engine(**inputs, loss_weights=stage.loss_weights)
        engine.backward(out.loss)
        engine.step()
        return float(out.loss.detach())

    engine.train()
    reset_peak(device)
    logger.info("LLM stage: warm-up step at batch %d (%d slots per sequence)", batch, batches[0]["input_ids"].shape[1])
    step(0)
    losses, seconds = timed(lambda: [step(number) for number in range(1, args.steps + 1)], device)
    slots = sum(int(batches[number % 2]["attention_mask"].sum()) for number in range(1, args.steps + 1))
    embedding = model.get_input_embeddings().weight.numel()
    compute = count(model) - embedding  # each slot's embedding is a lookup; the (tied) LM head is counted
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        compute += embedding
    text = model.config.text_config
    numbers: dict[str, Any] = {
        "steps": args.steps,
        "batch_size": batch,
        "slots_per_sequence": {
            "text_to_image": batches[0]["input_ids"].shape[1],
            "vqa": batches[1]["input_ids"].shape[1],
        },
        "hidden_size": text.hidden_size,
        "layers": text.num_hidden_layers,
        "attention_heads": text.num_attention_heads,
        "kv_heads": text.num_key_value_heads,
        "intermediate_size": text.intermediate_size,
        "vocabulary_rows": model.get_output_embeddings().weight.shape[0],
        "parameters": count(model),
        "attention": attn,
        "gradient_checkpointing": config.model.gradient_checkpointing,
        "loss_chunk_size": model.config.loss_chunk_size,
        "losses": losses,
        "steps_per_s": args.steps / seconds,
        "tokens_per_s": slots / seconds,
        "model_flops": 6 * compute * slots,
        "flops_counted": "6 x parameters x slots (embedding lookups excluded, attention scores excluded)",
        "peak_memory_gb": peak_memory_gb(device),
    }
    numbers["achieved_flops_per_s"] = numbers["model_flops"] / seconds
    logger.info("LLM stage: %.2f steps/s, %.0f tokens/s", numbers["steps_per_s"], numbers["tokens_per_s"])
    model = engine.module
    engine = optimizer = None
    free(device)
    return model, text_tokenizer, numbers


def inference(
    args: argparse.Namespace,
    model: DualTokenMLLMForCausalLM,
    text_tokenizer: Any,
    visual_tokenizer: DualTokenizer,
    device: torch.device,
) -> dict[str, Any]:
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    pipeline = Pipeline(model, text_tokenizer, visual_tokenizer)
    size = visual_tokenizer.config.backbone.image_size
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    reset_peak(device)
    logger.info("answer: %d new tokens", args.max_new_tokens)
    pipeline.answer(image, QUESTION, max_new_tokens=args.max_new_tokens)  # warm-up
    _, seconds = timed(
        lambda: [pipeline.answer(image, QUESTION, max_new_tokens=args.max_new_tokens) for _ in range(3)], device
    )
    slots = visual_tokenizer.grid_size**2
    numbers: dict[str, Any] = {
        "answer_latency_s": seconds / 3,
        "answer_max_new_tokens": args.max_new_tokens,
        "answer_note": "up to answer_max_new_tokens: random weights may stop early at the end marker",
        "image_slots": slots,
        "image_sampling": {"cfg": pipeline.sampling.cfg, "kv_cache": True},
        "slot_loop_host_syncs": slot_loop_syncs(pipeline, device),
        "seconds_per_generated_image": {},
    }
    compile_mode = {"auto": "reduce-overhead" if device.type == "cuda" else None, "none": None}.get(
        args.compile, args.compile
    )
    variants = {"eager": pipeline}
    if compile_mode is not None:
        variants[f"compiled ({compile_mode})"] = Pipeline(model, text_tokenizer, visual_tokenizer, compile=compile_mode)
    for name, variant in variants.items():
        seconds_per_image = numbers["seconds_per_generated_image"].setdefault(name, {})
        for batch in args.image_batches:
            logger.info("generate, %s: %d image(s) of %d slots (a warm-up call first)", name, batch, slots)
            _, warm_up = timed(lambda batch=batch, variant=variant: variant.generate(CAPTION, n=batch, seed=0), device)
            images, seconds = timed(
                lambda batch=batch, variant=variant: variant.generate(CAPTION, n=batch, seed=0), device
            )
            assert len(images) == batch and images[0].shape == (size, size, 3)
            seconds_per_image[f"batch_{batch}"] = seconds / batch
            seconds_per_image[f"batch_{batch}_warm_up_s"] = warm_up
    numbers["bandwidth_bound"] = bandwidth_bound(model, slots, device, args.tiny)
    bound = numbers["bandwidth_bound"]["seconds_per_image"]
    if 1 in args.image_batches:
        numbers["batch_1_over_bound"] = {
            name: times["batch_1"] / bound for name, times in numbers["seconds_per_generated_image"].items()
        }
    numbers["peak_memory_gb"] = peak_memory_gb(device)
    return numbers


def slot_loop_syncs(pipeline: Pipeline, device: torch.device) -> str:
    """One batch-1 image with the slot loop under ``torch.cuda.set_sync_debug_mode("error")``:
    ``"none"`` when no device-to-host synchronisation happened in it, else the error."""
    if device.type != "cuda":
        return "not checked (no CUDA device; tests/mllm/test_sampling.py counts host reads on the CPU)"
    builder = pipeline.builder
    generator = [torch.Generator(device=device).manual_seed(0)]
    try:
        with autocast(device):
            generate_image_codes(
                pipeline.model,
                [builder.generation(CAPTION, train=False)],
                builder.generation("", train=False),
                pipeline.sampling.cfg,
                pipeline.sampling,
                pipeline.pad_id,
                generator,
                forbid_syncs=True,
            )
    except RuntimeError as error:
        return f"synchronised: {error}"
    return "none"


def bandwidth_bound(model: DualTokenMLLMForCausalLM, slots: int, device: torch.device, tiny: bool) -> dict[str, Any]:
    """The memory-bandwidth limit of one image at batch 1: every weight an image slot uses (all
    parameters but the embedding rows, of which a slot reads a few) read once per slot, at the
    device's measured copy bandwidth (a large tensor copied; read + write bytes / seconds)."""
    embedding = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in embedding)
    elements = (64 if tiny else 2048) * 2**20 // 4
    source = torch.empty(elements, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up
    _, seconds = timed(lambda: [target.copy_(source) for _ in range(10)], device)
    bandwidth = 10 * 2 * source.numel() * source.element_size() / seconds
    source = target = None  # the buffers go before the next measurement
    free(device)
    return {
        "weight_bytes_per_slot": weight_bytes,
        "measured_copy_bandwidth_bytes_per_s": bandwidth,
        "seconds_per_image": slots * weight_bytes / bandwidth,
    }


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    ds, zero = deepspeed_config(args)
    logger.info("device %s, %s shapes, DeepSpeed: %s", device, "tiny" if args.tiny else "paper", zero)
    dist_state = distributed.init_distributed(ds.enabled, device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    torch.manual_seed(0)
    flops, flops_note = peak_flops(device)
    report: dict[str, Any] = {
        "shapes": "tiny" if args.tiny else "paper",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "zero": zero,
        "precision": precision,
        "peak_flops_per_card": flops,
        "peak_flops_assumed": flops_note,
        "weights": {"tokenizer": args.teacher or "random", "llm": args.llm or "random"},
        "peak_memory": "torch.cuda.max_memory_allocated per phase" if device.type == "cuda" else "process peak RSS",
    }
    try:
        visual_tokenizer, report["tokenizer_stage1"] = train_tokenizer(
            args, device, ds, precision, dist_state.world_size
        )
        model, text_tokenizer, report["mllm_stage"] = train_mllm(
            args, visual_tokenizer, device, ds, precision, dist_state.world_size
        )
        report["inference"] = inference(args, model, text_tokenizer, visual_tokenizer, device)
    finally:
        distributed.cleanup_distributed()
    for stage in ("tokenizer_stage1", "mllm_stage"):
        numbers = report[stage]
        numbers["mfu"] = numbers["achieved_flops_per_s"] / flops if flops else None
    report["wall_s"] = time.perf_counter() - started
    path = out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=2))
    logger.info("wrote %s (%.0f s)", path, report["wall_s"])
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
