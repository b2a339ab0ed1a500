"""Image sampling speed of this tree against an earlier commit's code, model and sampler both.

``test_bench_sampling.py`` times the previous sampler on today's model code, which already has
the model-side speed-ups made for the current sampler (a per-device sine-cosine table, no host
check of the drawn mask or of the id range per step). This script times what users of an earlier
commit ran: ``git worktree add`` checks out ``--base`` (default d2faa7b, the commit before the
device-resident sampler) in a temporary folder, removed at the end; one model folder and one
visual tokenizer are written once (configs/mllm/tiny.yaml shapes, random init, seed 0, as
``test_bench_mllm.build_tiny_model`` builds it; configs/tokenizer/tiny.yaml for the tokenizer),
and both trees load them with their own ``Pipeline.from_pretrained``. With ``--compile MODE``
this tree's process also times a second pipeline loaded with ``compile=MODE`` (its first call,
which compiles, is reported as its warm-up time).

Each round starts one timing process per tree (which goes first alternates by round). A process
loads the pipeline, warms up, then times ``Pipeline.generate_codes`` (CFG 3, temperature 1,
seeds 0..B-1, Shapes captions) at each batch size, and prints JSON: per-image process CPU time
and wall time, a hash of the weights it loaded and of the codes it drew. The parent checks that
both trees loaded the same weights and drew the same codes, and reports the medians and the
median of the per-round paired ratios (base / this tree: above 1 means this tree is faster).

    .venv/bin/python tests/benchmarks/compare_with_commit.py [--base REV] [--rounds 5] [--threads 1] [--compile default]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_BASE = "d2faa7b"
CFG_SCALE = 3.0
TEMPERATURE = 1.0


def _tensor_hash(tensors) -> str:
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------- child: one tree, one process
def child(args: argparse.Namespace) -> None:
    """Run in ``args.tree`` with that tree's packages first on the path; prints one JSON line."""
    sys.path.insert(0, args.tree)
    import torch

    import mllm
    from mllm.inference import Pipeline

    torch.set_num_threads(args.threads)
    if not pathlib.Path(mllm.__file__).resolve().is_relative_to(pathlib.Path(args.tree).resolve()):
        raise SystemExit(f"mllm imported from {mllm.__file__}, not from {args.tree}")
    pipes = {"": Pipeline.from_pretrained(args.model, visual_tokenizer_path=args.visual_tokenizer, device="cpu")}
    if args.compile:
        pipes["/compiled"] = Pipeline.from_pretrained(
            args.model, visual_tokenizer_path=args.visual_tokenizer, device="cpu", compile=args.compile
        )
    weights = _tensor_hash(sorted(pipes[""].model.state_dict().items()))
    captions = json.loads(args.captions)
    report = {"weights": weights, "torch": torch.__version__, "threads": torch.get_num_threads(), "cases": {}}
    report["warmup_s"] = {}
    for variant, pipe in pipes.items():

        def draw(batch_size: int, pipe=pipe) -> torch.Tensor:
            return pipe.generate_codes(captions[:batch_size], cfg=CFG_SCALE, temperature=TEMPERATURE, seed=0)

        for batch_size in args.batch_sizes:
            start = time.perf_counter()
            draw(batch_size)  # warm-up (and compilation)
            report["warmup_s"][f"{batch_size}{variant}"] = time.perf_counter() - start
        for batch_size in args.batch_sizes:
            cpu, wall, codes = [], [], None
            for _ in range(args.repeats):
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                codes = draw(batch_size)
                cpu.append((time.process_time() - start_cpu) / batch_size)
                wall.append((time.perf_counter() - start_wall) / batch_size)
            report["cases"][f"{batch_size}{variant}"] = {
                "cpu": min(cpu),
                "wall": min(wall),
                "codes": _tensor_hash([("codes", codes)]),
                "shape": list(codes.shape),
            }
    print(json.dumps(report))


