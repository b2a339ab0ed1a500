"""Every file in configs/ loads into its schema; unknown keys, missing keys and bad values fail by name.

``SCHEMA_OF`` maps each file to its schema explicitly, so a new file fails here until it is given
one. A schema is a loader that rejects unknown keys (the stages' typed dataclasses; for the
plain-mapping eval files, the keys that the code reading them reads) and the keys a file must
state: the loaders fill in defaults (the tiny model's), so a forgotten key would otherwise train
or score something else without a word.
"""

from __future__ import annotations

import ast
import inspect
import math
import re
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tokenizer.config import ConfigError, DualTokenizerConfig, TapsConfig, config_from_dict, config_to_dict
from training.config import apply_overrides, load_config, read_yaml
from training.mllm_config import MLLMStageConfig
from training.tokenizer_config import Stage1Config
from training.train_teacher import Stage0Config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
CONFIG_FILES = sorted(path.relative_to(CONFIGS).as_posix() for path in CONFIGS.rglob("*") if path.is_file())


# ------------------------------------------------------------------------ keys the code reads
def keys_read(source: str, mapping: str, accessors: tuple[str, ...] = ()) -> set[str]:
    """String keys that ``source`` reads from a mapping named ``mapping`` (``mapping.get("k")``,
    ``mapping["k"]``, also as an attribute: ``self.mapping``) or passes to a method in
    ``accessors`` (``self._option("k")``)."""

    def name(node: ast.AST) -> str | None:
        return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None

    def string(node: ast.AST) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    found = set()
    for node in ast.walk(ast.parse(textwrap.dedent(source))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            key = string(node.args[0])
            reads = node.func.attr == "get" and name(node.func.value) == mapping
            if key is not None and (reads or node.func.attr in accessors):
                found.add(key)
        elif isinstance(node, ast.Subscript) and name(node.value) == mapping and string(node.slice) is not None:
            found.add(string(node.slice))
    return found


def task_option_keys(task: type) -> set[str]:
    """The option keys a registered eval task reads, in its own code and its bases' (mixins too)."""
    keys: set[str] = set()
    for cls in task.__mro__:
        if cls.__module__.split(".")[0] == "eval":
            keys |= keys_read(inspect.getsource(cls), "options", accessors=("_option",))
    return keys


def eval_settings_keys() -> set[str]:
    """Top-level keys of an eval settings file: those the eval package reads from its settings
    mapping (version, seeds, batch size), and one section per registered task."""
    from eval import harness
    from eval.task import TASKS

    package = Path(harness.__file__).parent
    return set().union(*(keys_read(path.read_text(), "settings") for path in package.rglob("*.py"))) | set(TASKS)


def floor_metric_names() -> set[str]:
    """Metrics a floor or ceiling may name: the LLM stage's held-out text-to-image losses
    (``val_t2i_`` + each term of the model's loss dict) and the shapes_vqa scores."""
    from eval.shapes_scoring import VQAItem, score_vqa
    from mllm.modeling import DualTokenMLLMForCausalLM
    from training.data.shapes import QUESTION_KINDS

    terms = re.findall(r'losses\["(\w+)"\]', inspect.getsource(DualTokenMLLMForCausalLM.compute_losses))
    items = [VQAItem(None, "?", "yes", kind, kind) for kind in QUESTION_KINDS]
    return {f"val_t2i_{term}" for term in terms} | set(score_vqa(items, ["yes"] * len(items), {}))


# What tests/eval/test_regression_floors.py reads from a floors file: run name -> its keys.
FLOORS_LAYOUT = {"llm_micro": ("steps", "floors", "ceilings")}


# ------------------------------------------------------------------------------ loaders
def load_llm_stage(path: Path) -> None:
    # model.llm_config is checked against its transformers config class as the YAML loads
    # (training.mllm_config.validate_llm_config).
    load_config(MLLMStageConfig, path)


def load_deepspeed_json(path: Path) -> None:
    """Filled from a typed config as a run fills it, then parsed by DeepSpeed's own config
    classes, which refuse unknown keys."""
    import os

    import torch

    from training.config import DeepSpeedConfig
    from training.deepspeed_json import TrainShape, deepspeed_json

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig as DeepSpeedRuntimeConfig

    shape = TrainShape(micro_batch=2, accumulation=4, world_size=1, grad_clip=1.0, bf16=False)
    payload = deepspeed_json(DeepSpeedConfig(enabled=True, config_path=str(path)), shape)
    try:
        parsed = DeepSpeedRuntimeConfig(payload)
    except Exception as error:  # noqa: BLE001 - pydantic's ValidationError and DeepSpeed's own asserts
        raise ConfigError(f"{path}: DeepSpeed refuses it: {str(error).splitlines()[0:3]}") from None
    if (parsed.train_batch_size, parsed.gradient_accumulation_steps) != (8, 4):
        raise ConfigError(f"{path}: the batch size is not the typed config's (8 = 2 x 4 x 1 process)")


def load_eval_settings(path: Path) -> None:
    from eval.harness import load_settings
    from eval.task import TASKS

    settings = load_settings(path)
    known = eval_settings_keys()
    for key, value in settings.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r}; the eval harness reads {sorted(known)}")
        if key not in TASKS:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {key} must map the task's options to values, got {value!r}")
        options = task_option_keys(TASKS[key])
        unknown = sorted(set(value) - options)
        if unknown:
            raise ConfigError(f"{path}: unknown key {key}.{unknown[0]}; task {key} reads {sorted(options)}")


