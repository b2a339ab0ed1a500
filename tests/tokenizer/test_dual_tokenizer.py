"""The composed DualTokenizer: API shapes, code paths, save/load, paper configs on meta."""

from pathlib import Path

import pytest
import torch

from tokenizer.config import (
    BackboneConfig,
    DecoderConfig,
    DualTokenizerConfig,
    ProjectionConfig,
    QuantizerConfig,
    TapsConfig,
)
from tokenizer.model import DualTokenizer

ROOT = Path(__file__).resolve().parents[2]


def tiny_config(**overrides) -> DualTokenizerConfig:
    fields = dict(
        backbone=BackboneConfig(
            image_size=32, patch_size=8, hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64
        ),
        taps=TapsConfig(pixel_layer=1, semantic_layer=3),
        projection=ProjectionConfig(kind="mlp", hidden_dim=32),
        pixel_quantizer=QuantizerConfig(codebook_size=32, code_dim=8, depth=3),
        semantic_quantizer=QuantizerConfig(codebook_size=16, code_dim=4, depth=2),
        decoder=DecoderConfig(base_channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1),
    )
    fields.update(overrides)
    return DualTokenizerConfig(**fields)


def images(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_forward_and_public_api_shapes() -> None:
    torch.manual_seed(0)
    model = DualTokenizer(tiny_config())
    output = model(images())
    assert output.reconstruction.shape == (4, 3, 32, 32)
    assert output.pixel_codes.shape == (4, 4, 4, 3)
    assert output.semantic_codes.shape == (4, 4, 4, 2)
    assert output.semantic_tap_features.shape == (4, 16, 32)
    model.eval()
    codes = model.encode(images())
    assert codes.pixel_codes.shape == (4, 4, 4, 3) and codes.pixel_codes.dtype == torch.long
    assert int(codes.pixel_codes.max()) < 32 and int(codes.semantic_codes.max()) < 16
    decoded = model.decode(codes.pixel_codes)
    assert decoded.shape == (4, 3, 32, 32) and decoded.min() >= -1 and decoded.max() <= 1


@pytest.mark.parametrize("pixel_layer", [0, 1])
def test_pixel_codes_from_the_patch_embedding_move_with_the_content(pixel_layer: int) -> None:
    """``taps.pixel_layer: 0`` taps the patch embedding before the position embedding: an image
    moved by whole patches gets the same pixel codes, moved. From block 1 on (the paper's kind of
    tap) a patch's codes depend on where it is and on the other patches, so they change."""
    torch.manual_seed(0)
    model = DualTokenizer(tiny_config(taps=TapsConfig(pixel_layer=pixel_layer, semantic_layer=3)))
    model(images(8))  # k-means initialisation of both codebooks
    model.eval()
    x = images(4, seed=1)
    codes = model.encode(x).pixel_codes  # (B, 4, 4, depth)
    moved = model.encode(torch.roll(x, shifts=(8, 16), dims=(2, 3))).pixel_codes
    same = bool(torch.equal(moved, torch.roll(codes, shifts=(1, 2), dims=(1, 2))))
    assert same is (pixel_layer == 0)
    # the training forward runs and reaches the patch projection through the pixel branch
    model.train()
    output = model(x)
    output.reconstruction.square().mean().backward()
    weight = model.backbone._tower.embeddings.patch_embedding.weight
    assert weight.grad is not None and float(weight.grad.abs().sum()) > 0


def test_encode_decode_matches_the_training_forward_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = DualTokenizer(tiny_config())
    model(images())  # k-means initialisation of both codebooks
    model.eval()
    with torch.no_grad():
        output = model(images(seed=1))
    codes = model.encode(images(seed=1))
    assert torch.equal(codes.pixel_codes, output.pixel_codes)
    assert torch.equal(codes.semantic_codes, output.semantic_codes)
    torch.testing.assert_close(model.decode(codes.pixel_codes), output.reconstruction.clamp(-1, 1))
    torch.testing.assert_close(model.semantic_features(codes.semantic_codes).pooled, output.semantic_pooled)


def test_decode_can_stop_after_the_first_depths() -> None:
    """``decode(codes, depths=k)`` draws the sum of the first k RVQ levels: all of them by
    default, and the later levels' codes do not matter below them."""
    torch.manual_seed(0)
    model = DualTokenizer(tiny_config())
    model(images())
    model.eval()
    codes = model.encode(images(seed=1)).pixel_codes
    depth = codes.shape[-1]
    assert torch.equal(model.decode(codes, depths=depth), model.decode(codes))
    changed = codes.clone()
    changed[..., 1:] = (changed[..., 1:] + 1) % model.config.pixel_quantizer.codebook_size
    assert torch.equal(model.decode(changed, depths=1), model.decode(codes, depths=1))
    assert not torch.equal(model.decode(codes, depths=1), model.decode(codes))
    for bad in (0, depth + 1, True, 1.5):
        with pytest.raises(ValueError, match=rf"depths={bad!r}; expected None \(all\) or an integer in \[1, {depth}\]"):
            model.decode(codes, depths=bad)


def test_gradients_reach_backbone_from_both_branches() -> None:
    torch.manual_seed(0)
    model = DualTokenizer(tiny_config())
    output = model(images())
    output.reconstruction.pow(2).mean().backward(retain_graph=True)
    first_block = model.backbone.embed  # noqa: F841 - documents what "shallow" means here
    shallow_grad = [p.grad for n, p in model.backbone.named_parameters() if "layers.0." in n and p.grad is not None]
    assert shallow_grad and any(g.abs().sum() > 0 for g in shallow_grad)
    deep = [p for n, p in model.backbone.named_parameters() if "layers.2." in n]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in deep), "pixel loss must not reach blocks past the tap"
    model.zero_grad()
    output.semantic_pooled.pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in deep)


