"""The paper's central ablation (Table 5) on any stage-1 config, side by side.

    dualtoken ablate --config configs/tokenizer/tiny.yaml --teacher runs/tiny/stage0/teacher

Variants, all from the same teacher, data, steps and seed:
- ``dual``: pixel codes from the shallow tap, semantic codes from the deep tap (DualToken);
- ``shared``: one codebook at the deep tap carries both reconstruction and semantics;
- ``recon_only``: the dual layout trained for reconstruction alone (semantic losses off;
  the semantic codebook still follows its features through the EMA, so its zero-shot
  score shows what reconstruction training alone does to the deep features).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from training import train_tokenizer
from training.common import setup_logging

logger = logging.getLogger(__name__)

VARIANTS: dict[str, list[str]] = {
    "dual": [],
    "shared": ["tokenizer.shared_codebook=true"],
    "recon_only": ["loss.semantic_tap=0", "loss.semantic_pooled=0"],
}

COLUMNS = [
    ("test_psnr", "PSNR (dB)", 1, "{:.2f}"),
    ("test_ssim", "SSIM", 1, "{:.3f}"),
    ("test_zero_shot", "zero-shot (%)", 100, "{:.1f}"),
    ("test_pixel_usage", "pixel usage (%)", 100, "{:.1f}"),
    ("test_semantic_usage", "semantic usage (%)", 100, "{:.1f}"),
]


def table(results: dict[str, dict[str, float]], teacher_zero_shot: float | None) -> str:
    header = "| variant | " + " | ".join(title for _, title, _, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, metrics in results.items():
        cells = [fmt.format(scale * metrics[key]) if key in metrics else "–" for key, _, scale, fmt in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if teacher_zero_shot is not None:
        lines.append(f"\nTeacher zero-shot on the same test images: {100 * teacher_zero_shot:.1f} %")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(prog="dualtoken ablate", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tokenizer/tiny.yaml")
    parser.add_argument("--teacher", required=True, help="stage-0 teacher directory (or a SigLIP checkpoint)")
    parser.add_argument("--output-dir", default="runs/ablation")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    setup_logging()
    output_dir = Path(args.output_dir)
    results: dict[str, dict[str, float]] = {}
    for name in args.variants:
        run_dir = output_dir / name
        metrics_path = run_dir / train_tokenizer.TOKENIZER_DIRNAME / "metrics.json"
        if train_tokenizer.tokenizer_is_complete(run_dir / train_tokenizer.TOKENIZER_DIRNAME):
            logger.info("ablation %s: reusing %s", name, metrics_path)
        else:
            overrides = [f"loop.output_dir={run_dir}", f"teacher_path={args.teacher}", *VARIANTS[name], *args.overrides]
            train_tokenizer.main(["--config", args.config, *[item for o in overrides for item in ("--set", o)]])
        results[name] = json.loads(metrics_path.read_text())
    teacher = next((m["test_teacher_zero_shot"] for m in results.values() if "test_teacher_zero_shot" in m), None)
    text = table(results, teacher)
    (output_dir / "ablation.md").write_text(text)
    (output_dir / "ablation.json").write_text(json.dumps(results, indent=2))
    print(text)
    return results


if __name__ == "__main__":
    main()
