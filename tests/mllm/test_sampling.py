"""The device-resident sampler: no host transfers per slot, the cached depth head, batch invariance,
and the same codes as the sampler it replaced (tests/benchmarks/reference_sampler.py)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from mllm_fixtures import tiny_qwen2

from mllm.chat import SequenceBuilder
from mllm.depth_head import DepthHead
from mllm.generation import SamplingConfig, generate_image_codes, generate_text, sample
from mllm.modeling import DualTokenMLLMForCausalLM
from mllm.vocab import extend_tokenizer, shapes_corpus, train_sentencepiece
from training.data.shapes import ShapesWorld, ShapesWorldConfig

SEM, PIX, GRID = 48, 80, (2, 3)
GUIDED = SamplingConfig(temperature=1.0, top_k=20, top_p=0.95)


def _reference_sampler():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_sampler.py"
    spec = importlib.util.spec_from_file_location("reference_sampler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    corpus = shapes_corpus(ShapesWorld(ShapesWorldConfig(seed=0)), limit=300)
    return train_sentencepiece(corpus, tmp_path_factory.mktemp("sp"))


def _model(text_tokenizer, **options) -> tuple[DualTokenMLLMForCausalLM, SequenceBuilder]:
    tokenizer = copy.deepcopy(text_tokenizer)
    layout = extend_tokenizer(tokenizer, SEM, PIX)
    llm = tiny_qwen2(len(tokenizer), hidden=64, max_positions=128)
    settings = dict(semantic_depth=2, pixel_depth=4, grid_size=GRID, depth_head_layers=2, depth_head_heads=2)
    model = DualTokenMLLMForCausalLM.from_llm(llm, layout, **{**settings, **options}).eval()
    return model, SequenceBuilder.for_model(tokenizer, model.config)


@pytest.fixture(scope="module")
def drawing(text_tokenizer):
    """A model that reads semantic + pixel codes, writes both, with sine-cosine generated positions."""
    return _model(
        text_tokenizer, read=("semantic", "pixel"), write=("pixel", "semantic"), generated_position_embedding="sincos"
    )


def _prompts(builder, captions=("a red circle", "two blue squares", "a small green triangle on the left")):
    return [builder.generation(caption, train=False) for caption in captions], builder.generation("", train=False)


def _generators(seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


class HostReads:
    """Counts the calls that read a tensor's value on the host (each is a device-to-host
    transfer and a stall on an accelerator), while ``counting`` is on."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "__array__")

    def __init__(self, monkeypatch) -> None:
        self.counting = False
        self.calls: list[str] = []
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch.Tensor, "__getitem__", self._wrap_getitem(torch.Tensor.__getitem__))
        monkeypatch.setattr(torch, "multinomial", self._wrap("torch.multinomial", torch.multinomial))
        monkeypatch.setattr(torch, "nonzero", self._wrap("torch.nonzero", torch.nonzero))

    def _wrap(self, name, original):
        def wrapped(*args, **kwargs):
            if self.counting:
                self.calls.append(name)
            return original(*args, **kwargs)

        return wrapped

    def _wrap_getitem(self, original):
        def wrapped(tensor, index):
            parts = index if isinstance(index, tuple) else (index,)
            if self.counting and any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in parts):
                self.calls.append("boolean mask indexing")
            return original(tensor, index)

        return wrapped


