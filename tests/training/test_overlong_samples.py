"""Records longer than the model's context: dropped or cut before training, counted, never a crash."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mllm_fixtures import REPO, stage_overrides

from training import train_mllm

LONG = "red " * 600  # over the tiny LM's context of 512 positions


def _run(overrides: list[str]) -> dict[str, float]:
    argv = ["--config", str(REPO / "configs" / "stages" / "tiny" / "joint.yaml")]
    for override in overrides:
        argv += ["--set", override]
    return train_mllm.main(argv)


def _with_long_records(data: dict[str, Path], folder: Path, keep_originals: bool) -> list[str]:
    """Data files holding (some of) the fixture's records plus overlong ones, and their overrides."""
    folder.mkdir(parents=True, exist_ok=True)
    conversations = json.loads(data["train_llava"].read_text())
    image = conversations[0]["image"]
    long_answer = {  # the image comes first: a cut after it keeps it whole
        "id": "long-answer",
        "image": image,
        "conversations": [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": LONG}],
    }
    long_question = {  # the image comes after the long text: no cut keeps it
        "id": "long-question",
        "image": image,
        "conversations": [{"from": "human", "value": LONG + "<image>"}, {"from": "gpt", "value": "yes"}],
    }
    kept = conversations if keep_originals else []
    (folder / "llava.json").write_text(json.dumps([*kept, long_answer, long_question]))
    pairs = [json.loads(line) for line in data["train_t2i"].read_text().splitlines()]
    pairs.append({"image": pairs[0]["image"], "caption": LONG})  # the generated image comes last: no cut keeps it
    (folder / "t2i.jsonl").write_text("\n".join(json.dumps(pair) for pair in pairs))
    return [
        f"data.conversations=[{folder / 'llava.json'}]",
        f"data.text_image=[{folder / 't2i.jsonl'}]",
        f"data.image_root={data['train_llava'].parent}",
    ]


def test_overlong_records_are_dropped_and_counted(data, tmp_path, caplog):
    out = tmp_path / "run"
    overrides = stage_overrides(data, out) + _with_long_records(data, tmp_path / "files", keep_originals=True)
    with caplog.at_level(logging.WARNING, logger="training.mllm_data"):
        metrics = _run(overrides)
    assert metrics["steps"] == 2
    assert (metrics["overlong_dropped"], metrics["overlong_truncated"]) == (3, 0)
    saved = json.loads((out / "metrics.json").read_text())
    assert (saved["overlong_dropped"], saved["overlong_truncated"]) == (3, 0)
    assert "train data: 3 record(s) longer than the model's context of 512 slots: 3 dropped, 0 truncated" in caplog.text


def test_overlong_records_are_cut_where_the_image_stays_whole(data, tmp_path):
    # Only the two long conversations answer questions: every VQA batch trains on the cut one.
    out = tmp_path / "run"
    overrides = stage_overrides(data, out) + _with_long_records(data, tmp_path / "files", keep_originals=False)
    metrics = _run(overrides + ["data.overlong=truncate", "data.mix={vqa: 1.0, t2i: 1.0}"])
    assert metrics["steps"] == 2
    assert (metrics["overlong_dropped"], metrics["overlong_truncated"]) == (2, 1)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/text" in record for record in records)  # the cut answer was learnt from


def test_overlong_mode_is_checked(data, tmp_path, capsys):
    from training.cli import main as cli_main

    argv = ["train-mllm", "--config", str(REPO / "configs" / "stages" / "tiny" / "joint.yaml")]
    for override in stage_overrides(data, tmp_path / "x") + ["data.overlong=cut"]:
        argv += ["--set", override]
    assert cli_main(argv) == 2
    assert "data.overlong='cut'; expected drop|truncate" in capsys.readouterr().err


def test_only_records_over_the_context_are_dropped(data, tmp_path):
    """Around the longest record's length: the quick bound never keeps a record that is too long,
    and every record that fits is kept (each record's exact length decides)."""
    from mllm.chat import SequenceBuilder
    from mllm.vocab import extend_tokenizer, shapes_corpus, train_sentencepiece
    from training.data.code_store import CodeStore
    from training.data.shapes import ShapesWorld, ShapesWorldConfig
    from training.mllm_config import MLLMDataConfig
    from training.mllm_data import conversation_sequence, fit_to_context, read_sources

    config = MLLMDataConfig(
        codes=str(data["train_codes"]),
        conversations=[str(data["train_llava"])],
        text_image=[str(data["train_t2i"])],
    )
    conversations, pairs = read_sources(config)
    store = CodeStore(config.codes)
    meta = store.meta
    text_tokenizer = train_sentencepiece(shapes_corpus(ShapesWorld(ShapesWorldConfig()), limit=500), tmp_path, 128)
    layout = extend_tokenizer(text_tokenizer, meta.semantic_codebook_size, meta.pixel_codebook_size)
    builder = SequenceBuilder(text_tokenizer, layout, meta.semantic_depth, meta.pixel_depth, ("semantic", "pixel"))
    lengths = [len(conversation_sequence(builder, store, record)) for record in conversations]
    for limit in (max(lengths), max(lengths) - 1, sorted(lengths)[len(lengths) // 2]):
        builder.max_length = limit
        kept, _, counts = fit_to_context(builder, store, conversations, pairs, {"vqa": 1.0})
        assert [r.id for r in kept] == [r.id for r, n in zip(conversations, lengths, strict=True) if n <= limit]
        assert counts["overlong_dropped"] == sum(n > limit for n in lengths)