def load_floors(path: Path) -> None:
    metrics = floor_metric_names()
    for run, spec in read_yaml(path).items():
        if run not in FLOORS_LAYOUT:
            raise ConfigError(f"{path}: unknown key {run!r}; the floors test reads {sorted(FLOORS_LAYOUT)}")
        unknown = sorted(set(spec) - set(FLOORS_LAYOUT[run]))
        if unknown:
            raise ConfigError(f"{path}: unknown key {run}.{unknown[0]}; expected {FLOORS_LAYOUT[run]}")
        steps = spec.get("steps", 1)
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"{path}: {run}.steps={steps!r}; expected an integer >= 1")
        for section in ("floors", "ceilings"):
            for name, bound in (spec.get(section) or {}).items():
                if name not in metrics:
                    raise ConfigError(f"{path}: unknown metric {run}.{section}.{name}; runs report {sorted(metrics)}")
                if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
                    raise ConfigError(f"{path}: {run}.{section}.{name}={bound!r}; expected a number")


# ------------------------------------------------------------------------------ schemas
@dataclass(frozen=True)
class Schema:
    """How one kind of config file is read, and which keys it must (or must not) state."""

    name: str
    load: Callable[[Path], object]  # raises ConfigError naming an unknown key or a bad value
    # Dotted keys the file states in its own text: inherited through `base:`, two files would
    # train into one folder.
    stated: tuple[str, ...] = ()
    resolved: tuple[str, ...] = ()  # dotted keys the file or one of its `base:` files states
    not_stated: tuple[str, ...] = ()  # dotted keys left to the files that build on this one


TEACHER = Schema(
    "stage-0 teacher",
    lambda path: load_config(Stage0Config, path),
    stated=("loop.output_dir",),
    resolved=("teacher.vision", "teacher.text", "data.kind", "loop.max_steps"),
)
TOKENIZER = Schema(
    "stage-1 tokenizer",
    lambda path: load_config(Stage1Config, path),
    stated=("loop.output_dir",),
    resolved=(
        "teacher_path",
        "data.kind",
        "tokenizer.backbone",
        "tokenizer.taps.pixel_layer",
        "tokenizer.taps.semantic_layer",
        "tokenizer.pixel_quantizer.depth",
        "tokenizer.semantic_quantizer.depth",
        "loop.max_steps",
    ),
)
# A stage is data: which parameters train, from which model, with which losses, data mix and
# learning rate, into which folder (training/train_mllm.py).
LLM_STAGE = Schema(
    "LLM stage",
    load_llm_stage,
    stated=(
        "stage.name",
        "stage.init",
        "stage.trainable",
        "stage.loss_weights",
        "data.mix",
        "optim.lr",
        "loop.output_dir",
        "loop.max_steps",
    ),
    resolved=("model", "data.codes"),
)
# The model and data that a scale's stage files share (their `base:`).
LLM_BASE = Schema(
    "LLM base",
    load_llm_stage,
    resolved=("model", "data.codes"),
    not_stated=("stage", "loop.output_dir", "loop.max_steps"),
)
# A DeepSpeed JSON leaves the values the typed config owns to it ("auto") and names its ZeRO stage.
DEEPSPEED_JSON = Schema("DeepSpeed JSON", load_deepspeed_json, stated=("zero_optimization.stage",))
# A score names its settings file and must be reproducible from it.
EVAL_SETTINGS = Schema("eval settings", load_eval_settings, resolved=("version", "seed", "world_seed"))
FLOORS = Schema("score floors", load_floors, resolved=("llm_micro.steps", "llm_micro.floors", "llm_micro.ceilings"))