def _count_loop_reads(monkeypatch, run) -> tuple[list[str], int]:
    """Host reads between the end of the prefill and the end of the slot loop, and the slots fed."""
    from mllm import decoding

    reads = HostReads(monkeypatch)
    original_start, original_feed = decoding.SlotRunner.start, decoding.SlotRunner.feed
    fed = []

    def start(self):
        hidden = original_start(self)
        reads.counting = True
        return hidden

    def feed(self, slots, image_index=-1):
        fed.append(image_index)
        return original_feed(self, slots, image_index)

    monkeypatch.setattr(decoding.SlotRunner, "start", start)
    monkeypatch.setattr(decoding.SlotRunner, "feed", feed)
    real_cpu = torch.Tensor.cpu

    def cpu(tensor, *args, **kwargs):  # the codes leave the device once, after the last slot
        reads.counting = False
        return real_cpu(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    run()
    return reads.calls, len(fed)


@pytest.mark.parametrize("guided", [False, True])
def test_the_slot_loop_reads_nothing_back_to_the_host(drawing, monkeypatch, guided):
    model, builder = drawing
    prompts, uncond = _prompts(builder)

    def run():
        generate_image_codes(
            model, prompts, uncond if guided else None, 3.0, GUIDED, generator=_generators([1, 2, 3]), forbid_syncs=True
        )

    calls, fed = _count_loop_reads(monkeypatch, run)
    assert fed == model.config.image_slots
    assert calls == []


def test_the_counter_sees_the_replaced_sampler_reading_every_slot(drawing, monkeypatch):
    """The counter is not blind: the sampler before this one read codes back at every slot."""
    model, builder = drawing
    prompts, uncond = _prompts(builder)
    reference = _reference_sampler()
    reads = HostReads(monkeypatch)
    reads.counting = True
    reference.generate_image_codes(model, prompts, uncond, 3.0, GUIDED, generator=_generators([1, 2, 3]))
    assert len(reads.calls) >= 4 * model.config.image_slots


@pytest.mark.parametrize("depth", [1, 4, 8])
def test_cached_depth_head_equals_the_uncached_one(depth):
    torch.manual_seed(depth)
    head = DepthHead(lm_hidden=48, depth=depth, codebook_size=64, hidden=32, num_layers=2, num_heads=4).eval()
    context = torch.randn(6, 48)
    uncached_gen, cached_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    with torch.no_grad():
        steps = head.steps(context)
        chosen, code = None, None
        for _ in range(depth):
            reference = head.next_logits(context, chosen)
            logits = steps.next_logits(code)
            torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)
            code = sample(logits, GUIDED, cached_gen)
            assert torch.equal(code, sample(reference, GUIDED, uncached_gen))
            chosen = code[:, None] if chosen is None else torch.cat([chosen, code[:, None]], dim=1)
        # and the teacher-forced forward agrees on the whole chosen sequence
        torch.testing.assert_close(head(context, chosen)[:, -1], logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="decoded already"):
        steps.next_logits(code)


def test_cached_depth_gives_the_uncached_codes_in_the_model(drawing):
    model, builder = drawing
    prompts, uncond = _prompts(builder)
    cached = generate_image_codes(model, prompts, uncond, 3.0, GUIDED, generator=_generators([4, 5, 6]))
    plain = generate_image_codes(
        model, prompts, uncond, 3.0, GUIDED, generator=_generators([4, 5, 6]), cached_depth=False
    )
    assert torch.equal(cached, plain)


def test_static_steps_refuse_layers_they_cannot_run_and_the_fallback_draws_the_same(drawing):
    """The lean static-cache step runs Qwen2 / Llama layers only: a layer with a query norm (Qwen3)
    or a length-dependent rotary goes through transformers' own forward, which draws the same codes."""
    from mllm.static_cache import supports_static_steps

    model, builder = drawing
    assert supports_static_steps(model)
    dynamic_rope = copy.deepcopy(model)
    dynamic_rope.llm.get_decoder().rotary_emb.rope_type = "dynamic"
    assert not supports_static_steps(dynamic_rope)
    query_norm = copy.deepcopy(model)
    query_norm.llm.get_decoder().layers[-1].self_attn.q_norm = torch.nn.Identity()  # not called by Qwen2's forward
    assert not supports_static_steps(query_norm)
    prompts, uncond = _prompts(builder)
    static = generate_image_codes(model, prompts[:2], uncond, 3.0, GUIDED, generator=_generators([7, 8]))
    fallback = generate_image_codes(query_norm, prompts[:2], uncond, 3.0, GUIDED, generator=_generators([7, 8]))
    assert torch.equal(static, fallback)


