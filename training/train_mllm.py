"""LLM stages: train the unified model on pre-tokenised codes (docs/training.md, "The stages").

A stage is data (``configs/stages/*.yaml``): which parameters train (globs over parameter
names), the learning rate, the data mix and the loss weights. The paper's four stages are
align (visual embeddings / projector on captions), understand (+ the LLM on VQA),
generate (the depth head on text-image pairs, LLM frozen) and joint (everything, a mix).
Each stage starts from the previous stage's model folder (``stage.init``) or, for the
first, builds one from ``model`` (a base LM from a config or ``from_pretrained``, a text
tokenizer, and the code shards' layout).

    dualtoken train-mllm --config configs/stages/tiny/understand.yaml
    torchrun --nproc_per_node 8 -m training.train_mllm --config configs/stages/qwen2_5_3b/understand.yaml

The model folder a stage writes (``<output_dir>/model``) holds the model (safetensors), the
extended text tokenizer, and ``dualtoken.json`` (the DualToken tokenizer's path for decoding;
:mod:`mllm.model_folder`). This module is the loop (:class:`MLLMStageTrainer`) and its held-out
VQA score; the config is :mod:`training.mllm_config`, the data :mod:`training.mllm_data`, the
model's construction and folder :mod:`training.mllm_model`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mllm.chat import ConversationError, Sequence, SequenceBuilder, collate_sequences
from mllm.generation import generate_text
from mllm.model_folder import load_model_folder
from mllm.modeling import DualTokenMLLMForCausalLM
from tokenizer.config import ConfigError
from training import checkpointing, distributed
from training.common import (
    MetricsWriter,
    autocast,
    build_optimizer,
    count_parameters,
    format_metrics,
    restore_schedule_lr,
    resumable_loader,
    seed_everything,
    setup_logging,
    steps_of,
    warmup_cosine,
)
from training.config import load_config
from training.data.code_shards import normalise_key
from training.data.code_store import CodeStore
from training.mllm_config import MLLMStageConfig
from training.mllm_data import (
    MixedSequences,
    MixtureSampler,
    check_images_tokenised,
    drop_skipped_images,
    fit_to_context,
    grounded_sequences,
    read_sources,
    record_codes,
)
from training.mllm_model import apply_lora, build_model, save_model_folder, select_trainable

logger = logging.getLogger(__name__)

MODEL_DIRNAME = "model"


def vqa_accuracy(
    model: DualTokenMLLMForCausalLM,
    builder: SequenceBuilder,
    store: CodeStore,
    text_tokenizer: Any,
    conversations: list[Any],
    limit: int,
    batch_size: int = 32,
    max_new_tokens: int = 8,
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers to single questions, overall and per question kind.

    Every (question, answer) pair of the first records is asked on its own with the image.
    """
    questions: list[tuple[Sequence, str, str]] = []
    for record in conversations:
        kinds = record.meta.get("kinds") or []
        user_turns = [t for t in record.turns if t.role == "user"]
        answers = [t for t in record.turns if t.role == "assistant"]
        for number, (question, answer) in enumerate(zip(user_turns, answers, strict=False)):
            text = question.text.replace("<image>", "").strip()
            prompt = builder.conversation(
                [("user", f"<image>\n{text}")],
                *record_codes(store, record),
                train=False,
                add_generation_prompt=True,
            )
            kind = kinds[number] if number < len(kinds) else "all"
            questions.append((prompt, answer.text.strip(), kind))
            if len(questions) >= limit:
                break
        if len(questions) >= limit:
            break
    end_ids = tuple(builder.text_ids(builder.template.end))
    stop = (end_ids[0],) if end_ids else ()
    correct: dict[str, list[int]] = defaultdict(list)
    was_training = model.training
    model.eval()
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        outputs = generate_text(model, [q[0] for q in chunk], max_new_tokens, stop_ids=stop)
        for (_, answer, kind), ids in zip(chunk, outputs, strict=True):
            predicted = text_tokenizer.decode(ids, skip_special_tokens=True).strip()
            correct[kind].append(int(predicted == answer))
            correct["all"].append(int(predicted == answer))
    model.train(was_training)
    return {f"vqa_{kind}": float(np.mean(values)) for kind, values in sorted(correct.items())}


