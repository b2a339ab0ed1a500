"""The unified model: vocabulary, text parity, slots, depth head, sampling, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mllm_fixtures import tiny_qwen2
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mllm.chat import ConversationError, SequenceBuilder, collate_sequences
from mllm.config import DualTokenMLLMConfig
from mllm.generation import SamplingConfig, filter_logits, generate_image_codes, generate_text
from mllm.modeling import DualTokenMLLMForCausalLM
from mllm.positions import sincos_grid_table
from mllm.vocab import VocabLayout, VocabularyError, extend_tokenizer, shapes_corpus, train_sentencepiece
from training.data.shapes import ShapesWorld, ShapesWorldConfig

SEM, PIX, DS, DP, GRID = 48, 80, 2, 3, (2, 3)


@pytest.fixture(scope="module")
def base_text_tokenizer(tmp_path_factory):
    corpus = shapes_corpus(ShapesWorld(ShapesWorldConfig(seed=0)), limit=300)
    return train_sentencepiece(corpus, tmp_path_factory.mktemp("sp"))


def _tiny_llm(vocab: int, tie: bool = True) -> Qwen2ForCausalLM:
    return tiny_qwen2(vocab, hidden=64, max_positions=128, tie=tie).eval()


@pytest.fixture(scope="module")
def built(base_text_tokenizer, tmp_path_factory):
    import copy

    text_tokenizer = copy.deepcopy(base_text_tokenizer)
    llm = _tiny_llm(len(text_tokenizer))
    layout = extend_tokenizer(text_tokenizer, SEM, PIX)
    torch.manual_seed(1)
    model = DualTokenMLLMForCausalLM.from_llm(
        llm,
        layout,
        semantic_depth=DS,
        pixel_depth=DP,
        grid_size=GRID,
        depth_head_layers=1,
        depth_head_heads=2,
    ).eval()
    builder = SequenceBuilder.for_model(text_tokenizer, model.config)
    return text_tokenizer, layout, model, builder


def _codes(seed: int, size: int, depth: int) -> torch.Tensor:
    return torch.randint(0, size, (*GRID, depth), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- vocabulary
def test_layout_ranges_are_contiguous_and_padded(built):
    text_tokenizer, layout, model, _ = built
    assert layout.semantic_offset == layout.text_size + 4
    assert layout.pixel_offset == layout.semantic_offset + SEM
    assert len(text_tokenizer) == layout.used_size
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows >= layout.used_size
    assert model.get_output_embeddings().weight.shape[0] == rows


def test_vocabulary_round_trip(built):
    text_tokenizer, layout, _, _ = built
    text = "is there a small red circle to the left of the blue square?"
    ids = text_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(i < layout.text_size for i in ids)
    assert text_tokenizer.decode(ids) == text
    codes = torch.tensor([0, 5, SEM - 1])
    sem_ids = layout.semantic_ids(codes)
    assert torch.equal(layout.semantic_codes(sem_ids), codes)
    assert text_tokenizer.convert_ids_to_tokens(sem_ids.tolist()) == [
        "<sem_00000>",
        "<sem_00005>",
        f"<sem_{SEM - 1:05d}>",
    ]
    pix = layout.pixel_ids(torch.tensor([3, PIX - 1]))
    assert text_tokenizer.decode(pix.tolist()) == f"<pix_00003><pix_{PIX - 1:05d}>"
    assert text_tokenizer("<pix_00003>", add_special_tokens=False)["input_ids"] == [int(pix[0])]
    assert torch.equal(layout.pixel_codes(pix), torch.tensor([3, PIX - 1]))


def test_extension_is_idempotent_and_checked(built):
    text_tokenizer, layout, _, _ = built
    assert extend_tokenizer(text_tokenizer, SEM, PIX) == layout
    with pytest.raises(VocabularyError, match="another layout"):
        extend_tokenizer(text_tokenizer, SEM + 1, PIX)


def test_codes_outside_the_codebook_are_rejected(built):
    _, layout, model, _ = built
    with pytest.raises(VocabularyError, match=rf"pixel code {PIX} is outside the pixel codebook \[0, {PIX}\)"):
        layout.pixel_ids(torch.tensor([PIX]))
    with pytest.raises(VocabularyError, match="is not a semantic code"):
        layout.semantic_codes(torch.tensor([layout.pixel_offset]))
    bad = torch.tensor([[1, 2, layout.used_size + 7]])
    with pytest.raises(VocabularyError, match=f"id {layout.used_size + 7}, outside the extended vocabulary"):
        model(bad)


@pytest.mark.parametrize("tie", [True, False])
def test_text_only_logits_equal_the_original_model(base_text_tokenizer, tie):
    import copy

    text_tokenizer = copy.deepcopy(base_text_tokenizer)
    llm = _tiny_llm(len(text_tokenizer), tie=tie)
    ids = torch.tensor([text_tokenizer("what colour is the square?", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        reference = llm(ids).logits
    layout = extend_tokenizer(text_tokenizer, SEM, PIX)
    model = DualTokenMLLMForCausalLM.from_llm(llm, layout, depth_head_layers=1, depth_head_heads=2).eval()
    with torch.no_grad():
        logits = model.text_logits(model(ids).hidden_states)
    assert logits.shape[-1] > reference.shape[-1]
    torch.testing.assert_close(logits[..., : reference.shape[-1]], reference, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- model
def test_save_load_round_trip_through_auto_classes(built, tmp_path):
    _, _, model, builder = built
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is DualTokenMLLMForCausalLM
    seq = builder.generation("a red circle", _codes(0, PIX, DP), train=True)
    batch = collate_sequences([seq], pad_id=0)
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    torch.testing.assert_close(a.hidden_states, b.hidden_states, rtol=0, atol=0)
    assert a.loss.item() == b.loss.item()


def test_losses_cover_answers_and_image_slots_and_train(built):
    import copy

    _, _, model, builder = built
    model = copy.deepcopy(model).train()
    semantic, pixel = _codes(1, SEM, DS), _codes(2, PIX, DP)
    vqa = builder.conversation(
        [("user", "<image>\nwhat colour is the circle?"), ("assistant", "red")], semantic=semantic
    )
    labelled = vqa.labels[:, 0] >= 0
    # only the answer and the end marker are labelled; the image slots are read, never predicted
    assert int(labelled.sum()) == len(builder.text_ids("red")) + len(builder.text_ids("<|end|>"))
    gen = builder.generation("a red circle", pixel)
    assert int((gen.labels[:, DS:] >= 0).all(-1).sum()) == GRID[0] * GRID[1]
    batch = collate_sequences([vqa, gen], pad_id=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        out = model(**batch)
        assert set(out.losses) >= {"text", "pixel"}
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        first = first if first is not None else out.loss.item()
    assert out.loss.item() < 0.5 * first
    assert out.losses["pixel_acc"].item() > 0.5
    # Held out (no grad): the pixel CE per RVQ depth averages to the pixel loss, and is no loss term.
    with torch.no_grad():
        out = model(**batch)
    per_depth = torch.stack([out.losses[f"pixel_depth{d + 1}"] for d in range(DP)])
    torch.testing.assert_close(per_depth.mean(), out.losses["pixel"])
    torch.testing.assert_close(out.loss, out.losses["text"] + out.losses["pixel"])


def test_pixel_depth_weights_give_the_weighted_mean_of_the_depths(built):
    _, _, model, builder = built
    batch = collate_sequences([builder.generation("a red circle", _codes(5, PIX, DP))], pad_id=0)
    with torch.no_grad():
        plain = model(**batch)
        per_depth = torch.stack([plain.losses[f"pixel_depth{d + 1}"] for d in range(DP)])
        assert per_depth.std() > 1e-4  # the depths differ, so a wrong weighting cannot pass
        weights = [float(d + 1) for d in range(DP)]
        weighted = model(**batch, pixel_depth_weights=weights)
        first_only = model(**batch, pixel_depth_weights=[1.0] + [0.0] * (DP - 1))
        with pytest.raises(ValueError, match=f"pixel_depth_weights has {DP + 1} entries; the model writes {DP}"):
            model(**batch, pixel_depth_weights=[1.0] * (DP + 1))
        with pytest.raises(ValueError, match="expected >= 0, not all 0"):
            model(**batch, pixel_depth_weights=[0.0] * DP)
    expected = (per_depth * torch.tensor(weights)).sum() / sum(weights)
    torch.testing.assert_close(weighted.losses["pixel"], expected)
    torch.testing.assert_close(first_only.losses["pixel"], per_depth[0])
    torch.testing.assert_close(weighted.loss, weighted.losses["text"] + expected)


def test_object_pixel_weight_counts_the_slots_under_the_objects_more(built):
    import torch.nn.functional as F

    _, layout, model, builder = built
    model = _sdpa_copy(model)
    with torch.no_grad():  # sharper logits, so that the slots' cross-entropies differ
        for parameter in model.pixel_head.parameters():
            parameter.mul_(4.0)
    codes = _codes(6, PIX, DP)
    box = (0.0, 0.0, 0.3, 0.4)  # the top-left cell of the 2 x 3 grid
    seq = builder.generation("a red circle", codes, boxes=(box,))
    start = seq.object_slots[0]
    assert seq.object_slots == [start] and torch.equal(seq.ids[start, DS:], layout.pixel_ids(codes[0, 0]))
    batch = collate_sequences([seq, builder.generation("a blue square", _codes(7, PIX, DP))], pad_id=0)
    assert batch["object_slots"].sum() == 1 and bool(batch["object_slots"][0, start])
    with torch.no_grad():
        out = model(**batch)
        plain = model(**batch, object_pixel_weight=1.0)
        weighted = model(**batch, object_pixel_weight=100.0)
        # the per-slot cross-entropies, recomputed from the pixel head
        hidden = out.hidden_states
        nll = []
        for row, sequence in enumerate((seq,)):
            slots = [t for t in range(1, len(sequence)) if bool(layout.is_pixel(sequence.labels[t, DS:]).all())]
            for t in slots:
                target = sequence.labels[t, DS:] - layout.pixel_offset
                logits = model.pixel_logits(hidden[row, t - 1][None], target[None])[0]
                nll.append((F.cross_entropy(logits, target).item(), t == start))
    torch.testing.assert_close(plain.losses["pixel"], out.losses["pixel"])
    assert len(nll) == 6
    # Row 0 alone: the weighted mean of its slots; row 1 adds 6 slots of weight 1.
    total_plain = out.losses["pixel"].item() * 12
    row1 = total_plain - sum(value for value, _ in nll)
    expected = (row1 + sum(value * (100.0 if first else 1.0) for value, first in nll)) / (12 + 99)
    assert abs(weighted.losses["pixel"].item() - expected) < 1e-5
    assert abs(weighted.losses["pixel"].item() - out.losses["pixel"].item()) > 1e-3  # so the check can fail


def test_caption_contrast_compares_one_image_under_two_captions(built):
    import torch.nn.functional as F

    _, _, model, builder = built
    pixel = _codes(3, PIX, DP)
    matched = builder.generation("a red circle", pixel)
    mismatched = builder.generation("two large blue squares and a green triangle", pixel)
    other = builder.generation("a small cyan square", _codes(4, PIX, DP))

    def image_nll(sequence) -> float:  # summed pixel NLL of one image, run alone
        with torch.no_grad():
            out = model(**collate_sequences([sequence], pad_id=0))
        return out.losses["pixel"].item() * GRID[0] * GRID[1] * DP

    batch = collate_sequences([matched, other, mismatched], pad_id=0)
    with torch.no_grad():
        plain = model(**collate_sequences([matched, other], pad_id=0))
        out = model(**batch, contrast_rows=torch.tensor([[0, 2]]), contrast_beta=0.05)
    margin = image_nll(mismatched) - image_nll(matched)
    assert abs(margin) > 1e-3  # the caption changes the likelihood of the same codes
    torch.testing.assert_close(out.losses["contrast_margin"], torch.tensor(margin), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.losses["contrast"], F.softplus(torch.tensor(-0.05 * margin)), rtol=1e-4, atol=1e-5)
    # the mismatched row adds no likelihood term: text and pixel losses are those of the other rows
    for name in ("text", "pixel"):
        torch.testing.assert_close(out.losses[name], plain.losses[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, plain.loss + out.losses["contrast"], rtol=1e-5, atol=1e-6)

    # Training on the contrast alone widens the margin: the model learns to read the caption.
    import copy

    trained = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(trained.parameters(), lr=3e-3)
    for _ in range(10):
        step = trained(**batch, contrast_rows=torch.tensor([[0, 2]]), loss_weights={"text": 0.0, "pixel": 0.0})
        step.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert step.losses["contrast_margin"].item() > margin + 1.0


def test_depth_one_uses_the_lm_head_rows(base_text_tokenizer):
    import copy

    text_tokenizer = copy.deepcopy(base_text_tokenizer)
    layout = extend_tokenizer(text_tokenizer, SEM, PIX)
    model = DualTokenMLLMForCausalLM.from_llm(
        _tiny_llm(len(base_text_tokenizer)), layout, pixel_depth=1, depth_head_layers=0
    ).eval()
    assert model.pixel_head is None
    hidden = torch.randn(4, 64)
    full = model.text_logits(hidden)
    torch.testing.assert_close(model.next_pixel_logits(hidden, None), full[:, layout.pixel_offset : layout.used_size])
    with pytest.raises(ValueError, match="needs pixel_depth=1"):
        DualTokenMLLMForCausalLM.from_llm(
            _tiny_llm(len(base_text_tokenizer)), layout, pixel_depth=2, depth_head_layers=0
        )


def _concat_reader(base_text_tokenizer, **options):
    """A tiny model that reads both branches through the concat + MLP fusion, with its text tokenizer."""
    import copy

    text_tokenizer = copy.deepcopy(base_text_tokenizer)
    layout = extend_tokenizer(text_tokenizer, SEM, PIX)
    model = DualTokenMLLMForCausalLM.from_llm(
        _tiny_llm(len(base_text_tokenizer)),
        layout,
        semantic_depth=DS,
        pixel_depth=DP,
        grid_size=GRID,
        read=["semantic", "pixel"],
        input_fusion="concat_mlp",
        depth_head_layers=1,
        depth_head_heads=2,
        **options,
    )
    return text_tokenizer, layout, model


def test_concat_fusion_mixes_both_branches(base_text_tokenizer):
    text_tokenizer, layout, model = _concat_reader(base_text_tokenizer)
    builder = SequenceBuilder.for_model(text_tokenizer, model.config)
    seq = builder.conversation(
        [("user", "<image> what?"), ("assistant", "red")], _codes(3, SEM, DS), _codes(4, PIX, DP)
    )
    image_rows = layout.is_semantic(seq.ids[:, 0])
    assert bool((seq.ids[image_rows, DS:] >= layout.pixel_offset).all())  # both branches are read
    embeds = model.embed_slots(seq.ids[None])
    changed = seq.ids.clone()
    changed[image_rows, DS] = layout.pixel_offset + (changed[image_rows, DS] - layout.pixel_offset + 1) % PIX
    assert not torch.allclose(model.embed_slots(changed[None])[0, image_rows], embeds[0, image_rows])
    text_rows = ~image_rows
    torch.testing.assert_close(model.embed_slots(changed[None])[0, text_rows], embeds[0, text_rows])


# ---------------------------------------------------------------------------- sequences
def test_bad_conversations_are_named(built):
    _, _, _, builder = built
    with pytest.raises(ConversationError, match="no assistant turn"):
        builder.conversation([("user", "<image> what colour?")], semantic=_codes(0, SEM, DS))
    with pytest.raises(ConversationError, match="placeholder without a matching image"):
        builder.conversation([("user", "<image> what colour?"), ("assistant", "red")])
    with pytest.raises(ConversationError, match="unknown role 'bot'"):
        builder.conversation([("bot", "hi"), ("assistant", "red")])
    with pytest.raises(ConversationError, match="longer than the model's context of 128"):
        builder.conversation([("user", "red " * 200), ("assistant", "red")])
    with pytest.raises(ConversationError, match=r"expected \(h, w, 2\)"):
        builder.conversation(
            [("user", "<image> q"), ("assistant", "a")], semantic=torch.zeros(2, 3, 5, dtype=torch.long)
        )


# ---------------------------------------------------------------------------- sampling
def test_filter_logits_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_k=3))
    assert kept.tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).sum() == 1


def test_text_decoding_with_cache_equals_without(built):
    text_tokenizer, _, model, builder = built
    prompts = [
        builder.conversation(
            [("user", "<image> what colour is it?")], _codes(5, SEM, DS), train=False, add_generation_prompt=True
        ),
        builder.conversation([("user", "how many?")], train=False, add_generation_prompt=True),
    ]
    cached = generate_text(model, prompts, max_new_tokens=8, use_cache=True)
    plain = generate_text(model, prompts, max_new_tokens=8, use_cache=False)
    assert cached == plain and all(len(out) == 8 for out in cached)
    alone = generate_text(model, prompts[1:], max_new_tokens=8)
    assert alone[0] == cached[1]  # left padding does not change a row's output
    sampled = SamplingConfig(temperature=1.0, top_p=0.9)
    one = generate_text(model, prompts, 8, sampled, generator=torch.Generator().manual_seed(3))
    two = generate_text(model, prompts, 8, sampled, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert one == two


def test_image_decoding_with_cache_equals_without_and_cfg(built):
    _, _, model, builder = built
    prompts = [builder.generation("a red circle", train=False), builder.generation("two blue squares", train=False)]
    uncond = builder.generation("", train=False)
    settings = SamplingConfig(temperature=1.0, top_k=20, top_p=0.95)

    def run(**kwargs):
        return generate_image_codes(
            model, prompts, sampling=settings, generator=torch.Generator().manual_seed(7), **kwargs
        )

    cached = run(unconditional=uncond, cfg_scale=3.0)
    assert cached.shape == (2, *GRID, DP) and int(cached.max()) < PIX
    assert torch.equal(cached, run(unconditional=uncond, cfg_scale=3.0, use_cache=False))
    assert torch.equal(cached, run(unconditional=uncond, cfg_scale=3.0, batch_cfg=False))
    # guidance 1 reproduces conditional sampling (the batched unconditional rows change nothing)
    assert torch.equal(run(unconditional=uncond, cfg_scale=1.0), run())
    assert not torch.equal(cached, run())
    # same seed -> same image; another seed -> another image
    assert not torch.equal(
        cached, generate_image_codes(model, prompts, uncond, 3.0, settings, generator=torch.Generator().manual_seed(8))
    )


# ---------------------------------------------------------------------------- bidirectional image attention
@pytest.fixture(scope="module")
def both_attentions(built):
    """The ``built`` model and a copy with the same weights that reads images bidirectionally."""
    import copy

    text_tokenizer, layout, model, builder = built
    prefix = copy.deepcopy(model)
    prefix.config.image_attention = "bidirectional"
    return builder, model, prefix


def _question(builder, seed):
    return builder.conversation(
        [("user", "<image> what colour is it?"), ("assistant", "red")], _codes(seed, SEM, DS), train=True
    )


def test_read_image_blocks_cover_the_read_image_only(both_attentions):
    builder, _, prefix = both_attentions
    sequence = _question(builder, 5)
    blocks = prefix.read_image_blocks(sequence.ids[None])[0]
    slots = GRID[0] * GRID[1]
    assert int((blocks == 0).sum()) == slots and int((blocks > 0).sum()) == 0
    start = int((blocks == 0).nonzero()[0])
    assert bool((blocks[start : start + slots] == 0).all())  # one contiguous run: the image's slots
    generated = builder.generation("a red circle", _codes(6, PIX, DP))
    assert bool((prefix.read_image_blocks(generated.ids[None]) == -1).all())  # drawn images stay causal


def test_bidirectional_image_attention_sees_the_whole_read_image_only(both_attentions):
    builder, causal, prefix = both_attentions
    one, two = _question(builder, 5), _question(builder, 5)
    blocks = prefix.read_image_blocks(one.ids[None])[0]
    first, last = [int(i) for i in (blocks == 0).nonzero()[[0, -1], 0]]
    offset = builder.layout.semantic_offset
    two.ids[last, :DS] = (one.ids[last, :DS] - offset + 1) % SEM + offset  # other codes, last slot
    assert not torch.equal(one.ids, two.ids)
    with torch.no_grad():
        states = {
            name: [model(input_ids=seq.ids[None]).hidden_states[0] for seq in (one, two)]
            for name, model in (("causal", causal), ("prefix", prefix))
        }
    for name in ("causal", "prefix"):
        torch.testing.assert_close(states[name][0][:first], states[name][1][:first])  # text before the image
        assert not torch.allclose(states[name][0][last + 1 :], states[name][1][last + 1 :])  # text after it
    # the image's first slot sees its last slot only with bidirectional attention
    torch.testing.assert_close(states["causal"][0][first], states["causal"][1][first])
    assert not torch.allclose(states["prefix"][0][first], states["prefix"][1][first])
    # a text-to-image sequence (no read image) is unchanged: generated slots stay causal
    generated = builder.generation("a red circle", _codes(6, PIX, DP))
    with torch.no_grad():
        torch.testing.assert_close(
            causal(input_ids=generated.ids[None]).hidden_states,
            prefix(input_ids=generated.ids[None]).hidden_states,
        )


def _check_cached_decoding(builder, model, text_model) -> None:
    """``model`` answers an image question and a text-only one the same with and without the KV
    cache, each row as when alone (left padding changes nothing); ``text_model`` answers the
    text-only one as ``model`` does."""
    prompts = [
        builder.conversation(
            [("user", "<image> what colour is it?")], _codes(5, SEM, DS), train=False, add_generation_prompt=True
        ),
        builder.conversation([("user", "how many?")], train=False, add_generation_prompt=True),
    ]
    cached = generate_text(model, prompts, max_new_tokens=8, use_cache=True)
    assert cached == generate_text(model, prompts, max_new_tokens=8, use_cache=False)
    assert generate_text(model, prompts[:1], max_new_tokens=8)[0] == cached[0]  # padding changes nothing
    assert generate_text(text_model, prompts[1:], max_new_tokens=8)[0] == cached[1]


def test_bidirectional_image_attention_decodes_the_same_with_and_without_cache(both_attentions):
    builder, _, prefix = both_attentions
    _check_cached_decoding(builder, prefix, prefix)


QUESTIONS = [("what colour is it?", "red"), ("how many objects are there?", "two"), ("is there a red circle?", "yes")]


def test_independent_turns_lay_out_one_question_prompts_after_a_shared_image(built):
    _, _, _, builder = built
    codes = _codes(5, SEM, DS)
    turns = [
        turn
        for q, a in QUESTIONS
        for turn in (("user", f"<image>\n{q}" if q == QUESTIONS[0][0] else q), ("assistant", a))
    ]
    packed = builder.independent_turns(turns, codes)
    singles = [builder.conversation([("user", f"<image>\n{q}"), ("assistant", a)], codes) for q, a in QUESTIONS]
    prefix = int((packed.segments == 0).sum())
    assert torch.equal(packed.ids[:prefix], singles[0].ids[:prefix])
    for number, single in enumerate(singles, start=1):
        where = packed.segments == number
        assert torch.equal(packed.ids[where], single.ids[prefix:])
        assert torch.equal(packed.labels[where], single.labels[prefix:])
    batch = collate_sequences([packed, singles[1]], pad_id=0)
    positions, segments = batch["position_ids"], batch["segment_ids"]
    for number, single in enumerate(singles, start=1):
        assert positions[0][segments[0] == number].tolist() == list(range(prefix, len(single)))
    assert positions[1, : len(singles[1])].tolist() == list(range(len(singles[1])))  # a plain row counts on
    assert bool((segments[1, : len(singles[1])] == 0).all()) and bool((segments[1, len(singles[1]) :] == -1).all())
    with pytest.raises(ConversationError, match="pairs"):
        builder.independent_turns([("assistant", "red"), ("user", "what colour is it?")], codes)
    text_only = builder.independent_turns([("user", "hello"), ("assistant", "hi")])
    assert text_only.segments is None  # no image: an ordinary conversation


@pytest.mark.parametrize("attention", ["causal", "prefix"])
def test_independent_turns_see_the_image_and_their_own_question_only(both_attentions, attention):
    builder, causal, prefix = both_attentions
    model = causal if attention == "causal" else prefix
    codes = _codes(7, SEM, DS)
    turns = [turn for q, a in QUESTIONS for turn in (("user", q), ("assistant", a))]
    packed = builder.independent_turns(turns, codes)
    singles = [builder.conversation([("user", f"<image>\n{q}"), ("assistant", a)], codes) for q, a in QUESTIONS]
    batch = collate_sequences([singles[0], packed], pad_id=0)  # padded, beside a plain row
    start = int((packed.segments == 0).sum())
    with torch.no_grad():
        states = model(**{k: v for k, v in batch.items() if k != "labels"}).hidden_states
        for number, single in enumerate(singles, start=1):
            alone = model(input_ids=single.ids[None]).hidden_states[0]
            torch.testing.assert_close(states[1][: len(packed)][packed.segments == number], alone[start:])
        torch.testing.assert_close(states[0][: len(singles[0])], model(input_ids=singles[0].ids[None]).hidden_states[0])
        # the same turns as one conversation: later answers see the earlier questions
        whole = builder.conversation([("user", "<image>\n" + QUESTIONS[0][0]), *turns[1:]], codes)
        last = model(input_ids=whole.ids[None]).hidden_states[0][-len(singles[2]) + start :]
        alone = model(input_ids=singles[2].ids[None]).hidden_states[0][start:]
        assert not torch.allclose(last, alone)
        losses = model(**batch).losses
    assert torch.isfinite(losses["text"])
    with pytest.raises(ValueError, match="position_ids"):
        model(input_ids=batch["input_ids"], segment_ids=batch["segment_ids"])


def test_independent_turns_refuse_attention_that_takes_no_mask(built):
    import copy

    _, _, model, builder = built
    flash = copy.deepcopy(model)
    flash.llm.config._attn_implementation = "flash_attention_2"
    turns = [turn for q, a in QUESTIONS for turn in (("user", q), ("assistant", a))]
    batch = collate_sequences([builder.independent_turns(turns, _codes(7, SEM, DS))], pad_id=0)
    with pytest.raises(ValueError, match="need a mask: sdpa or eager attention .* not flash_attention_2"):
        flash(**batch)


def test_image_attention_is_checked_and_saved(built, tmp_path):
    _, _, model, _ = built
    with pytest.raises(ValueError, match="image_attention='sideways'"):
        DualTokenMLLMConfig(image_attention="sideways")  # (a shared text_config would lose its attention setting)
    config = DualTokenMLLMConfig.from_dict({**model.config.to_dict(), "image_attention": "bidirectional"})
    config.save_pretrained(tmp_path)
    assert DualTokenMLLMConfig.from_pretrained(tmp_path).image_attention == "bidirectional"


# ---------------------------------------------------------------------------- 2-D rotary positions
@pytest.fixture(scope="module")
def both_ropes(built):
    """The ``built`` model and a copy with the same weights whose read image slots rotate in 2-D."""
    import copy

    _, _, model, builder = built
    grid = copy.deepcopy(model)
    grid.set_image_rope("2d")
    return builder, model, grid


def test_grid_rotary_rotates_read_slots_by_row_and_column(both_ropes):
    from mllm.positions import GridRotaryEmbedding

    builder, _, grid = both_ropes
    sequence = _question(builder, 5)
    ids = sequence.ids[None]
    rotary = grid.llm.get_decoder().rotary_emb
    assert isinstance(rotary, GridRotaryEmbedding)
    slot = grid.read_slot_index(ids)
    slots = GRID[0] * GRID[1]
    start = int((slot[0] == 0).nonzero()[0])
    assert slot[0, start : start + slots].tolist() == list(range(slots))
    assert int((slot >= 0).sum()) == slots
    positions = torch.arange(ids.shape[1])[None]
    x = torch.zeros(1, ids.shape[1], 4)
    rotary.slot_index = slot
    try:
        cos, sin = rotary(x, positions)
    finally:
        rotary.slot_index = None
    inv_freq = rotary.rotary.inv_freq
    half = inv_freq.numel()
    for index in range(slots):
        row, col = divmod(index, GRID[1])
        p = start + index
        expected = [(p, start + row, start + col)[k % 3] * float(inv_freq[k]) for k in range(half)]
        torch.testing.assert_close(cos[0, p, :half], torch.tensor(expected).cos())
        torch.testing.assert_close(sin[0, p, half:], torch.tensor(expected).sin())
    plain_cos, plain_sin = rotary.rotary(x, positions)
    off = slot[0] < 0  # text and boundary tokens rotate as the LM's own embedding does
    torch.testing.assert_close(cos[0, off], plain_cos[0, off])
    torch.testing.assert_close(sin[0, off], plain_sin[0, off])


def test_grid_rotary_changes_reading_only(both_ropes):
    builder, plain, grid = both_ropes
    text = builder.conversation([("user", "how many?"), ("assistant", "two")])
    generated = builder.generation("a red circle", _codes(6, PIX, DP))
    read = _question(builder, 5)
    with torch.no_grad():
        for sequence in (text, generated):  # nothing read: the same as the LM's 1-D positions
            torch.testing.assert_close(
                plain(input_ids=sequence.ids[None]).hidden_states, grid(input_ids=sequence.ids[None]).hidden_states
            )
        one, two = (model(input_ids=read.ids[None]).hidden_states[0] for model in (plain, grid))
    first = int((grid.read_slot_index(read.ids[None])[0] == 0).nonzero()[0])
    # up to the image's first slot (row 0, column 0: all three positions agree) nothing changes
    torch.testing.assert_close(one[: first + 1], two[: first + 1])
    assert not torch.allclose(one[first + 1 :], two[first + 1 :])
    assert grid.llm.get_decoder().rotary_emb.slot_index is None  # set for one call only


def test_grid_rotary_decodes_the_same_with_and_without_cache(both_ropes):
    builder, plain, grid = both_ropes
    _check_cached_decoding(builder, grid, plain)  # text only: as with 1-D positions


def test_image_rope_is_checked_saved_and_switchable(both_ropes, tmp_path):
    builder, plain, grid = both_ropes
    with pytest.raises(ValueError, match="image_rope='3d'"):
        DualTokenMLLMConfig(image_rope="3d")
    grid.save_pretrained(tmp_path)
    loaded = DualTokenMLLMForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.image_rope == "2d"
    read = _question(builder, 5).ids[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=read).hidden_states, grid(input_ids=read).hidden_states)
        loaded.set_image_rope("1d")  # back to the LM's own rotary embedding, same weights
        assert type(loaded.llm.get_decoder().rotary_emb).__name__ == "Qwen2RotaryEmbedding"
        torch.testing.assert_close(loaded(input_ids=read).hidden_states, plain(input_ids=read).hidden_states)


def test_image_rope_2d_needs_a_rotary_lm(base_text_tokenizer):
    import copy

    from transformers import GPT2Config, GPT2LMHeadModel

    text_tokenizer = copy.deepcopy(base_text_tokenizer)
    llm = GPT2LMHeadModel(GPT2Config(vocab_size=len(text_tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    layout = extend_tokenizer(text_tokenizer, SEM, PIX)
    with pytest.raises(ValueError, match="image_rope='2d' needs a decoder with a rotary embedding.*GPT2Model"):
        DualTokenMLLMForCausalLM.from_llm(llm, layout, grid_size=GRID, image_rope="2d")
    scaled = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(text_tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        )
    )
    with pytest.raises(ValueError, match="this LM uses rope_type='linear'"):
        DualTokenMLLMForCausalLM.from_llm(scaled, layout, grid_size=GRID, image_rope="2d")


# ---------------------------------------------------------------------------- paper scale
def test_qwen2_5_3b_config_builds_on_the_meta_device():
    from transformers import AutoConfig

    from tokenizer.config import DualTokenizerConfig, config_from_dict
    from training.config import load_config, read_yaml
    from training.mllm_config import MLLMStageConfig

    repo = Path(__file__).resolve().parents[2]
    config = load_config(MLLMStageConfig, repo / "configs" / "stages" / "qwen2_5_3b" / "joint.yaml")
    assert config.deepspeed.enabled and config.deepspeed.zero_stage == 2 and config.optim.lr == 1e-5
    assert config.optim.name == "adamw"  # ZeRO partitions the matrices Muon needs whole
    visual_tokenizer_section = read_yaml(repo / "configs" / "tokenizer" / "so400m_384_rvq8.yaml")["tokenizer"]
    visual_tokenizer_config = config_from_dict(DualTokenizerConfig, visual_tokenizer_section)
    grid = visual_tokenizer_config.backbone.image_size // visual_tokenizer_config.backbone.patch_size
    sem, pix = visual_tokenizer_config.semantic_quantizer, visual_tokenizer_config.pixel_quantizer
    layout = VocabLayout(151_665, sem.codebook_size, pix.codebook_size)  # len(Qwen2.5 tokenizer) = 151,665
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.model.llm_config))
        base = sum(p.numel() for p in llm.parameters())
        model = DualTokenMLLMForCausalLM.from_llm(
            llm,
            layout,
            semantic_depth=sem.depth,
            pixel_depth=pix.depth,
            grid_size=(grid, grid),
            read=config.model.read,
            write=config.model.write,
            input_fusion=config.model.input_fusion,
            depth_head_layers=config.model.depth_head_layers,
            depth_head_heads=config.model.depth_head_heads,
            depth_head_hidden=config.model.depth_head_hidden,
        )
    assert 3.05e9 < base < 3.12e9  # Qwen2.5-3B: 3.09 B with tied embeddings
    assert (sem.codebook_size, pix.codebook_size, sem.depth, pix.depth, grid) == (16384, 16384, 8, 8, 27)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == 184_448 and rows % 64 == 0  # 151,665 + 4 + 2 x 16,384 = 184,437, padded to 64
    hidden, head = 2048, config.model.depth_head_hidden
    extension = (rows - 151_936) * hidden  # tied: the head shares the embedding
    depth_head = (
        hidden * head
        + head  # in_proj
        + (pix.codebook_size + pix.depth) * head  # code and depth embeddings
        + config.model.depth_head_layers * (12 * head * head + 13 * head)  # pre-LN blocks, MLP 4x
        + 2 * head  # final norm
        + pix.depth * (head + 1) * pix.codebook_size  # one classifier per depth
    )
    projector = 2 * (hidden * hidden + hidden)
    total = sum(p.numel() for p in model.parameters())
    assert total == base + extension + depth_head + projector
    assert 3.3e9 < total < 3.4e9


def test_an_idle_head_gets_an_exact_zero_gradient(built):
    import copy

    _, _, model, builder = built
    model = copy.deepcopy(model).train()
    vqa = builder.conversation([("user", "<image>\nwhat colour?"), ("assistant", "red")], semantic=_codes(1, SEM, DS))
    out = model(**collate_sequences([vqa], pad_id=0))
    assert "pixel" not in out.losses and out.losses["idle_heads"].item() == 0.0
    out.loss.backward()
    grads = [p.grad for p in model.pixel_head.parameters()]
    assert all(g is not None and not g.any() for g in grads)  # present (every engine steps it alike) and zero
    with torch.no_grad():
        assert "idle_heads" not in model(**collate_sequences([vqa], pad_id=0)).losses


def test_codebook_initialised_code_rows_are_a_linear_map_of_the_code_vectors(base_text_tokenizer):
    import copy

    from mllm.modeling import init_code_embeddings

    text_tokenizer = copy.deepcopy(base_text_tokenizer)
    layout = extend_tokenizer(text_tokenizer, SEM, PIX)
    model = DualTokenMLLMForCausalLM.from_llm(
        _tiny_llm(len(base_text_tokenizer)), layout, semantic_depth=DS, pixel_depth=DP, depth_head_layers=1
    )
    generator = torch.Generator().manual_seed(3)
    semantic, pixel = torch.randn(SEM, 8, generator=generator), torch.randn(PIX, 8, generator=generator)
    semantic[2] = semantic[0] + semantic[1]  # a slot's summed rows must equal the map of its summed vectors
    pixel[5] = pixel[3] - pixel[4]
    text_before = model.get_input_embeddings().weight[: layout.text_size].detach().clone()
    init_code_embeddings(model, semantic, pixel)
    rows = model.get_input_embeddings().weight.detach()
    sem_rows = rows[layout.semantic_offset : layout.semantic_offset + SEM]
    pix_rows = rows[layout.pixel_offset : layout.pixel_offset + PIX]
    torch.testing.assert_close(sem_rows[2], sem_rows[0] + sem_rows[1])
    torch.testing.assert_close(pix_rows[5], pix_rows[3] - pix_rows[4])
    head_rows = model.pixel_head.code_embed.weight
    torch.testing.assert_close(head_rows[5], head_rows[3] - head_rows[4])
    # Every depth's classifier starts as the head's code rows, scaled so that a unit-variance
    # head state gives logits of about unit variance.
    classifier = model.pixel_head.classifier_weight.detach()
    for depth in range(DP):
        torch.testing.assert_close(classifier[depth].T / classifier[depth].T.norm(), head_rows / head_rows.norm())
    state = torch.randn(4096, classifier.shape[1], generator=generator)
    assert float((state @ classifier[0]).std()) == pytest.approx(1.0, rel=0.1)
    torch.testing.assert_close(rows[: layout.text_size], text_before)  # text rows untouched
    assert float(sem_rows.std()) == pytest.approx(float(text_before.std()), rel=1e-3)
    with pytest.raises(VocabularyError, match=r"pixel codebook has shape \(7, 8\)"):
        init_code_embeddings(model, None, torch.randn(7, 8))


# ---------------------------------------------------------------------------- 2-D image positions
@pytest.fixture(scope="module", params=["learned", "sincos", "projector", "gated"])
def positioned(request, base_text_tokenizer):
    torch.manual_seed(2)
    text_tokenizer, layout, model = _concat_reader(base_text_tokenizer, image_position_embedding=request.param)
    model.eval()
    if request.param == "learned":
        with torch.no_grad():  # post_init draws them at std 0.02; make them matter in these checks
            model.image_rows.weight.normal_(std=0.5)
            model.image_cols.weight.normal_(std=0.5)
    return text_tokenizer, layout, model, SequenceBuilder.for_model(text_tokenizer, model.config)


def test_sincos_grid_table_is_a_fixed_coordinate_code():
    table = sincos_grid_table((4, 6), 32, scale=2.5).reshape(4, 6, 32)
    torch.testing.assert_close(table.norm(dim=-1), torch.full((4, 6), 2.5))
    # Rows live in the first half of the channels, columns in the second.
    torch.testing.assert_close(table[:, :1, :16].expand(4, 6, 16), table[..., :16])
    torch.testing.assert_close(table[:1, :, 16:].expand(4, 6, 16), table[..., 16:])
    # Channel 0 (the lowest frequency's sine) rises monotonically across the grid: a coordinate.
    assert bool((table[1:, 0, 0] > table[:-1, 0, 0]).all()) and bool((table[0, 1:, 16] > table[0, :-1, 16]).all())
    flat = table.reshape(24, 32)
    distances = torch.cdist(flat, flat) + torch.eye(24) * 10
    assert float(distances.min()) > 0.1  # every slot has its own code
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_grid_table((2, 2), 30)


def test_image_position_modes_are_checked_and_sincos_adds_no_parameters(base_text_tokenizer):
    _, _, plain = _concat_reader(base_text_tokenizer)
    assert plain.config.image_position_embedding == "none"
    for mode in ("sincos", "projector"):
        _, _, fixed = _concat_reader(base_text_tokenizer, image_position_embedding=mode, image_position_scale=0.5)
        assert sum(p.numel() for p in fixed.parameters()) == sum(p.numel() for p in plain.parameters())
    # gated: one linear map from the slot's code vectors (2H with concat fusion) to H gates.
    _, _, gated = _concat_reader(base_text_tokenizer, image_position_embedding="gated")
    hidden = plain.config.text_config.hidden_size
    extra = sum(p.numel() for p in gated.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 2 * hidden * hidden + hidden
    with pytest.raises(ValueError, match="'projector' feeds the positions through the visual projector"):
        DualTokenMLLMConfig(image_position_embedding="projector", input_fusion="sum")
    assert DualTokenMLLMConfig(image_position_embedding=True).image_position_embedding == "learned"
    with pytest.raises(ValueError, match="image_position_embedding='grid'; expected one of"):
        DualTokenMLLMConfig(image_position_embedding="grid")
    with pytest.raises(ValueError, match="image_position_scale=0.0"):
        DualTokenMLLMConfig(image_position_embedding="sincos", image_position_scale=0.0)


def test_content_dependent_positions_survive_an_even_pooling_of_the_image(base_text_tokenizer):
    """Moving an object leaves the mean of the image's slot embeddings unchanged when positions
    are added whatever a slot shows (sincos: the same table row sits on every slot), but not
    when they depend on the slot's codes (projector: they enter the projector's input; gated:
    the codes scale them). Only then can an answer that pools the image evenly (a freshly
    trained LM) tell where the object is."""
    torch.manual_seed(4)
    means = {}
    for mode in ("sincos", "projector", "gated"):
        text_tokenizer, layout, model = _concat_reader(base_text_tokenizer, image_position_embedding=mode)
        builder = SequenceBuilder.for_model(text_tokenizer, model.config)
        rows = []
        for column in (0, GRID[1] - 1):
            semantic, pixel = torch.full((*GRID, DS), 3), torch.full((*GRID, DP), 3)
            semantic[:, column], pixel[:, column] = 9, 11  # an object down one edge
            ids = builder.image_slots(semantic, pixel)[None]
            with torch.no_grad():
                rows.append(model.embed_slots(ids)[0].mean(dim=0))
        means[mode] = (rows[0] - rows[1]).norm() / rows[0].norm()
    assert float(means["sincos"]) < 1e-5
    assert float(means["projector"]) > 1e-2 and float(means["gated"]) > 1e-2


def test_image_slot_index_counts_each_image_in_raster_order(positioned):
    _, layout, model, builder = positioned
    # Two images: one in a conversation, then one generated after it, in one sequence.
    first = builder.conversation(
        [("user", "<image> what?"), ("assistant", "red")], _codes(1, SEM, DS), _codes(2, PIX, DP)
    )
    second = builder.generation("a red circle", _codes(3, PIX, DP))
    ids = torch.cat([first.ids, second.ids])[None]
    index = model.image_slot_index(ids)[0]
    is_image = (layout.is_semantic(ids) | layout.is_pixel(ids)).any(-1)[0]
    assert torch.equal(index >= 0, is_image)
    slots = GRID[0] * GRID[1]
    assert index[is_image].tolist() == list(range(slots)) * 2
    # Back-to-back image runs restart the count every grid's worth of slots.
    block = first.ids[is_image[: len(first.ids)]]
    assert model.image_slot_index(torch.cat([block, block])[None])[0].tolist() == list(range(slots)) * 2


def test_image_positions_change_image_slots_only_and_survive_save_load(positioned, tmp_path):
    _, layout, model, builder = positioned
    seq = builder.conversation(
        [("user", "<image> what?"), ("assistant", "red")], _codes(1, SEM, DS), _codes(2, PIX, DP)
    )
    ids = seq.ids[None]
    is_image = (layout.is_semantic(ids) | layout.is_pixel(ids)).any(-1)[0]
    with torch.no_grad():
        placed = model.embed_slots(ids)[0]
        # The same codes in every image slot: without positions all image rows would be equal.
        same = ids.clone()
        same[0, is_image] = ids[0, is_image][0]
        rows = model.embed_slots(same)[0][is_image]
        assert not torch.allclose(rows[0], rows[1]) and not torch.allclose(rows[0], rows[GRID[1]])
        # Explicit indices override the derived ones; -1 everywhere removes the positions.
        none = model.embed_slots(ids, torch.full(ids.shape[:2], -1))[0]
        torch.testing.assert_close(none[~is_image], placed[~is_image])
        assert not torch.allclose(none[is_image], placed[is_image])
    model.save_pretrained(tmp_path / "m")
    loaded = DualTokenMLLMForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.image_position_embedding == model.config.image_position_embedding
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_slots(ids)[0], placed)


def _draw_two(model, builder, **kwargs) -> torch.Tensor:
    """Codes for two fixed prompts at CFG 2, top-k 20, one seed: the same call every time."""
    prompts = [builder.generation("a red circle", train=False), builder.generation("two squares", train=False)]
    uncond = builder.generation("", train=False)
    settings = SamplingConfig(temperature=1.0, top_k=20)
    return generate_image_codes(
        model, prompts, uncond, 2.0, settings, generator=torch.Generator().manual_seed(5), **kwargs
    )


def test_image_decoding_with_positions_cache_equals_without(positioned):
    _, _, model, builder = positioned
    cached = _draw_two(model, builder)
    assert torch.equal(cached, _draw_two(model, builder, use_cache=False))
    assert torch.equal(cached, _draw_two(model, builder, batch_cfg=False))


# ---------------------------------------------------------------------------- positions of drawn slots
def test_generated_positions_place_the_slots_of_drawn_images_only(base_text_tokenizer, tmp_path):
    """``generated_position_embedding=sincos`` adds the sine-cosine table to the slots of an image
    the model draws, row k on slot k, and leaves text and read images exactly as they were."""
    torch.manual_seed(6)
    text_tokenizer, layout, model = _concat_reader(base_text_tokenizer, generated_position_embedding="sincos")
    model.eval()
    builder = SequenceBuilder.for_model(text_tokenizer, model.config)
    read = builder.conversation(
        [("user", "<image> what?"), ("assistant", "red")], _codes(1, SEM, DS), _codes(2, PIX, DP)
    )
    drawn = builder.generation("a red circle", _codes(3, PIX, DP))
    ids = torch.cat([read.ids, drawn.ids])[None]
    is_image = (layout.is_semantic(ids) | layout.is_pixel(ids)).any(-1)[0]
    is_drawn = is_image.clone()
    is_drawn[: len(read.ids)] = False
    with torch.no_grad():
        placed = model.embed_slots(ids)[0]
        model.config.generated_position_embedding = "none"
        plain = model.embed_slots(ids)[0]
        model.config.generated_position_embedding = "sincos"
    torch.testing.assert_close(placed[~is_drawn], plain[~is_drawn])  # text and the read image
    table = sincos_grid_table(GRID, placed.shape[-1], model.config.image_position_scale)
    torch.testing.assert_close(placed[is_drawn] - plain[is_drawn], table, atol=1e-5, rtol=0)
    # One slot fed on its own (a sampler with a KV cache) gets its row from the index it passes.
    slot = drawn.ids[is_drawn[len(read.ids) :].nonzero()[5]][None]
    with torch.no_grad():
        alone = model.embed_slots(slot, torch.tensor([[5]]))[0, 0]
    torch.testing.assert_close(alone, placed[is_drawn][5])
    model.save_pretrained(tmp_path / "m")
    loaded = DualTokenMLLMForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.generated_position_embedding == "sincos"
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_slots(ids)[0], placed)
    # Parameter-free, checked, and not stacked on a read-image position.
    _, _, none = _concat_reader(base_text_tokenizer)
    assert none.config.generated_position_embedding == "none"
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in none.parameters())
    with pytest.raises(ValueError, match="generated_position_embedding='learned'; expected one of"):
        DualTokenMLLMConfig(generated_position_embedding="learned")

    # Beside a read-image position (gated): that one stays on the read slots, the drawn ones get the table.
    torch.manual_seed(8)
    _, _, both = _concat_reader(
        base_text_tokenizer, image_position_embedding="gated", generated_position_embedding="sincos"
    )
    both.eval()
    with torch.no_grad():
        placed = both.embed_slots(ids)[0]
        both.config.generated_position_embedding = "none"
        gated_only = both.embed_slots(ids)[0]
        both.config.image_position_embedding = "none"
        bare = both.embed_slots(ids)[0]
    torch.testing.assert_close(placed[~is_drawn], gated_only[~is_drawn])
    assert not torch.allclose(gated_only[is_image & ~is_drawn], bare[is_image & ~is_drawn])
    torch.testing.assert_close(placed[is_drawn] - bare[is_drawn], table, atol=1e-5, rtol=0)


def test_image_decoding_with_generated_positions_cache_equals_without(base_text_tokenizer):
    torch.manual_seed(7)
    text_tokenizer, _, model = _concat_reader(base_text_tokenizer, generated_position_embedding="sincos")
    model.eval()
    builder = SequenceBuilder.for_model(text_tokenizer, model.config)
    cached = _draw_two(model, builder)
    assert torch.equal(cached, _draw_two(model, builder, use_cache=False))
    model.config.generated_position_embedding = "none"
    try:  # the positions change what is drawn (the check above is not vacuous)
        assert not torch.equal(cached, _draw_two(model, builder))
    finally:
        model.config.generated_position_embedding = "sincos"


# ---------------------------------------------------------------------------- grounding
def test_box_slots_cover_the_cells_under_a_box():
    from mllm.chat import box_slots

    assert box_slots((0.0, 0.0, 1.0, 1.0), 2, 3) == list(range(6))
    assert box_slots((0.05, 0.05, 0.15, 0.15), 2, 3) == [0]  # smaller than a cell: the cell of its centre
    assert box_slots((0.25, 0.6, 0.45, 0.9), 2, 3) == [3, 4]  # straddles two columns of the bottom row
    assert box_slots((0.3, 0.6, 0.34, 0.9), 2, 3) == [3]  # 1.2 % of the next cell is not "covered"


def _attention_of(model, layer: int, batch: dict) -> torch.Tensor:
    """The (B, heads, L, L) attention weights of decoder ``layer``, read from eager attention."""
    import copy

    eager = copy.deepcopy(model)
    eager.llm.config._attn_implementation = "eager"
    seen = {}
    attention = eager.llm.get_decoder().layers[layer].self_attn

    def keep(module, args, output):
        seen.setdefault("weights", output[1])

    handle = attention.register_forward_hook(keep)
    with torch.no_grad():
        eager(**{k: v for k, v in batch.items() if not k.startswith("grounding") and k != "labels"})
    handle.remove()
    return seen["weights"]


def _sdpa_copy(model):
    """A copy on SDPA (an earlier test's config construction resets the shared LM config's choice)."""
    import copy

    model = copy.deepcopy(model)
    model.llm.config._attn_implementation = "sdpa"
    return model


@pytest.mark.parametrize("layer,heads", [(0, 1), (1, 3)])
def test_grounding_mass_is_the_layers_real_attention_on_the_boxed_slots(built, layer, heads):
    _, _, model, builder = built
    model = _sdpa_copy(model)
    codes = _codes(9, SEM, DS)
    turns = [turn for q, a in QUESTIONS for turn in (("user", q), ("assistant", a))]
    boxes = [(), ((0.0, 0.0, 0.3, 0.4),), (), (), (), ((0.4, 0.6, 1.0, 1.0), (0.0, 0.0, 0.2, 0.2))]
    packed = builder.independent_turns(turns, codes, boxes=boxes)
    plain = builder.conversation(
        [("user", "<image>\nwhat colour is it?"), ("assistant", "red")], codes, boxes=[(), boxes[1]]
    )
    assert [len(slots) for _, slots in packed.grounding] == [1, 3]  # cell 0; cells 4, 5 and cell 0
    # The query predicts the answer's first token: the next label is that token.
    for query, _ in packed.grounding + plain.grounding:
        assert query >= 0
    assert int(packed.labels[packed.grounding[0][0] + 1, 0]) == builder.text_ids("red")[0]
    batch = collate_sequences([plain, packed], pad_id=0)
    assert batch["grounding_index"].tolist() == [[0, plain.grounding[0][0]]] + [[1, q] for q, _ in packed.grounding]
    with torch.no_grad():
        out = model(**batch, grounding_layer=layer, grounding_heads=heads)
    weights = _attention_of(model, layer, batch)
    expected = torch.stack(
        [
            weights[row, :heads, query][:, batch["grounding_slots"][n]].sum(-1)
            for n, (row, query) in enumerate(batch["grounding_index"].tolist())
        ]
    )
    torch.testing.assert_close(out.losses["grounding_mass"], expected.mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.losses["grounding"], -expected.log().mean(), rtol=1e-4, atol=1e-5)


def test_grounding_loss_trains_the_head_to_look_at_the_box(built):
    _, _, model, builder = built
    model = _sdpa_copy(model).train()
    codes = _codes(11, SEM, DS)
    seq = builder.conversation(
        [("user", "<image>\nwhat colour is it?"), ("assistant", "red")], codes, boxes=[(), ((0.7, 0.6, 1.0, 1.0),)]
    )
    batch = collate_sequences([seq], pad_id=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    masses = []
    for _ in range(8):
        out = model(**batch, loss_weights={"text": 0.0, "grounding": 1.0}, grounding_layer=1)
        masses.append(out.losses["grounding_mass"].item())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert masses[0] < 0.2 and masses[-1] > 0.9, masses  # one cell of the 6, among text positions too


def test_grounding_names_bad_settings(built):
    _, _, model, builder = built
    codes = _codes(3, SEM, DS)
    seq = builder.conversation(
        [("user", "<image>\nwhat colour is it?"), ("assistant", "red")], codes, boxes=[(), ((0.0, 0.0, 0.5, 0.5),)]
    )
    batch = collate_sequences([seq], pad_id=0)
    with pytest.raises(ValueError, match=r"grounding_layer=5; the LM has decoder layers 0\.\.1"):
        model(**batch, grounding_layer=5)
    with pytest.raises(ValueError, match="grounding_heads=9; the layer has 4 attention heads"):
        model(**batch, grounding_heads=9)
    with pytest.raises(ConversationError, match="boxes has 1 entries for 2 turns"):
        builder.conversation([("user", "<image>\nq"), ("assistant", "a")], codes, boxes=[()])
    with pytest.raises(ConversationError, match="no image to point into"):
        builder.conversation([("user", "q"), ("assistant", "a")], boxes=[(), ((0.0, 0.0, 0.5, 0.5),)])