def test_an_image_does_not_depend_on_the_rest_of_its_batch(drawing):
    model, builder = drawing
    prompts, uncond = _prompts(builder)
    batch = generate_image_codes(model, prompts, uncond, 3.0, GUIDED, generator=_generators([10, 11, 12]))
    for row in range(len(prompts)):
        alone = generate_image_codes(
            model, prompts[row : row + 1], uncond, 3.0, GUIDED, generator=_generators([10 + row])
        )
        assert torch.equal(alone[0], batch[row])
    # the same prompt twice in one batch with two seeds: two different images
    twice = generate_image_codes(model, prompts[:1] * 2, uncond, 3.0, GUIDED, generator=_generators([10, 13]))
    assert torch.equal(twice[0], batch[0]) and not torch.equal(twice[1], twice[0])


def test_sample_draws_what_torch_multinomial_draws_at_the_same_seed():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0)) * 3
    settings = SamplingConfig(temperature=0.8, top_k=100, top_p=0.9)
    from mllm.generation import filter_logits

    probs = filter_logits(logits / settings.temperature, settings.top_k, settings.top_p).softmax(-1)
    for seed in range(20):
        per_row = sample(logits, settings, _generators(range(seed, seed + 5)))
        expected = torch.cat(
            [
                torch.multinomial(p[None], 1, generator=g)
                for p, g in zip(probs, _generators(range(seed, seed + 5)), strict=True)
            ]
        )
        assert torch.equal(per_row, expected.squeeze(-1))
        shared = sample(logits, settings, torch.Generator().manual_seed(seed))
        assert torch.equal(
            shared, torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
        )


def test_sample_follows_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -8.0]])
    settings = SamplingConfig(temperature=1.0, top_k=3)
    draws = torch.cat([sample(logits, settings, torch.Generator().manual_seed(seed)) for seed in range(4000)])
    counts = torch.bincount(draws, minlength=5).double() / draws.numel()
    expected = torch.tensor([2.0, 1.0, 0.0]).exp() / torch.tensor([2.0, 1.0, 0.0]).exp().sum()
    torch.testing.assert_close(counts[:3], expected.double(), rtol=0, atol=0.03)
    assert counts[3:].sum() == 0


@pytest.mark.parametrize("guided", [False, True])
def test_codes_equal_the_replaced_sampler_at_the_same_seed(drawing, guided):
    model, builder = drawing
    prompts, uncond = _prompts(builder)
    reference = _reference_sampler()
    for rows in (prompts[:1], prompts):
        seeds = list(range(20, 20 + len(rows)))
        args = (model, rows, uncond if guided else None, 3.0, GUIDED)
        assert torch.equal(
            generate_image_codes(*args, generator=_generators(seeds)),
            reference.generate_image_codes(*args, generator=_generators(seeds)),
        )


def test_text_answers_equal_the_replaced_sampler(drawing):
    model, builder = drawing
    prompts = [
        builder.conversation([("user", question)], train=False, add_generation_prompt=True)
        for question in ("what colour is the circle?", "how many squares?", "where is it?")
    ]
    reference = _reference_sampler()
    greedy = generate_text(model, prompts, 10)
    assert greedy == reference.generate_text(model, prompts, 10)
    stops = (greedy[0][2], greedy[1][0])  # rows stop at different steps, one at once
    assert generate_text(model, prompts, 10, stop_ids=stops) == reference.generate_text(
        model, prompts, 10, stop_ids=stops
    )
    sampled = SamplingConfig(temperature=1.0, top_p=0.9)
    assert generate_text(model, prompts, 10, sampled, generator=_generators([1, 2, 3])) == reference.generate_text(
        model, prompts, 10, sampled, generator=_generators([1, 2, 3])
    )


