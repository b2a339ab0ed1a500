"""Can a trained tiny model tell *where* an object is? Four measurements on held-out Shapes scenes.

1. Accuracy of the absolute position questions ("which side is the X on?", "is the X at the top
   or the bottom?") by the number of objects in the scene. Answered by comparing the logits of
   the two possible answers after the one-question prompt, so every question gets a verdict.
2. Where the answer looks: on one-object scenes, the share of each layer's and head's attention
   (from the last prompt position, over the image slots) that falls on the object's slots,
   divided by the slots' share of the image (1 = uniform; a head that finds the object scores
   well above 1).
3. Where the model knows it: a linear probe (left vs right, one-object training scenes, 70 % to
   fit and 30 % held out) on the hidden state after every layer, at the position that predicts
   the answer and at the slot under the object's centre.
4. Whether the answer depends on the image's layout at all: the change of the state that
   predicts the answer (relative to its norm) when the code grid is mirrored left to right,
   beside its change when the image is replaced by another scene. A model that reads the image
   as a bag of slots barely moves under the mirror.

    python scripts/vqa_position_diagnosis.py runs/tiny/mllm/understand/model --scenes 150
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm.chat import collate_sequences  # noqa: E402
from mllm.inference import Pipeline  # noqa: E402
from mllm.modeling import DualTokenMLLMForCausalLM  # noqa: E402
from training.data.shapes import ShapesWorld, ShapesWorldConfig, object_coverage  # noqa: E402


def codes_batch(pipe: Pipeline, semantic: torch.Tensor, pixel: torch.Tensor, question: str) -> dict[str, torch.Tensor]:
    seq = pipe.builder.conversation(
        [("user", f"<image>\n{question}")], semantic, pixel, train=False, add_generation_prompt=True
    )
    return collate_sequences([seq], pipe.pad_id)


def prompt_batch(pipe: Pipeline, image: np.ndarray, question: str) -> dict[str, torch.Tensor]:
    semantic, pixel = pipe.encode([image])
    return codes_batch(pipe, semantic[0], pixel[0], question)


def position_accuracy(pipe: Pipeline, world: ShapesWorld, scenes: int) -> dict[str, float]:
    hits: dict[str, list[bool]] = defaultdict(list)
    for index in range(scenes):
        sample = world.sample("test", index)
        for pair in sample.qa:
            if pair.question.startswith("which side"):
                options, form = ("left", "right"), "side"
            elif "top or the bottom" in pair.question:
                options, form = ("top", "bottom"), "top/bottom"
            else:
                continue
            batch = prompt_batch(pipe, sample.image, pair.question)
            with torch.no_grad():
                hidden = pipe.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).hidden_states
                logits = pipe.model.text_logits(hidden[0, -1])
            ids = [pipe.builder.text_ids(option)[0] for option in options]
            hit = options[int(logits[ids].argmax())] == pair.answer
            hits[f"{form}, {len(sample.objects)} object(s)"].append(hit)
            hits["all"].append(hit)
    return {key: float(np.mean(values)) for key, values in sorted(hits.items())}


def attention_on_objects(model_dir: str, pipe: Pipeline, world: ShapesWorld, scenes: int) -> np.ndarray:
    model = DualTokenMLLMForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    grid = model.config.grid_size
    ratios = []
    for index in range(scenes):
        sample = world.sample_single("test", index)
        obj = sample.objects[0]
        size = sample.image.shape[0]
        mask = np.zeros((size, size))
        coverage, (y0, x0) = object_coverage(obj, size)
        mask[y0 : y0 + coverage.shape[0], x0 : x0 + coverage.shape[1]] = coverage > 0.5
        cell = (size // grid[0], size // grid[1])
        on_object = torch.from_numpy(mask.reshape(grid[0], cell[0], grid[1], cell[1]).mean(axis=(1, 3)).flatten() > 0.3)
        if not bool(on_object.any()):  # an object that fills no cell to 30 % (coarse grids) is skipped
            continue
        batch = prompt_batch(pipe, sample.image, f"which side is the {obj.colour} {obj.shape} on?")
        slots = model.image_slot_index(batch["input_ids"])[0] >= 0
        with torch.no_grad():
            embeds = model.embed_slots(batch["input_ids"])
            out = model.llm.get_decoder()(
                inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_attentions=True
            )
        per_layer = []
        for attention in out.attentions:  # (1, heads, L, L)
            image = attention[0, :, -1][:, slots]
            per_layer.append((image[:, on_object].sum(-1) / image.sum(-1)).numpy() / float(on_object.float().mean()))
        ratios.append(np.stack(per_layer))
    if not ratios:
        raise SystemExit(f"none of the first {scenes} one-object test scenes has an object filling a grid cell")
    return np.stack(ratios).mean(axis=0)


def _probe_accuracy(features: torch.Tensor, labels: torch.Tensor, fit: torch.Tensor) -> float:
    """Held-out accuracy of an L2-regularised logistic regression fitted on the ``fit`` rows."""
    features = (features - features[fit].mean(0)) / (features[fit].std(0) + 1e-6)
    weight = torch.zeros(features.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.01)
    for _ in range(300):
        optimizer.zero_grad()
        logits = features[fit] @ weight + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[fit]) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = (features[~fit] @ weight + bias) > 0
    return float((predicted == labels[~fit].bool()).float().mean())


def side_probes(pipe: Pipeline, world: ShapesWorld, scenes: int) -> dict[str, list[float]]:
    model = pipe.model
    grid = model.config.grid_size
    answer_states, slot_states, labels = [], [], []
    for index in range(scenes):
        sample = world.sample_single("train", index)
        obj = sample.objects[0]
        if abs(obj.center[0] - 0.5) < 0.1:  # no "which side" question is asked this close to the middle
            continue
        batch = prompt_batch(pipe, sample.image, f"which side is the {obj.colour} {obj.shape} on?")
        slots = (model.image_slot_index(batch["input_ids"])[0] >= 0).nonzero()[:, 0]
        row = min(int(obj.center[1] * grid[0]), grid[0] - 1)
        col = min(int(obj.center[0] * grid[1]), grid[1] - 1)
        with torch.no_grad():
            embeds = model.embed_slots(batch["input_ids"])
            out = model.llm.get_decoder()(
                inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_hidden_states=True
            )
        answer_states.append(torch.stack([hidden[0, -1] for hidden in out.hidden_states]))
        slot_states.append(torch.stack([hidden[0, slots[row * grid[1] + col]] for hidden in out.hidden_states]))
        labels.append(float(obj.center[0] > 0.5))
    target = torch.tensor(labels)
    fit = torch.arange(len(labels)) < int(0.7 * len(labels))
    result = {}
    for name, states in (("answer position", answer_states), ("object-centre slot", slot_states)):
        stacked = torch.stack(states).float()  # (scenes, layers + 1, hidden)
        result[name] = [_probe_accuracy(stacked[:, layer], target, fit) for layer in range(stacked.shape[1])]
    result["scenes (fit / held out)"] = [float(fit.sum()), float((~fit).sum())]
    return result


def mirror_sensitivity(pipe: Pipeline, world: ShapesWorld, scenes: int) -> dict[str, float]:
    def answer_state(semantic: torch.Tensor, pixel: torch.Tensor, question: str) -> torch.Tensor:
        batch = codes_batch(pipe, semantic, pixel, question)
        with torch.no_grad():
            return pipe.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).hidden_states[0, -1]

    mirrored, replaced = [], []
    for index in range(scenes):
        sample, other = world.sample_single("test", index), world.sample_single("test", index + scenes)
        obj = sample.objects[0]
        question = f"which side is the {obj.colour} {obj.shape} on?"
        semantic, pixel = pipe.encode([sample.image, other.image])
        state = answer_state(semantic[0], pixel[0], question)
        flipped = answer_state(semantic[0].flip(1), pixel[0].flip(1), question)
        swapped = answer_state(semantic[1], pixel[1], question)
        mirrored.append(float((flipped - state).norm() / state.norm()))
        replaced.append(float((swapped - state).norm() / state.norm()))
    return {"code grid mirrored": float(np.median(mirrored)), "another scene": float(np.median(replaced))}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a trained model folder (a stage's model/)")
    parser.add_argument("--scenes", type=int, default=150, help="test scenes for each measurement")
    parser.add_argument("--probe-scenes", type=int, default=400, help="one-object training scenes for the probes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.model)
    world = ShapesWorld(ShapesWorldConfig(image_size=pipe.visual_tokenizer.backbone.image_size))
    found: dict[str, object] = {"accuracy": position_accuracy(pipe, world, args.scenes)}
    print("absolute position questions, accuracy:")
    for key, value in found["accuracy"].items():
        print(f"  {key:28s} {value:.3f}")
    found["attention"] = attention_on_objects(args.model, pipe, world, args.scenes // 2)
    print("attention on the object's slots / their share of the image (rows: layers, columns: heads):")
    print(np.array2string(found["attention"], precision=2))
    found["probes"] = side_probes(pipe, world, args.probe_scenes)
    print("left/right linear probe, held-out accuracy after the input embedding and each layer:")
    for key, values in found["probes"].items():
        print(f"  {key:24s} " + " ".join(f"{value:.3f}" for value in values))
    found["mirror"] = mirror_sensitivity(pipe, world, args.scenes // 3)
    print("median change of the answer state / its norm, one-object test scenes:")
    for key, value in found["mirror"].items():
        print(f"  {key:24s} {value:.4f}")
    return found


if __name__ == "__main__":
    main()
