"""The tapped ViT must reproduce the library models it wraps, layer by layer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

from tokenizer.backbone import VisionBackbone
from tokenizer.backbone_factory import backbone_num_layers, build_backbone
from tokenizer.config import BackboneConfig, ConfigError
from tokenizer.siglip_backbone import SiglipBackbone
from tokenizer.timm_backbone import TimmBackbone

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64)
ATOL = 1e-5


def tiny_config(**overrides) -> BackboneConfig:
    return BackboneConfig(**{**TINY, **overrides})


def tiny_siglip_vision_config() -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
    )


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 32, 32, generator=generator) * 2 - 1


@pytest.fixture
def siglip() -> SiglipBackbone:
    torch.manual_seed(0)
    return SiglipBackbone.from_config(tiny_config()).eval()


# ----------------------------------------------------------------------------- SigLIP


def test_siglip_taps_match_hf_hidden_states_at_every_layer(siglip: SiglipBackbone) -> None:
    x = images()
    with torch.no_grad():
        reference = siglip.vision_model(pixel_values=x, output_hidden_states=True)
        taps = siglip.forward_taps(x, range(siglip.num_layers + 1))
    assert len(reference.hidden_states) == siglip.num_layers + 1
    for layer in range(siglip.num_layers + 1):
        torch.testing.assert_close(taps[layer], reference.hidden_states[layer], atol=ATOL, rtol=0)
    # One tap at a time gives the same tensors as the multi-tap pass.
    with torch.no_grad():
        single = siglip.forward_taps(x, [2])
    assert list(single) == [2]
    torch.testing.assert_close(single[2], reference.hidden_states[2], atol=ATOL, rtol=0)


def test_siglip_pooled_matches_hf_pooler_output(siglip: SiglipBackbone) -> None:
    x = images()
    with torch.no_grad():
        reference = siglip.vision_model(pixel_values=x).pooler_output
        # Split the trunk the way DualToken does: stop at a tap, resume, then pool.
        hidden = siglip.run_blocks(siglip.embed(x), 0, 2)
        pooled = siglip.head(siglip.run_blocks(hidden, 2, siglip.num_layers))
        output = siglip(x)
    assert pooled.shape == (2, 32)
    torch.testing.assert_close(pooled, reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(output.pooled, reference, atol=ATOL, rtol=0)


def test_siglip_without_head_mean_pools_the_post_norm_tokens() -> None:
    config = tiny_siglip_vision_config()
    config.vision_use_head = False
    backbone = SiglipBackbone(SiglipVisionModel(config)).eval()
    x = images()
    with torch.no_grad():
        reference = backbone.vision_model(pixel_values=x).last_hidden_state.mean(dim=1)
        pooled = backbone(x).pooled
    torch.testing.assert_close(pooled, reference, atol=ATOL, rtol=0)


def test_siglip_image_size_need_not_be_a_multiple_of_the_patch_size() -> None:
    # Like so400m/14 at 384 px (27 x 27 patches): 36 px with 8 px patches gives a 4 x 4 grid.
    torch.manual_seed(0)
    config = tiny_siglip_vision_config()
    config.image_size = 36
    backbone = SiglipBackbone(SiglipVisionModel(config)).eval()
    assert (backbone.grid_size, backbone.num_patches) == (4, 16)
    x = torch.rand(2, 3, 36, 36) * 2 - 1
    with torch.no_grad():
        reference = backbone.vision_model(pixel_values=x, output_hidden_states=True)
        taps = backbone.forward_taps(x, [3])
    torch.testing.assert_close(taps[3], reference.hidden_states[3], atol=ATOL, rtol=0)
    assert backbone.tokens_to_grid(taps[3]).shape == (2, 32, 4, 4)


def test_siglip_sizes_come_from_the_config(siglip: SiglipBackbone) -> None:
    assert (siglip.num_layers, siglip.hidden_size, siglip.num_prefix_tokens) == (3, 32, 0)
    assert (siglip.image_size, siglip.patch_size, siglip.grid_size) == (32, 8, 4)
    assert siglip.hf_config.num_hidden_layers == 3
    assert siglip.hf_config.intermediate_size == 64


def test_from_siglip_model_shares_parameters_and_accepts_a_full_siglip_model() -> None:
    torch.manual_seed(0)
    full = SiglipModel(_tiny_full_siglip_config()).eval()
    backbone = SiglipBackbone.from_siglip_model(full)
    assert backbone.vision_model is full.vision_model
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(backbone(x).pooled, full.get_image_features(pixel_values=x).pooler_output)
    with pytest.raises(TypeError, match="not a SigLIP vision model"):
        SiglipBackbone.from_siglip_model(torch.nn.Linear(2, 2))


def test_bad_inputs_raise_clear_errors(siglip: SiglipBackbone) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        siglip.embed(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="expects 32x32"):
        siglip.embed(torch.zeros(2, 3, 64, 64))
    hidden = siglip.embed(images())
    with pytest.raises(ValueError, match="start=2, end=1"):
        siglip.run_blocks(hidden, 2, 1)
    with pytest.raises(ValueError, match="num_layers=3"):
        siglip.run_blocks(hidden, 0, 4)
    with pytest.raises(ValueError, match=r"\(B, 16, 32\)"):
        siglip.run_blocks(hidden[:, :5], 0, 1)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        siglip.forward_taps(images(), [4])
    with pytest.raises(ConfigError, match="pretrained_path"):
        SiglipBackbone.from_config(tiny_config(pretrained_path="somewhere"))


# ----------------------------------------------------------------------------- grid


@pytest.mark.parametrize("kind", ["siglip", "timm"])
def test_grid_round_trip(kind: str) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(tiny_config(kind=kind, timm_model_name="deit_tiny_patch16_224")).eval()
    with torch.no_grad():
        hidden = backbone.run_blocks(backbone.embed(images()), 0, 1)
    grid = backbone.tokens_to_grid(hidden)
    assert grid.shape == (2, 32, 4, 4)
    # Raster order: token (row r, column c) sits at grid[..., r, c].
    prefix = backbone.num_prefix_tokens
    torch.testing.assert_close(grid[:, :, 1, 2], hidden[:, prefix + 1 * 4 + 2])
    torch.testing.assert_close(backbone.grid_to_tokens(grid, like=hidden), hidden, atol=0, rtol=0)
    # The prefix comes from `like`, not from the grid.
    other = torch.randn_like(hidden)
    rebuilt = backbone.grid_to_tokens(grid, like=other)
    torch.testing.assert_close(rebuilt[:, :prefix], other[:, :prefix], atol=0, rtol=0)
    torch.testing.assert_close(rebuilt[:, prefix:], hidden[:, prefix:], atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"\(B, 32, 4, 4\)"):
        backbone.grid_to_tokens(grid[:, :, :3], like=hidden)


@pytest.mark.parametrize("kind", ["siglip", "timm"])
def test_patch_features_are_the_patch_projection_alone(kind: str) -> None:
    """``patch_features`` (``taps.pixel_layer: 0``): one token per patch, no prefix, no position
    embedding, so moving the image by whole patches moves the features with it."""
    torch.manual_seed(0)
    backbone = build_backbone(tiny_config(kind=kind, timm_model_name="deit_tiny_patch16_224")).eval()
    x = images()
    with torch.no_grad():
        features = backbone.patch_features(x)
        rolled = backbone.patch_features(torch.roll(x, shifts=(8, 16), dims=(2, 3)))  # 1 row, 2 columns of patches
        embedded = backbone.embed(x)[:, backbone.num_prefix_tokens :]
    assert features.shape == (2, 16, 32)
    grid, grid_rolled = features.view(2, 4, 4, 32), rolled.view(2, 4, 4, 32)
    torch.testing.assert_close(grid_rolled, torch.roll(grid, shifts=(1, 2), dims=(1, 2)))
    # embed() adds the position embedding on top: the same tokens, moved by it
    assert float((embedded - features).abs().max()) > 1e-3
    with pytest.raises(ValueError, match=r"images must have shape"):
        backbone.patch_features(x[:, :2])


@pytest.mark.parametrize(
    ("kind", "timm_name"),
    [
        ("siglip", "deit_tiny_patch16_224"),
        ("timm", "deit_tiny_patch16_224"),
        ("timm", "vit_medium_patch16_reg4_gap_256"),
    ],
)
def test_embed_with_patch_features_runs_the_patch_projection_once(kind: str, timm_name: str) -> None:
    """The pair ``taps.pixel_layer: 0`` needs equals ``embed`` and ``patch_features`` called
    apart, from a single pass through the patch projection."""
    torch.manual_seed(0)
    backbone = build_backbone(tiny_config(kind=kind, timm_model_name=timm_name)).eval()
    projection = next(m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d))
    calls = []
    projection.register_forward_hook(lambda *_: calls.append(1))
    x = images()
    with torch.no_grad():
        hidden, patches = backbone.embed_with_patch_features(x)
        assert len(calls) == 1
        torch.testing.assert_close(hidden, backbone.embed(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(patches, backbone.patch_features(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"images must have shape"):
        backbone.embed_with_patch_features(x[:, :2])


# ----------------------------------------------------------------------------- timm

# deit: a CLS token, token pooling, ImageNet mean/std. reg4_gap: 4 register tokens without
# position embeddings, average pooling with fc_norm, mean/std 0.5.
TIMM_MODELS = ["deit_tiny_patch16_224", "vit_medium_patch16_reg4_gap_256"]


def _timm_reference_input(backbone: TimmBackbone, x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> the model's pretrained_cfg normalisation, computed independently of the backbone."""
    cfg = backbone.model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_taps_match_forward_intermediates(name: str) -> None:
    torch.manual_seed(0)
    backbone = TimmBackbone.from_config(tiny_config(kind="timm", timm_model_name=name)).eval()
    expected_prefix = {"deit_tiny_patch16_224": 1, "vit_medium_patch16_reg4_gap_256": 4}[name]
    assert backbone.num_prefix_tokens == expected_prefix
    assert (backbone.num_layers, backbone.hidden_size, backbone.grid_size) == (3, 32, 4)
    x = images()
    reference_input = _timm_reference_input(backbone, x)
    with torch.no_grad():
        taps = backbone.forward_taps(x, [1, 2, 3])
        for layer in (1, 2, 3):
            patches, prefix = backbone.model.forward_intermediates(
                reference_input,
                indices=[layer - 1],
                norm=False,
                output_fmt="NLC",
                intermediates_only=True,
                return_prefix_tokens=True,
            )[0]
            torch.testing.assert_close(taps[layer][:, :expected_prefix], prefix, atol=ATOL, rtol=0)
            torch.testing.assert_close(taps[layer][:, expected_prefix:], patches, atol=ATOL, rtol=0)
            # NCHW intermediates equal the backbone's grid view.
            grid = backbone.model.forward_intermediates(
                reference_input, indices=[layer - 1], norm=False, intermediates_only=True
            )[0]
            torch.testing.assert_close(backbone.tokens_to_grid(taps[layer]), grid, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_head_matches_forward_head_pre_logits(name: str) -> None:
    torch.manual_seed(0)
    backbone = TimmBackbone.from_config(tiny_config(kind="timm", timm_model_name=name)).eval()
    x = images()
    with torch.no_grad():
        model = backbone.model
        reference = model.forward_head(model.forward_features(_timm_reference_input(backbone, x)), pre_logits=True)
        pooled = backbone.head(backbone.run_blocks(backbone.embed(x), 0, backbone.num_layers))
    assert pooled.shape == (2, 32)
    torch.testing.assert_close(pooled, reference, atol=ATOL, rtol=0)


def test_timm_weights_file_round_trip_and_strict_errors(tmp_path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = tiny_config(kind="timm", timm_model_name="deit_tiny_patch16_224")
    source = TimmBackbone.from_config(config).eval()
    state = {key: value.contiguous() for key, value in source.model.state_dict().items()}
    # A classifier in the file is tolerated (the backbone has num_classes=0).
    state_with_head = {**state, "head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)}
    weights = tmp_path / "vit.safetensors"
    save_file(state_with_head, str(weights))
    pth = tmp_path / "vit.pth"
    torch.save({"state_dict": state}, str(pth))
    x = images()
    for path in (weights, pth):
        torch.manual_seed(1)  # a different random init, overwritten by the file
        loaded = build_backbone(
            tiny_config(kind="timm", timm_model_name="deit_tiny_patch16_224", pretrained_path=str(path))
        )
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(x).pooled, source(x).pooled, atol=0, rtol=0)

    broken = dict(state)
    broken.pop("blocks.0.attn.qkv.weight")
    broken["extra.weight"] = torch.zeros(1)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    bad = tiny_config(
        kind="timm", timm_model_name="deit_tiny_patch16_224", pretrained_path=str(tmp_path / "broken.safetensors")
    )
    with pytest.raises(
        ValueError, match=r"missing keys \['blocks.0.attn.qkv.weight'\].*unexpected keys \['extra.weight'\]"
    ):
        build_backbone(bad)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        build_backbone(tiny_config(kind="timm", pretrained_path=str(tmp_path / "nowhere.safetensors")))
    # load_weights=False builds the architecture only.
    assert isinstance(build_backbone(bad, load_weights=False), TimmBackbone)


# ----------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("kind", ["siglip", "timm"])
def test_gradient_checkpointing_gives_same_outputs_and_gradients(kind: str) -> None:
    torch.manual_seed(0)
    plain = build_backbone(tiny_config(kind=kind, timm_model_name="deit_tiny_patch16_224")).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_gradient_checkpointing(True)
    results = []
    for backbone in (plain, checkpointed):
        x = images().requires_grad_(True)
        pooled = backbone(x).pooled
        taps = backbone.forward_taps(x, [1])
        loss = pooled.square().sum() + taps[1].sum()
        loss.backward()
        grads = {name: param.grad.clone() for name, param in backbone.named_parameters() if param.grad is not None}
        results.append((pooled.detach(), x.grad.clone(), grads))
    (pooled_a, input_grad_a, grads_a), (pooled_b, input_grad_b, grads_b) = results
    torch.testing.assert_close(pooled_a, pooled_b, atol=ATOL, rtol=0)
    torch.testing.assert_close(input_grad_a, input_grad_b, atol=ATOL, rtol=1e-4)
    assert grads_a.keys() == grads_b.keys()
    assert any("blocks" in name or "layers" in name for name in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=ATOL, rtol=1e-4, msg=name)


def test_gradient_checkpointing_flag_comes_from_the_config() -> None:
    assert build_backbone(tiny_config(gradient_checkpointing=True)).gradient_checkpointing
    assert not build_backbone(tiny_config()).gradient_checkpointing


# ----------------------------------------------------------------------------- pretrained


def _tiny_full_siglip_config() -> SiglipConfig:
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=64,
        max_position_embeddings=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return SiglipConfig(text_config=text, vision_config=tiny_siglip_vision_config().to_dict())


def test_from_pretrained_vision_model_dir(tmp_path, siglip: SiglipBackbone) -> None:
    siglip.vision_model.save_pretrained(tmp_path / "vision")
    loaded = SiglipBackbone.from_pretrained(str(tmp_path / "vision")).eval()
    assert loaded.num_layers == 3
    x = images()
    with torch.no_grad():
        expected = siglip.forward_taps(x, [1, 3])
        actual = loaded.forward_taps(x, [1, 3])
        torch.testing.assert_close(actual[1], expected[1], atol=0, rtol=0)
        torch.testing.assert_close(loaded(x).pooled, siglip(x).pooled, atol=0, rtol=0)
    # Through the config, as the tokenizer does it.
    config = tiny_config(pretrained_path=str(tmp_path / "vision"), num_layers=2)
    built = build_backbone(config)
    assert isinstance(built, SiglipBackbone) and built.num_layers == 3
    architecture_only = build_backbone(config, load_weights=False)
    assert architecture_only.num_layers == 3
    assert not torch.equal(
        architecture_only.vision_model.embeddings.position_embedding.weight,
        siglip.vision_model.embeddings.position_embedding.weight,
    )


def test_from_pretrained_full_siglip_model_dir_loads_the_vision_tower(tmp_path) -> None:
    torch.manual_seed(0)
    full = SiglipModel(_tiny_full_siglip_config()).eval()
    full.save_pretrained(tmp_path / "full")
    loaded = SiglipBackbone.from_pretrained(str(tmp_path / "full")).eval()
    assert isinstance(loaded.vision_model, SiglipVisionModel)
    assert not any(name.startswith("text_model") for name, _ in loaded.named_parameters())
    x = images()
    with torch.no_grad():
        reference = full.get_image_features(pixel_values=x).pooler_output
        torch.testing.assert_close(loaded(x).pooled, reference, atol=0, rtol=0)
    assert backbone_num_layers(tiny_config(pretrained_path=str(tmp_path / "full"))) == 3


def test_from_pretrained_missing_path_names_it(tmp_path) -> None:
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        SiglipBackbone.from_pretrained(str(missing))
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        build_backbone(tiny_config(pretrained_path=str(missing)))
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        backbone_num_layers(tiny_config(pretrained_path=str(missing)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        SiglipBackbone.from_pretrained(str(tmp_path / "empty"))


def test_from_pretrained_rejects_other_model_types(tmp_path) -> None:
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ValueError, match="clip_vision_model"):
        SiglipBackbone.from_pretrained(str(tmp_path / "clip"))


def test_backbone_num_layers_reads_saved_config(tmp_path) -> None:
    config = tiny_siglip_vision_config()
    config.num_hidden_layers = 5
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 5
    # The size field says 3; the checkpoint wins.
    assert backbone_num_layers(tiny_config(pretrained_path=str(tmp_path))) == 5
    assert backbone_num_layers(tiny_config()) == 3
    assert backbone_num_layers(tiny_config(kind="timm", num_layers=4)) == 4


def test_build_backbone_dispatches_on_kind() -> None:
    assert isinstance(build_backbone(tiny_config()), SiglipBackbone)
    timm_backbone = build_backbone(tiny_config(kind="timm", timm_model_name="deit_tiny_patch16_224"))
    assert isinstance(timm_backbone, TimmBackbone) and isinstance(timm_backbone, VisionBackbone)
    # Buffers derived from the model name stay out of the state dict (timm-compatible keys).
    assert all(key.startswith("model.") for key in timm_backbone.state_dict())