def test_text_loop_reads_one_flag_per_token(drawing, monkeypatch):
    """After the prefill, text reads only whether every row has stopped, once per token (as
    transformers' generate does), and the answers once at the end."""
    model, builder = drawing
    prompts = [builder.conversation([("user", "what colour?")], train=False, add_generation_prompt=True)] * 2
    calls, fed = _count_loop_reads(monkeypatch, lambda: generate_text(model, prompts, 6))
    assert fed == 5 and calls == ["__bool__"] * 5 + ["tolist"]


@pytest.fixture(scope="module")
def pipeline(drawing):
    from mllm_fixtures import tiny_visual_tokenizer

    from mllm.inference import Pipeline

    model, builder = drawing  # text-only questions and image codes: the visual tokenizer is not read
    return Pipeline(model, builder.text_tokenizer, tiny_visual_tokenizer())


def test_answer_batch_left_pads_and_keeps_each_answer_its_own(pipeline):
    questions = ["what colour is the circle?", "how many?", "is the small green triangle left of the red square?"]
    batch = pipeline.answer_batch([None] * 3, questions, max_new_tokens=6)
    assert batch == [pipeline.answer(None, question, max_new_tokens=6) for question in questions]
    sampled = SamplingConfig(temperature=1.0, top_p=0.95)
    drawn = pipeline.answer_batch([None] * 3, questions, max_new_tokens=6, sampling=sampled, seeds=[5, 6, 7])
    alone = pipeline.answer_batch([None], questions[1:2], max_new_tokens=6, sampling=sampled, seeds=[6])
    assert drawn[1] == alone[0]
    # seeds default to seed + k, so answer(seed=s) is the first answer of a batch seeded s
    assert pipeline.answer_batch([None] * 2, questions[:2], max_new_tokens=6, sampling=sampled, seed=9)[0] == (
        pipeline.answer(None, questions[0], max_new_tokens=6, sampling=sampled, seed=9)
    )
    from mllm.request_checks import PipelineError

    with pytest.raises(PipelineError, match="2 seeds for 3 questions"):
        pipeline.answer_batch([None] * 3, questions, seeds=[1, 2])


def test_pipeline_images_do_not_depend_on_their_batch(pipeline):
    options = dict(cfg=3.0, temperature=1.0, top_k=20)
    batch = pipeline.generate_codes(["a red circle", "two blue squares in the corner"], n=2, seed=0, **options)
    assert torch.equal(batch[3], pipeline.generate_codes("two blue squares in the corner", seed=3, **options)[0])
    assert torch.equal(batch[0], pipeline.generate_codes("a red circle", seed=0, **options)[0])


def test_answers_stream_piece_by_piece_while_they_are_drawn(pipeline, monkeypatch):
    from mllm import decoding

    fed = []
    feed = decoding.SlotRunner.feed

    def counting_feed(self, *args, **kwargs):
        fed.append(1)
        return feed(self, *args, **kwargs)

    monkeypatch.setattr(decoding.SlotRunner, "feed", counting_feed)
    questions = ["what colour is the circle?", "how many squares are there?"]
    sampled = SamplingConfig(temperature=1.0)
    pieces: dict[int, list[tuple[str, int]]] = {0: [], 1: []}
    answers = pipeline.answer_batch(
        [None] * 2,
        questions,
        max_new_tokens=12,
        sampling=sampled,
        seed=3,
        on_text=lambda row, piece: pieces[row].append((piece, len(fed))),
    )
    assert answers == pipeline.answer_batch([None] * 2, questions, max_new_tokens=12, sampling=sampled, seed=3)
    for row, answer in enumerate(answers):
        assert "".join(piece for piece, _ in pieces[row]) == answer
        assert all(piece for piece, _ in pieces[row])
    assert len(pieces[0]) > 1 and pieces[0][0][1] < pieces[0][-1][1]  # the first piece came before the last step
    single: list[str] = []
    assert (
        pipeline.answer(None, questions[1], max_new_tokens=12, sampling=sampled, seed=4, on_text=single.append)
        == answers[1]
    )
    assert "".join(single) == answers[1]


