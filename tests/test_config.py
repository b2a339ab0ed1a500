"""Every YAML in configs/ loads into its dataclasses; bad values fail with clear messages."""

from pathlib import Path

import pytest

from tokenizer.config import ConfigError, DualTokenizerConfig, TapsConfig, config_from_dict, config_to_dict
from training.config import apply_overrides, load_config, read_yaml

ROOT = Path(__file__).resolve().parents[1]


def _config_class(path: Path):
    from training.train_teacher import Stage0Config
    from training.train_tokenizer import Stage1Config

    data = read_yaml(path)
    return Stage0Config if "teacher" in data else Stage1Config


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "tokenizer").glob("*.yaml")), ids=lambda p: p.name)
def test_every_tokenizer_yaml_loads(path: Path) -> None:
    config = load_config(_config_class(path), path)
    assert config.loop.max_steps >= 1


def test_every_yaml_file_is_covered() -> None:
    # A YAML dropped somewhere new under configs/ must get a loader test too.
    covered = set((ROOT / "configs" / "tokenizer").glob("*.yaml"))
    assert covered and covered == set((ROOT / "configs").rglob("*.yaml")) - _other_yaml()


def _other_yaml() -> set[Path]:
    return {p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "tokenizer"}


def test_round_trip_through_dict() -> None:
    config = load_config(_config_class(ROOT / "configs/tokenizer/tiny.yaml"), ROOT / "configs/tokenizer/tiny.yaml")
    again = config_from_dict(DualTokenizerConfig, config_to_dict(config.tokenizer))
    assert again == config.tokenizer


def test_dotted_override_changes_one_field() -> None:
    from training.train_tokenizer import Stage1Config

    path = ROOT / "configs/tokenizer/tiny.yaml"
    config = load_config(Stage1Config, path, ["tokenizer.pixel_quantizer.depth=2", "loop.max_steps=7"])
    assert config.tokenizer.pixel_quantizer.depth == 2
    assert config.loop.max_steps == 7
    assert (
        config.tokenizer.semantic_quantizer.depth == load_config(Stage1Config, path).tokenizer.semantic_quantizer.depth
    )


def test_unknown_key_is_named() -> None:
    from training.train_tokenizer import Stage1Config

    with pytest.raises(ConfigError, match=r"unknown config key tokenizer\.pixel_quantizer\.codebook_sise"):
        load_config(Stage1Config, ROOT / "configs/tokenizer/tiny.yaml", ["tokenizer.pixel_quantizer.codebook_sise=8"])


def test_layer_out_of_range_names_the_field_and_the_depth() -> None:
    from training.train_tokenizer import Stage1Config

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
    from training.train_tokenizer import Stage1Config

    with pytest.raises(ConfigError, match=message):
        load_config(Stage1Config, ROOT / "configs/tokenizer/tiny.yaml", [override])


def test_semantic_before_pixel_is_rejected() -> None:
    with pytest.raises(ConfigError, match="semantic_layer=2 must be >= taps.pixel_layer=4"):
        TapsConfig(pixel_layer=4, semantic_layer=2)


def test_aux_tap_with_the_patch_embedding_tap_is_rejected() -> None:
    with pytest.raises(ConfigError, match="with taps.pixel_layer=0 .* set taps.pixel_aux_layer to null"):
        TapsConfig(pixel_layer=0, semantic_layer=2, pixel_aux_layer=1)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    from training.train_tokenizer import Stage1Config

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
