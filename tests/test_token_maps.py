"""Token influence maps: what each projector's image tokens read, measured with autograd on the real modules."""

import pytest
import torch
from conftest import tiny_config
from PIL import Image

from hf_vlm.modeling import PROJECTORS
from hf_vlm.projector_study import DESIGNS
from hf_vlm.token_maps import draw_token_maps, shown_tokens, token_influence


def influence_of(name: str) -> torch.Tensor:
    """(M, 16) influence of a seeded random projector of design `name` on random features of a 4 x 4 grid."""
    torch.manual_seed(0)
    config = tiny_config(**DESIGNS[name])
    projector = PROJECTORS[config.projector_type](config)
    return token_influence(projector, torch.randn(1, config.vision_num_patches, config.vision_feature_size))


@pytest.mark.parametrize("name", ["linear", "mlp", "pixel_shuffle_r1"])
def test_per_patch_projectors_map_patch_n_to_token_n_only(name):
    """linear, mlp and pixel shuffle at factor 1 read one patch per token: the influence is the identity."""
    assert torch.equal(influence_of(name) > 0, torch.eye(16, dtype=torch.bool))


@pytest.mark.parametrize("name", ["pixel_shuffle_r2", "pixel_shuffle_r2_no_norm"])
def test_pixel_shuffle_gathers_each_2x2_block_into_one_token(name):
    """Factor 2 on a 4 x 4 grid: token 0 reads patches 0, 1, 4, 5 (the top-left block), token 3 the bottom-right."""
    read = [(row > 0).nonzero().flatten().tolist() for row in influence_of(name)]
    assert read == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


@pytest.mark.parametrize("name", ["c_abstractor_4", "resampler_4", "resampler_16"])
def test_convolving_and_attending_projectors_let_every_token_read_every_patch(name):
    """The C-Abstractor's 3 x 3 convolutions span a 4 x 4 grid, and attention reads all keys: no zero influence."""
    assert (influence_of(name) > 0).all()


def test_rows_are_scaled_to_one_and_the_figure_is_written(tmp_path):
    """Each token's map peaks at 1; the figure has a row per design and is a non-empty PNG."""
    maps = {name: influence_of(name) for name in ("mlp", "pixel_shuffle_r2", "resampler_4")}
    assert all(torch.allclose(m.amax(dim=1), torch.ones(len(m))) for m in maps.values())
    draw_token_maps(maps, Image.new("RGB", (16, 16), "red"), tmp_path / "maps.png")
    assert Image.open(tmp_path / "maps.png").size[1] > 0
    assert shown_tokens(16) == [0, 5, 10, 15] and shown_tokens(4) == [0, 1, 2, 3]  # the 4 x 4 grid's diagonal