# ---------------------------------------------------------------------------- parent
def build_model_folder(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, list[str]]:
    """The tiny model folder and visual tokenizer under ``root``, and 8+ Shapes captions."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests" / "benchmarks"))
    import torch
    from test_bench_mllm import TINY_TOKENIZER, build_tiny_model

    from tokenizer.config import DualTokenizerConfig, config_from_dict
    from tokenizer.model import DualTokenizer
    from training.config import read_yaml
    from training.data.shapes import ShapesWorld, ShapesWorldConfig
    from training.mllm_model import save_model_folder

    visual_dir = root / "visual_tokenizer"
    torch.manual_seed(0)
    config = config_from_dict(DualTokenizerConfig, read_yaml(TINY_TOKENIZER)["tokenizer"], "tokenizer")
    DualTokenizer(config).eval().save_pretrained(visual_dir)
    model, builder = build_tiny_model("cpu")
    model_dir = root / "model"
    save_model_folder(model, builder.text_tokenizer, model_dir, {"tokenizer_path": str(visual_dir)}, {})
    world = ShapesWorld(ShapesWorldConfig())
    captions = [world.sample("val", index).caption for index in range(16)]
    return model_dir, visual_dir, captions


def run_child(tree: pathlib.Path, args: argparse.Namespace, model_dir, visual_dir, captions) -> dict:
    command = [
        sys.executable,
        str(pathlib.Path(__file__).resolve()),
        "--child",
        "--tree",
        str(tree),
        "--model",
        str(model_dir),
        "--visual-tokenizer",
        str(visual_dir),
        "--captions",
        json.dumps(captions),
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--batch-sizes",
        *map(str, args.batch_sizes),
    ]
    if args.compile and tree == REPO:
        command += ["--compile", args.compile]
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"timing process in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=DEFAULT_BASE, help="the earlier commit to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per batch size in each process (best)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in each timing process")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--compile", metavar="MODE", help="also time this tree with Pipeline(compile=MODE)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--visual-tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--captions", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return {}
    if max(args.batch_sizes) > 16 or min(args.batch_sizes) < 1:
        raise SystemExit(f"--batch-sizes {args.batch_sizes}: expected sizes from 1 to 16")
    resolved = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{args.base}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if resolved.returncode != 0:
        raise SystemExit(f"--base {args.base}: not a commit of {REPO}")
    base_commit = resolved.stdout.strip()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    with tempfile.TemporaryDirectory(prefix="dualtoken-compare-") as temp:
        root = pathlib.Path(temp)
        base_tree = root / "base"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(base_tree), base_commit], check=True
        )
        try:
            model_dir, visual_dir, captions = build_model_folder(root)
            trees = {"base": base_tree, "this tree": REPO}
            load_before = _load()
            results = {name: [] for name in trees}
            for round_index in range(args.rounds):
                order = ["this tree", "base"] if round_index % 2 == 0 else ["base", "this tree"]
                for name in order:
                    results[name].append(run_child(trees[name], args, model_dir, visual_dir, captions))
                print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)], check=False)
    return report(args, base_commit, head.stdout.strip(), results, load_before)


def report(args, base_commit: str, head: str, results: dict, load_before: str) -> dict:
    weights = {result["weights"] for runs in results.values() for result in runs}
    if len(weights) != 1:
        raise SystemExit(f"the two trees loaded different weights: {sorted(weights)}")
    rows = []
    for variant in ["", "/compiled"] if args.compile else [""]:
        for batch_size in map(str, args.batch_sizes):
            codes = {
                name: {run["cases"][batch_size + (variant if name == "this tree" else "")]["codes"] for run in runs}
                for name, runs in results.items()
            }
            same = len(codes["base"] | codes["this tree"]) == 1
            row = {"batch_size": int(batch_size), "variant": variant.strip("/") or "eager", "same_codes": same}
            row["warmup_s"] = statistics.median(run["warmup_s"][batch_size + variant] for run in results["this tree"])
            for clock in ("cpu", "wall"):
                new = [run["cases"][batch_size + variant][clock] for run in results["this tree"]]
                old = [run["cases"][batch_size][clock] for run in results["base"]]
                ratios = [slow / quick for quick, slow in zip(new, old, strict=True)]
                row[clock] = {
                    "new_ms": 1000 * statistics.median(new),
                    "base_ms": 1000 * statistics.median(old),
                    "ratio": statistics.median(ratios),
                    "range": (min(ratios), max(ratios)),
                }
            rows.append(row)
    first = results["this tree"][0]
    print(
        f"\nconfigs/mllm/tiny.yaml model (random init, seed 0), CPU, {first['threads']} torch thread(s), "
        f"torch {first['torch']}; base {base_commit[:7]} vs this tree (HEAD {head} + working tree); "
        f"{args.rounds} rounds, one process per tree per round, best of {args.repeats} calls each; "
        f"load average {load_before} before, {_load()} after; weights hash {weights.pop()} in both\n"
    )
    print(
        "| batch | this tree | clock | this tree (ms/image) | base (ms/image) | speed-up | range | same codes | warm-up (s) |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---|---:|")
    for row in rows:
        for clock in ("cpu", "wall"):
            cell = row[clock]
            low, high = cell["range"]
            print(
                f"| {row['batch_size']} | {row['variant']} | {'process CPU' if clock == 'cpu' else 'wall'} | "
                f"{cell['new_ms']:.1f} | {cell['base_ms']:.1f} | {cell['ratio']:.2f}x | {low:.2f}-{high:.2f}x | "
                f"{'yes' if row['same_codes'] else 'NO'} | {row['warmup_s']:.1f} |"
            )
    if not all(row["same_codes"] for row in rows):
        raise SystemExit("the two trees drew different codes at the same seeds")
    return {"rows": rows}


if __name__ == "__main__":
    main()