SCHEMA_OF = {
    "deepspeed/zero2.json": DEEPSPEED_JSON,
    "deepspeed/zero2_offload.json": DEEPSPEED_JSON,
    "deepspeed/zero3.json": DEEPSPEED_JSON,
    "deepspeed/zero3_offload.json": DEEPSPEED_JSON,
    "eval/floors.yaml": FLOORS,
    "eval/paper_benchmarks.yaml": EVAL_SETTINGS,
    "eval/shapes.yaml": EVAL_SETTINGS,
    "mllm/qwen2_5_3b.yaml": LLM_BASE,
    "mllm/tiny.yaml": LLM_BASE,
    "stages/qwen2_5_3b/align.yaml": LLM_STAGE,
    "stages/qwen2_5_3b/generate.yaml": LLM_STAGE,
    "stages/qwen2_5_3b/joint.yaml": LLM_STAGE,
    "stages/qwen2_5_3b/understand.yaml": LLM_STAGE,
    "stages/tiny/align.yaml": LLM_STAGE,
    "stages/tiny/generate.yaml": LLM_STAGE,
    "stages/tiny/joint.yaml": LLM_STAGE,
    "stages/tiny/understand.yaml": LLM_STAGE,
    "tokenizer/siglip_l16_256_rvq4.yaml": TOKENIZER,
    "tokenizer/so400m_384_rvq8.yaml": TOKENIZER,
    "tokenizer/tiny.yaml": TOKENIZER,
    "tokenizer/tiny_decoder_canonical.yaml": TOKENIZER,
    "tokenizer/tiny_decoder_grid.yaml": TOKENIZER,
    "tokenizer/tiny_decoder_scenes.yaml": TOKENIZER,
    "tokenizer/tiny_decoder_slots.yaml": TOKENIZER,
    "tokenizer/tiny_l6.yaml": TOKENIZER,
    "tokenizer/tiny_teacher.yaml": TEACHER,
    "tokenizer/tiny_teacher_l6.yaml": TEACHER,
}


def schema_for(name: str) -> Schema:
    if name not in SCHEMA_OF:
        raise ConfigError(f"configs/{name} has no schema: add it to SCHEMA_OF in tests/test_config.py")
    return SCHEMA_OF[name]


_ABSENT = object()