def test_text_stream_holds_back_what_can_still_change():
    from mllm.text_stream import TextStream

    class Bytes:  # decodes byte ids; an unfinished UTF-8 character shows as U+FFFD, as byte-fallback pieces do
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    pieces: list[str] = []
    stream = TextStream(Bytes(), pieces.append)
    for token in " caf\u00e9 ok ".encode():
        stream.add(token)
    assert stream.finish() == "caf\u00e9 ok"
    assert "".join(pieces) == "caf\u00e9 ok" and "\ufffd" not in "".join(pieces) and not pieces[0].startswith(" ")


@pytest.mark.slow
def test_compiled_steps_draw_the_eager_codes(drawing):
    """``torch.compile`` of the LM step and of one slot's depth-head decoding and draw (mode
    "default") gives the codes and the answers the eager steps give at the same seeds (one small
    batch: compiling costs ~20 s)."""
    model, builder = drawing
    prompts, uncond = _prompts(builder)
    args = (model, prompts[:1], uncond, 3.0, GUIDED)
    eager = generate_image_codes(*args, generator=_generators([3]))
    assert torch.equal(generate_image_codes(*args, generator=_generators([3]), compile_mode="default"), eager)
    question = [builder.conversation([("user", "where is it?")], train=False, add_generation_prompt=True)]
    assert generate_text(model, question, 8, compile_mode="default") == generate_text(model, question, 8)
    from mllm import generation, static_cache

    for step in (static_cache.slot_step, generation.pick_codes):  # compiled, not fallen back to eager
        assert static_cache._COMPILED[(step, "default", "cpu")] is not step


def test_every_step_of_an_image_has_the_same_shapes(drawing, monkeypatch):
    """Under CUDA graphs (here pretended, and compiled with static shapes), all the LM steps of an
    image are one graph, and so are all its slots' draws (one per depth head): a step whose shapes
    changed as the cache filled would be compiled again, and its CUDA graph recorded again, at
    every slot."""
    from mllm import generation, static_cache

    graphs: dict[str, int] = {}
    made: dict[object, object] = {}

    def static_compile(function, mode, device):
        def backend(graph, example_inputs):
            graphs[function.__name__] = graphs.get(function.__name__, 0) + 1
            return graph.forward

        return made.setdefault(function, torch.compile(function, backend=backend, dynamic=False))

    monkeypatch.setattr(static_cache, "compiled", static_compile)
    monkeypatch.setattr(static_cache, "uses_cuda_graphs", lambda mode, device: True)
    monkeypatch.setattr(generation, "compiled", static_compile)
    torch._dynamo.reset()
    try:
        model, builder = drawing
        prompts, uncond = _prompts(builder)
        args = (model, prompts[:2], uncond, 3.0, GUIDED)
        eager = generate_image_codes(*args, generator=_generators([5, 6]))
        traced = generate_image_codes(*args, generator=_generators([5, 6]), compile_mode="default")
    finally:
        torch._dynamo.reset()
    assert torch.equal(traced, eager)
    assert graphs == {"slot_step": 1, "pick_codes": 2}  # the pixel head and the semantic head


def test_compile_option_picks_a_mode_per_device():
    from mllm.generation import compile_mode_for

    assert compile_mode_for("cpu", False) is None
    assert compile_mode_for("cpu", True) == "default"
    assert compile_mode_for("cuda", True) == "reduce-overhead"
    assert compile_mode_for("cpu", "max-autotune-no-cudagraphs") == "max-autotune-no-cudagraphs"
    with pytest.raises(ValueError, match="compile='fast'; expected one of default, reduce-overhead"):
        compile_mode_for("cpu", "fast")
