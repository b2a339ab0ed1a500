"""Where does a trained model look when it answers, and how well does it answer? A validation report.

For the first 64 validation conversations whose answers carry boxes (the Shapes writer adds
the objects each answer is about), prints the attention mass that each decoder layer puts on
those objects' slots from the position that predicts the answer (head 0 alone, and the mean
over heads), the teacher-forced answer loss, and then greedy VQA accuracy per question kind
on the first ``--questions`` validation questions (each asked on its own with the image).

    python scripts/grounding_report.py runs/tiny/mllm/understand/model \\
        --conversations runs/tiny/data/val/llava.json --codes runs/tiny/data/val/codes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm.chat import SequenceBuilder, collate_sequences  # noqa: E402
from mllm.model_folder import load_model_folder  # noqa: E402
from training.data.code_store import CodeStore  # noqa: E402
from training.data.conversations import read_conversations  # noqa: E402
from training.mllm_data import grounded_sequences  # noqa: E402
from training.train_mllm import vqa_accuracy  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a trained stage's model folder")
    parser.add_argument("--conversations", required=True, help="validation LLaVA JSON with boxes")
    parser.add_argument("--codes", required=True, help="the validation images' code shards")
    parser.add_argument("--questions", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, text_tokenizer, _ = load_model_folder(args.model, "sdpa")
    model.eval()
    builder = SequenceBuilder.for_model(text_tokenizer, model.config)
    store = CodeStore(args.codes)
    records = read_conversations(args.conversations)
    grounded = grounded_sequences(builder, store, records)
    if not grounded:
        raise SystemExit(
            f"{args.conversations}: no answer has 'boxes'; write it with `dualtoken make-data`, whose answers carry them"
        )
    batch = collate_sequences(grounded, text_tokenizer.pad_token_id or 0)
    text = model.config.text_config
    report: dict[str, float] = {}
    with torch.no_grad():
        for layer in range(text.num_hidden_layers):
            for heads, name in ((1, "head0"), (text.num_attention_heads, "mean_of_heads")):
                out = model(**batch, grounding_layer=layer, grounding_heads=heads)
                report[f"mass_layer{layer}_{name}"] = out.losses["grounding_mass"].item()
        report["val_answer_loss"] = out.losses["text"].item()
    report.update(vqa_accuracy(model, builder, store, text_tokenizer, records, args.questions))
    print(json.dumps({key: round(value, 4) for key, value in report.items()}, indent=1))
    return report


if __name__ == "__main__":
    main()