class MLLMStageTrainer:
    """One LLM stage: model, engine, mixed data; ``fit`` is the explicit loop."""

    def __init__(self, config: MLLMStageConfig, dist_state: distributed.DistState) -> None:
        self.config = config
        self.dist = dist_state
        self.output_dir = Path(config.loop.output_dir)
        seed_everything(config.loop.seed)
        self.store = CodeStore(config.data.codes)
        stage = config.stage
        if stage.init:
            self.model, self.text_tokenizer, sidecar = load_model_folder(
                stage.init, config.model.attn_implementation, dist_state.device
            )
            self.visual_tokenizer_path = sidecar.get("tokenizer_path")
        else:
            self.model, self.text_tokenizer = build_model(config.model, self.store, dist_state.device)
            self.visual_tokenizer_path = self.store.meta.tokenizer_path
        self._check_layout()
        self._check_grounding()
        if config.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if config.lora.enabled:
            apply_lora(self.model, config.lora)
        names = select_trainable(self.model, stage.trainable, stage.frozen, stage.embedding_rows)
        logger.info(
            "stage %s: %.3fM of %.3fM parameters train (%d tensors)",
            stage.name,
            count_parameters(self.model) / 1e6,
            count_parameters(self.model, trainable_only=False) / 1e6,
            len(names),
        )
        max_length = config.model.max_length or None
        overlong = "truncate" if config.data.overlong == "truncate" else "error"
        self.builder = SequenceBuilder.for_model(self.text_tokenizer, self.model.config, max_length, overlong)
        self.model.to(dist_state.device)
        loop, optim = config.loop, config.optim
        optimizer = build_optimizer([p for p in self.model.parameters() if p.requires_grad], optim, self.model)
        self.engine = distributed.TrainEngine(
            self.model,
            optimizer,
            warmup_cosine(optimizer, optim, loop.max_steps),
            optim.grad_clip,
            config.deepspeed,
            loop.batch_size,
            loop.precision,
            dist_state.world_size,
            loop.grad_accumulation,
        )
        self.engines = {"mllm": self.engine}
        self.writer = MetricsWriter(self.output_dir, enabled=dist_state.is_main)
        conversations, pairs = read_sources(config.data)
        self.val_conversations, self.val_pairs = read_sources(config.data, val=True)
        self.val_store = CodeStore(config.data.val_codes) if config.data.val_codes else self.store
        conversations, pairs = (
            drop_skipped_images(self.store, records, config.data.codes) for records in (conversations, pairs)
        )
        self.val_conversations, self.val_pairs = (
            drop_skipped_images(self.val_store, records, config.data.val_codes)
            for records in (self.val_conversations, self.val_pairs)
        )
        independent = config.data.vqa_turns == "independent"
        conversations, pairs, self.overlong_counts = fit_to_context(
            self.builder, self.store, conversations, pairs, config.data.mix, independent
        )
        self.val_conversations, self.val_pairs, _ = fit_to_context(
            self.builder, self.val_store, self.val_conversations, self.val_pairs, config.data.mix, independent, "val"
        )
        check_images_tokenised(self.store, conversations + pairs, config.data.codes)
        check_images_tokenised(self.val_store, self.val_conversations + self.val_pairs, config.data.val_codes)
        self.dataset = MixedSequences(
            self.builder,
            self.store,
            conversations,
            pairs,
            config.data.mix,
            stage.uncond_prob,
            loop.seed,
            contrast=stage.contrast,
            vqa_turns=config.data.vqa_turns,
            grounding=stage.grounding,
            object_boxes=stage.object_pixel_weight != 1.0,
            image_input_noise=stage.image_input_noise,
        )
        self.pad_id = self.text_tokenizer.pad_token_id if self.text_tokenizer.pad_token_id is not None else 0

    def _check_grounding(self) -> None:
        stage, text = self.config.stage, self.model.config.text_config
        layers, heads = text.num_hidden_layers, text.num_attention_heads
        if stage.grounding_layer is not None and stage.grounding_layer >= layers:
            raise ConfigError(
                f"stage.grounding_layer={stage.grounding_layer}; the LM has decoder layers 0..{layers - 1}"
            )
        if stage.grounding_heads > heads:
            raise ConfigError(f"stage.grounding_heads={stage.grounding_heads}; the LM has {heads} attention heads")

    def _check_layout(self) -> None:
        meta, model_config = self.store.meta, self.model.config
        expected = (meta.semantic_codebook_size, meta.pixel_codebook_size, meta.semantic_depth, meta.pixel_depth)
        found = (
            model_config.semantic_size,
            model_config.pixel_size,
            model_config.semantic_depth,
            model_config.pixel_depth,
        )
        if expected != found:
            raise ConfigError(
                f"data.codes={self.config.data.codes} holds codes (semantic size, pixel size, semantic depth, "
                f"pixel depth) = {expected} but the model was built for {found}"
            )
        weights = self.config.stage.pixel_depth_weights
        written = model_config.pixel_depth if self.model.pixel_head is not None else 1
        if weights is not None and len(weights) != written:
            raise ConfigError(
                f"stage.pixel_depth_weights has {len(weights)} entries; the model writes {written} pixel depth(s)"
            )

    def _collate(self, items: list[Sequence | tuple[Sequence, Sequence]]) -> dict[str, torch.Tensor]:
        """Pad a batch; ``(matched, mismatched)`` items put their mismatched rows after the others
        and list the pairs in ``contrast_rows``."""
        paired = [row for row, item in enumerate(items) if isinstance(item, tuple)]
        rows = [item[0] if isinstance(item, tuple) else item for item in items] + [items[row][1] for row in paired]
        batch = collate_sequences(rows, self.pad_id)
        if paired:
            batch["contrast_rows"] = torch.tensor([[row, len(items) + k] for k, row in enumerate(paired)])
        return batch

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        batch = {key: value.to(self.dist.device) for key, value in batch.items()}
        stage = self.config.stage
        with autocast(self.config.loop.precision, self.dist.device):
            out = self.engine(
                **batch,
                loss_weights=stage.loss_weights,
                contrast_beta=stage.contrast_beta,
                pixel_depth_weights=stage.pixel_depth_weights,
                grounding_layer=stage.grounding_layer,
                grounding_heads=stage.grounding_heads,
                object_pixel_weight=stage.object_pixel_weight,
            )
        self.engine.backward(out.loss)
        grad_norm = self.engine.step()
        record = {"loss": out.loss.item()}
        record.update({name: value.item() for name, value in out.losses.items() if name != "idle_heads"})
        if grad_norm is not None and math.isfinite(grad_norm):
            record["grad_norm"] = grad_norm
        return record

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out losses (one batch per source) and VQA exact-match accuracy by question kind."""
        metrics: dict[str, float] = {}
        model = self.engine.module
        model.eval()
        if self.val_pairs:
            # Each image also under the next pair's caption: the held-out contrast_margin (nats per
            # image) says how much the model's likelihood depends on the caption at all.
            pairs = self.val_pairs[:64]
            items = []
            for pair, other in zip(pairs, pairs[1:] + pairs[:1], strict=True):
                codes = self.val_store.get(normalise_key(pair.image_key))
                matched = self.builder.generation(pair.caption, *codes)
                items.append((matched, self.builder.generation(other.caption, *codes)) if len(pairs) > 1 else matched)
            out = model(**self._to_device(self._collate(items)))
            metrics.update({f"val_t2i_{k}": v.item() for k, v in out.losses.items() if k != "contrast"})
        items = grounded_sequences(
            self.builder, self.val_store, self.val_conversations[:256], self.dataset.independent_turns
        )
        if items:
            # How much the grounding heads look at the objects each answer is about (whether or
            # not this stage trains them to): the mean attention mass on those slots.
            stage = self.config.stage
            out = model(
                **self._to_device(self._collate(items)),
                grounding_layer=stage.grounding_layer,
                grounding_heads=stage.grounding_heads,
            )
            metrics.update(
                {f"val_vqa_{k}": out.losses[k].item() for k in ("text", "grounding_mass") if k in out.losses}
            )
        if self.val_conversations and self.config.eval.vqa_samples > 0:
            metrics.update(
                vqa_accuracy(
                    model,
                    self.builder,
                    self.val_store,
                    self.text_tokenizer,
                    self.val_conversations,
                    self.config.eval.vqa_samples,
                    self.config.eval.batch_size,
                    self.config.eval.max_new_tokens,
                )
            )
        model.train()
        self.writer.scalars(step, metrics, prefix="eval/")
        return metrics

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.dist.device) for key, value in batch.items()}

    def fit(self) -> dict[str, float]:
        loop = self.config.loop
        checkpoints = self.output_dir / "checkpoints"
        start_step = 0
        latest = checkpointing.latest_checkpoint(checkpoints) if loop.resume else None
        if latest is not None:
            start_step = checkpointing.load_checkpoint(latest, self.engines)["step"]
            restore_schedule_lr(self.engine.scheduler)
            logger.info("resumed stage %s from %s (step %d)", self.config.stage.name, latest, start_step)
        sampler = MixtureSampler(
            self.dataset,
            loop.batch_size,
            loop.seed,
            start_step,
            loop.max_steps,
            self.dist.rank,
            self.dist.world_size,
            loop.grad_accumulation,
        )
        loader = resumable_loader(self.dataset, sampler, self._collate, loop.seed, start_step, loop.num_workers)
        step, started, window = start_step, time.time(), []
        self.engine.train()
        progress = tqdm(
            steps_of(loader, loop.grad_accumulation),
            desc=f"LLM stage {self.config.stage.name}",
            initial=start_step,
            total=loop.max_steps,
            disable=not self.dist.is_main,
        )
        for micro_batches in progress:  # a step is one optimizer update: loop.grad_accumulation micro-batches
            window.extend(self.train_step(batch) for batch in micro_batches)
            step += 1
            if step % loop.log_every == 0 or step == loop.max_steps:
                keys = sorted({key for r in window for key in r})
                averaged = {k: float(np.mean([r[k] for r in window if k in r])) for k in keys}
                averaged = distributed.all_reduce_scalars(averaged)
                averaged["lr"] = self.engine.lr
                self.writer.scalars(step, averaged, prefix="train/")
                progress.set_postfix({k: f"{averaged[k]:.3f}" for k in ("text", "pixel") if k in averaged})
                window.clear()
            if step % loop.eval_every == 0 and step < loop.max_steps:
                logger.info("step %d: %s", step, format_metrics(self.evaluate(step)))
            if step % loop.save_every == 0 or step == loop.max_steps:
                checkpointing.save_checkpoint(checkpoints, step, self.engines, {})
                checkpointing.prune_checkpoints(checkpoints)
        return self.finish(step, time.time() - started)

    def finish(self, step: int, train_seconds: float) -> dict[str, float]:
        metrics = self.evaluate(step)
        metrics.update(train_seconds=train_seconds, steps=float(step))
        metrics.update({name: float(count) for name, count in self.overlong_counts.items()})
        metrics["trainable_parameters"] = float(self.engine.parameter_count(trainable_only=True))
        state_dict = self.engine.full_state_dict()  # collective under ZeRO-3: every rank calls it
        if self.dist.is_main:
            save_model_folder(
                self.engine.module,
                self.text_tokenizer,
                self.output_dir / MODEL_DIRNAME,
                {
                    "tokenizer_path": self.visual_tokenizer_path,
                    "stage": self.config.stage.name,
                    "config": asdict(self.config),
                    # how the understanding images were made square (tokenize-codes --image-resize)
                    "image_resize": self.store.meta.image_resize,
                },
                metrics,
                state_dict=state_dict,
                merge=self.config.lora.merge_on_save,
                sampling=self.config.sampling,
            )
            (self.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
            self.writer.scalars(step, metrics, prefix="final/")
            logger.info("stage %s done: %s", self.config.stage.name, format_metrics(metrics))
        distributed.barrier()
        self.writer.close()
        return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    import argparse

    from tokenizer.files import check_output_dir

    parser = argparse.ArgumentParser(prog="dualtoken train-mllm", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="stage YAML (configs/stages/*/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    distributed.add_launcher_arguments(parser)
    args = parser.parse_args(argv)
    config = load_config(MLLMStageConfig, args.config, args.overrides)
    check_output_dir(config.loop.output_dir, "loop.output_dir")  # before any model is built
    dist_state = distributed.init_distributed(config.deepspeed.enabled, args.device)
    setup_logging(dist_state.rank)
    if config.loop.num_threads:
        torch.set_num_threads(config.loop.num_threads)
    try:
        return MLLMStageTrainer(config, dist_state).fit()
    except ConversationError as error:
        raise ConfigError(str(error)) from error
    finally:
        distributed.cleanup_distributed()


if __name__ == "__main__":
    main()