def _lookup(data: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return _ABSENT
        data = data[part]
    return data


def check_config_file(path: Path, schema: Schema) -> None:
    """Load ``path`` into ``schema``; a ConfigError names the file and the unknown, missing or misplaced key."""
    schema.load(path)
    own, resolved = yaml.safe_load(path.read_text()) or {}, read_yaml(path)
    for key in schema.stated:
        if _lookup(own, key) is _ABSENT:
            raise ConfigError(f"{path}: missing {key}; every {schema.name} file states it itself (not through base:)")
    for key in schema.resolved:
        if _lookup(resolved, key) is _ABSENT:
            raise ConfigError(f"{path}: missing {key}; a {schema.name} file (or its base:) must state it")
    for key in schema.not_stated:
        if _lookup(own, key) is not _ABSENT:
            raise ConfigError(f"{path}: {key} is stated here, but it belongs in the files built on this {schema.name}")


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_loads_into_its_schema(name: str) -> None:
    check_config_file(CONFIGS / name, schema_for(name))


def test_every_schema_entry_is_a_file() -> None:
    stale = sorted(set(SCHEMA_OF) - set(CONFIG_FILES))
    assert not stale, f"SCHEMA_OF names files that are not in configs/: {stale}"


def test_a_file_without_a_schema_is_named() -> None:
    with pytest.raises(ConfigError, match=r"configs/tokenizer/tiny_new\.yaml has no schema"):
        schema_for("tokenizer/tiny_new.yaml")


def test_the_derived_key_sets_hold_what_the_code_reads() -> None:
    from eval.task import TASKS

    # The derived key sets themselves: a reader the AST walk misses would reject every file.
    assert {"version", "seed", "world_seed", "batch_size", "shapes_vqa"} <= eval_settings_keys()
    assert task_option_keys(TASKS["geneval"]) >= {"split", "per_category", "cfg", "temperature", "fid_weights"}
    assert task_option_keys(TASKS["vqav2"]) >= {"questions", "image_dir", "annotations", "limit"}
    assert {"val_t2i_text", "val_t2i_pixel_acc", "vqa_valid"} <= floor_metric_names()


# --------------------------------------------------------------- a bad key in a copy fails
def _copy_with(tmp_path: Path, name: str, change: Callable[[dict], None]) -> Path:
    """configs/ copied to ``tmp_path`` (so that ``base:`` links resolve), with ``name`` changed."""
    root = tmp_path / "configs"
    shutil.copytree(CONFIGS, root)
    path = root / name
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _set(data: dict, key: str, value: Any) -> None:
    *sections, last = key.split(".")
    for section in sections:
        data = data.setdefault(section, {})
    data[last] = value


def _drop(data: dict, key: str) -> None:
    *sections, last = key.split(".")
    for section in sections:
        data = data[section]
    del data[last]


@pytest.mark.parametrize(
    ("name", "key", "value", "message"),
    [
        (
            "tokenizer/tiny.yaml",
            "tokenizer.pixel_quantizer.codebook_sise",
            8,
            r"unknown config key tokenizer\.pixel_quantizer\.codebook_sise",
        ),
        (
            "tokenizer/tiny_teacher.yaml",
            "teacher.vision.num_layer",
            6,
            r"unknown config key teacher\.vision\.num_layer",
        ),
        ("tokenizer/tiny.yaml", "teacher.class_loss_weight", 1.0, r"unknown config key teacher "),
        ("stages/tiny/align.yaml", "stage.trainabel", ["llm.*"], r"unknown config key stage\.trainabel"),
        (
            "stages/qwen2_5_3b/joint.yaml",
            "model.llm_config.num_hiden_layers",
            2,
            r"unknown key model\.llm_config\.num_hiden_layers",
        ),
        ("mllm/tiny.yaml", "data.codez", "runs/codes", r"unknown config key data\.codez"),
        ("mllm/tiny.yaml", "stage.trainable", ["*"], r"stage is stated here, but it belongs in the files built on"),
        ("mllm/qwen2_5_3b.yaml", "loop.output_dir", "runs/x", r"loop\.output_dir is stated here"),
        ("eval/shapes.yaml", "world_sead", 1, r"unknown key 'world_sead'"),
        ("eval/shapes.yaml", "geneval.temprature", 0.5, r"unknown key geneval\.temprature"),
        ("eval/shapes.yaml", "shapes_vqa.per_category", 4, r"unknown key shapes_vqa\.per_category"),
        ("eval/shapes.yaml", "geneval", 3, r"geneval must map the task's options"),
        (
            "eval/floors.yaml",
            "llm_micro.floors.val_t2i_txt_acc",
            0.5,
            r"unknown metric llm_micro\.floors\.val_t2i_txt_acc",
        ),
        ("eval/floors.yaml", "llm_micro.step", 150, r"unknown key llm_micro\.step;"),
        ("eval/floors.yaml", "llm_mikro", {}, r"unknown key 'llm_mikro'"),
        ("eval/floors.yaml", "llm_micro.ceilings.val_t2i_text", "low", r"val_t2i_text='low'; expected a number"),
    ],
)
def test_an_unknown_or_misplaced_key_is_named(tmp_path: Path, name: str, key: str, value: Any, message: str) -> None:
    path = _copy_with(tmp_path, name, lambda data: _set(data, key, value))
    with pytest.raises(ConfigError, match=message):
        check_config_file(path, schema_for(name))


@pytest.mark.parametrize(
    ("name", "key", "message"),
    [
        ("tokenizer/tiny.yaml", "loop.output_dir", r"missing loop\.output_dir; every stage-1 tokenizer file states it"),
        ("tokenizer/tiny_decoder_grid.yaml", "loop.output_dir", r"missing loop\.output_dir"),  # its base: has one
        ("tokenizer/tiny.yaml", "teacher_path", r"missing teacher_path"),
        (
            "tokenizer/so400m_384_rvq8.yaml",
            "tokenizer.pixel_quantizer.depth",
            r"missing tokenizer\.pixel_quantizer\.depth",
        ),
        ("tokenizer/tiny_teacher.yaml", "teacher", r"missing teacher\.vision"),
        ("stages/tiny/align.yaml", "stage.trainable", r"missing stage\.trainable"),
        ("stages/tiny/align.yaml", "stage.init", r"missing stage\.init"),
        ("stages/qwen2_5_3b/joint.yaml", "loop.output_dir", r"missing loop\.output_dir"),
        ("stages/qwen2_5_3b/generate.yaml", "data.mix", r"missing data\.mix"),
        ("mllm/tiny.yaml", "data.codes", r"missing data\.codes"),
        ("eval/shapes.yaml", "world_seed", r"missing world_seed"),
        ("eval/shapes.yaml", "version", r"settings version None"),
        ("eval/floors.yaml", "llm_micro.ceilings", r"missing llm_micro\.ceilings"),
    ],
)
def test_a_missing_key_is_named(tmp_path: Path, name: str, key: str, message: str) -> None:
    path = _copy_with(tmp_path, name, lambda data: _drop(data, key))
    with pytest.raises(ConfigError, match=message):
        check_config_file(path, schema_for(name))


# ------------------------------------------------------------------ the typed loaders' errors
def test_round_trip_through_dict() -> None:
    config = load_config(Stage1Config, ROOT / "configs/tokenizer/tiny.yaml")
    again = config_from_dict(DualTokenizerConfig, config_to_dict(config.tokenizer))
    assert again == config.tokenizer


def test_dotted_override_changes_one_field() -> None:
    path = ROOT / "configs/tokenizer/tiny.yaml"
    config = load_config(Stage1Config, path, ["tokenizer.pixel_quantizer.depth=2", "loop.max_steps=7"])
    assert config.tokenizer.pixel_quantizer.depth == 2
    assert config.loop.max_steps == 7
    assert (
        config.tokenizer.semantic_quantizer.depth == load_config(Stage1Config, path).tokenizer.semantic_quantizer.depth
    )


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key tokenizer\.pixel_quantizer\.codebook_sise"):
        load_config(Stage1Config, ROOT / "configs/tokenizer/tiny.yaml", ["tokenizer.pixel_quantizer.codebook_sise=8"])


def test_layer_out_of_range_names_the_field_and_the_depth() -> None:
    with pytest.raises(ConfigError, match=r"tokenizer\.taps\.semantic_layer=30 but the backbone has 27 layers"):
        load_config(Stage1Config, ROOT / "configs/tokenizer/so400m_384_rvq8.yaml", ["tokenizer.taps.semantic_layer=30"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tokenizer.taps.pixel_layer=-1", "pixel_layer=-1"),
        ("tokenizer.pixel_quantizer.codebook_size=0", "codebook_size=0"),
        ("tokenizer.backbone.patch_size=100", "tokenizer.backbone.image_size=64 is smaller"),
        ("loop.precision=fp8", "precision"),
        ("optim.lr=-1", "optim.lr"),
        ("tokenizer.pixel_quantizer.depth=two", "expected an integer"),
    ],
)
def test_bad_values_fail_with_the_field_name(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(Stage1Config, ROOT / "configs/tokenizer/tiny.yaml", [override])


def test_semantic_before_pixel_is_rejected() -> None:
    with pytest.raises(ConfigError, match="semantic_layer=2 must be >= taps.pixel_layer=4"):
        TapsConfig(pixel_layer=4, semantic_layer=2)


def test_aux_tap_with_the_patch_embedding_tap_is_rejected() -> None:
    with pytest.raises(ConfigError, match="with taps.pixel_layer=0 .* set taps.pixel_aux_layer to null"):
        TapsConfig(pixel_layer=0, semantic_layer=2, pixel_aux_layer=1)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Stage1Config, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loop: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Stage1Config, bad)


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["loop.max_steps"])
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"loop": 3}, ["loop.max_steps=1"])
