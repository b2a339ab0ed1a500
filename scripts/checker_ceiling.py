"""How often does the independent checker pass a tokenizer's own reconstructions? By scene size.

The ceiling of text-to-image on a tokenizer: a generated image passes the checker at most as often
as the decoder draws a real scene of the same kind recognisably. Encodes and decodes one- and
two-object validation scenes (alternately; a three-object draw is skipped) of the default Shapes
world and of the narrower worlds of ``dualtoken tiny-mllm --t2i-world grid`` (at most two
objects, plain backgrounds, objects on the code grid), ``--t2i-world canonical`` (the same
without jitter or noise, on one grey) and ``--t2i-world slots`` (canonical, every object at a
fixed slot), and prints the share that passes.

    python scripts/checker_ceiling.py runs/tiny/stage1/tokenizer --scenes 256
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer.images import uint8_image_to_tensor  # noqa: E402
from tokenizer.model import DualTokenizer  # noqa: E402
from training.data.shapes import ShapesWorld, ShapesWorldConfig  # noqa: E402
from training.evaluation import checker_verdicts  # noqa: E402
from training.tiny_mllm import t2i_world_config  # noqa: E402

WORLDS = ("default", "grid", "canonical", "slots")


def ceiling(visual_tokenizer: DualTokenizer, world: ShapesWorld, scenes: int, split: str = "val") -> dict[str, float]:
    """Checker pass rate on reconstructions of ``scenes`` draws: per object count and over all."""
    passed: dict[int, list[bool]] = {1: [], 2: []}
    for index in tqdm(range(scenes), desc="reconstructions", unit="scene"):
        sample = world.sample(split, index) if index % 2 else world.sample_single(split, index)
        if len(sample.objects) not in passed:
            continue
        with torch.no_grad():
            codes = visual_tokenizer.encode(uint8_image_to_tensor(sample.image)[None]).pixel_codes
            drawn = visual_tokenizer.decode(codes)
        verdict = checker_verdicts(drawn, [[(o.colour, o.shape) for o in sample.objects]])[0]
        passed[len(sample.objects)].append(bool(verdict))
    everything = passed[1] + passed[2]
    result = {f"{count}_objects": sum(v) / max(len(v), 1) for count, v in passed.items()}
    result |= {f"{count}_objects_scenes": float(len(v)) for count, v in passed.items()}
    result["all"] = sum(everything) / max(len(everything), 1)
    return result


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tokenizer", help="a DualToken tokenizer folder")
    parser.add_argument("--scenes", type=int, default=256, help="validation draws per world")
    parser.add_argument("--worlds", nargs="+", choices=WORLDS, default=list(WORLDS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.scenes < 2:
        parser.error(f"--scenes={args.scenes}; expected at least 2 (one-object and two-object draws alternate)")
    torch.set_num_threads(args.threads)
    visual_tokenizer = DualTokenizer.from_pretrained(args.tokenizer).eval()
    size, grid = visual_tokenizer.backbone.image_size, visual_tokenizer.backbone.grid_size
    configs = {name: t2i_world_config(name, 0, size, grid) for name in WORLDS[1:]}
    configs["default"] = ShapesWorldConfig(image_size=size)
    results = {}
    for name in args.worlds:
        results[name] = found = ceiling(visual_tokenizer, ShapesWorld(configs[name]), args.scenes)
        print(
            f"{name:8s} one object {100 * found['1_objects']:5.1f} % of {found['1_objects_scenes']:.0f}, "
            f"two objects {100 * found['2_objects']:5.1f} % of {found['2_objects_scenes']:.0f}, "
            f"all {100 * found['all']:5.1f} %"
        )
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