def test_shared_codebook_ablation_decodes_semantic_codes() -> None:
    torch.manual_seed(0)
    model = DualTokenizer(tiny_config(shared_codebook=True))
    assert model.pixel_quantizer is None
    output = model(images())
    assert torch.equal(output.pixel_codes, output.semantic_codes)
    model.eval()
    codes = model.encode(images())
    assert model.decode(codes.pixel_codes).shape == (4, 3, 32, 32)


def test_pixel_aux_tap() -> None:
    torch.manual_seed(0)
    model = DualTokenizer(tiny_config(taps=TapsConfig(pixel_layer=2, semantic_layer=3, pixel_aux_layer=1)))
    assert model.pixel_aux is not None
    model(images()).reconstruction.mean().backward()
    assert model.pixel_aux.weight.grad is not None


def test_save_load_round_trip_gives_identical_codes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DualTokenizer(tiny_config())
    model(images())
    model.eval()
    directory = model.save_pretrained(tmp_path / "tok")
    loaded = DualTokenizer.from_pretrained(directory)
    before, after = model.encode(images(seed=3)), loaded.encode(images(seed=3))
    assert torch.equal(before.pixel_codes, after.pixel_codes)
    assert torch.equal(before.semantic_codes, after.semantic_codes)
    assert torch.equal(model.decode(before.pixel_codes), loaded.decode(after.pixel_codes))
    # Saving again over the same folder replaces it whole (no stale staging folders left).
    model.save_pretrained(directory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_read_config_reads_a_saved_tokenizer_without_building_it(tmp_path: Path) -> None:
    config = tiny_config()
    directory = DualTokenizer(config).save_pretrained(tmp_path / "tok")
    read = DualTokenizer.read_config(directory)
    assert read == DualTokenizer.from_pretrained(directory).config
    assert read.pixel_depth == DualTokenizer(config).pixel_depth == config.pixel_quantizer.depth
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        DualTokenizer.read_config(tmp_path)


def test_from_pretrained_names_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        DualTokenizer.from_pretrained(tmp_path)


def test_bad_inputs_name_the_problem() -> None:
    model = DualTokenizer(tiny_config()).eval()
    with pytest.raises(ValueError, match="expects 32x32"):
        model.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="pixel_codes must have shape"):
        model.decode(torch.zeros(1, 4, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 32\)"):
        model.decode(torch.full((1, 4, 4, 3), 99, dtype=torch.long))


@pytest.mark.parametrize(
    ("name", "backbone_millions", "pixel_depth"),
    # SigLIP so400m/14-384's vision tower has ~428 M parameters and SigLIP-L/16-256's ~316 M
    # (public model cards); the rest is projections, codebooks and the decoder.
    [("so400m_384_rvq8.yaml", (426, 430), 8), ("siglip_l16_256_rvq4.yaml", (314, 318), 4)],
)
def test_paper_configs_build_on_meta_with_expected_sizes(name: str, backbone_millions, pixel_depth: int) -> None:
    from training.config import load_config
    from training.tokenizer_config import Stage1Config

    config = load_config(Stage1Config, ROOT / "configs" / "tokenizer" / name).tokenizer
    with torch.device("meta"):
        model = DualTokenizer(config)
    backbone = sum(p.numel() for p in model.backbone.parameters()) / 1e6
    assert backbone_millions[0] <= backbone <= backbone_millions[1], backbone
    assert model.pixel_quantizer.codebook.shape == (16384, 32)
    assert model.pixel_depth == pixel_depth
    decoder = sum(p.numel() for p in model.decoder.parameters()) / 1e6
    assert 20 < decoder < 200, decoder
