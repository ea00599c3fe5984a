"""Exercise: write the projector of a vision-language model, three ways.

You have a language model that reads token embeddings (a GPT, fine-tuned with SFT and RLHF). A VLM adds a
vision tower, which turns an image into N patch vectors of width C. The projector is the bridge between the two:
it maps one image's patch features, a (B, N, C) tensor, to M image tokens, a (B, M, D) tensor where D is the
language model's width. The model writes those M vectors into the prompt where the image placeholders are, and
from there on the language model reads them as it reads the rows of its token embedding table. Training stage 1
(alignment) trains the projector alone, with the tower and the language model frozen; the checker does the same
for a few steps to see that yours learns.

You write three projectors, in the places marked TODO:
  1. LinearProjector: one Linear per patch, as in LLaVA.
  2. MLPProjector: Linear -> GELU -> Linear per patch, as in LLaVA-1.5.
  3. CompressingProjector: pixel shuffle, so 4x fewer tokens, then one Linear, as in InternVL and SmolVLM.

Each follows the contract of the library's projectors (src/hf_vlm/modeling/projectors.py), so that it plugs
into `VLMForConditionalGeneration` through the `PROJECTORS` dict:
  - `__init__(self, config)` takes the `VLMConfig`; the sizes come from it (`projector_sizes` below).
  - `forward(features)` maps (B, N, C) to (B, M, D).
  - `num_tokens(config, num_patches)` says M for N patches without running anything: the processor asks it how
    many placeholders to put in the prompt for each image.

Check your work with `python docs/exercises/check_exercise.py` (or `pytest docs/exercises`); it tells you what
it expected and what it got. The reference solutions are in docs/exercises/solutions/projector_exercise.py: try
first, then compare.
"""

import math

import torch
from torch import nn


def projector_sizes(config) -> tuple[int, int]:
    """(C, D): the width of the vision features and the width of the language model's embeddings."""
    # vision_feature_size is the tower's width (times the number of tower layers taken, usually one).
    return config.vision_feature_size, config.text_config.hidden_size


class LinearProjector(nn.Module):
    """One Linear map applied to every patch: (B, N, C) -> (B, N, D), as in LLaVA."""

    def __init__(self, config):
        super().__init__()
        in_size, out_size = projector_sizes(config)
        # TODO 1a: make `self.linear`, a Linear layer from in_size to out_size (keep its bias, the default).
        # nn.Linear acts on the last dimension, so one layer maps every patch of every image at once.
        raise NotImplementedError(
            "TODO 1a: in LinearProjector.__init__, make self.linear = nn.Linear(in_size, out_size)"
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # TODO 1b: apply self.linear to the features. (B, N, C) -> (B, N, D)
        raise NotImplementedError("TODO 1b: in LinearProjector.forward, return self.linear(features)")

    @staticmethod
    def num_tokens(config, num_patches: int) -> int:
        # TODO 1c: how many image tokens does this projector make from num_patches patches?
        raise NotImplementedError("TODO 1c: in LinearProjector.num_tokens, return the number of tokens it emits")


class MLPProjector(nn.Module):
    """Linear -> GELU -> Linear on every patch: (B, N, C) -> (B, N, D), as in LLaVA-1.5.

    The language model's embedding space is not a linear image of the vision tower's, and a hidden layer lets
    the projector bend one into the other. Without the GELU in between, two Linears multiply out to one Linear.
    """

    def __init__(self, config):
        super().__init__()
        in_size, out_size = projector_sizes(config)
        # TODO 2a: make `self.linear_1` (in_size -> out_size), `self.act` (nn.GELU()) and `self.linear_2`
        # (out_size -> out_size). These are the names of transformers' Llava projector, so weights could move
        # between the two.
        raise NotImplementedError(
            "TODO 2a: in MLPProjector.__init__, make self.linear_1 (in_size -> out_size), self.act = nn.GELU() "
            "and self.linear_2 (out_size -> out_size)"
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # TODO 2b: linear_1, then act, then linear_2. (B, N, C) -> (B, N, D) -> (B, N, D)
        raise NotImplementedError("TODO 2b: in MLPProjector.forward, apply linear_1, act and linear_2 in turn")

    @staticmethod
    def num_tokens(config, num_patches: int) -> int:
        # TODO 2c: as in 1c.
        raise NotImplementedError("TODO 2c: in MLPProjector.num_tokens, return the number of tokens it emits")


FACTOR = 2  # each FACTOR x FACTOR block of neighbouring patches becomes one token: 4x fewer tokens


class CompressingProjector(nn.Module):
    """Pixel shuffle by 2, then one Linear: (B, N, C) -> (B, N/4, 4C) -> (B, N/4, D), as in InternVL and SmolVLM.

    Every image token is a position the language model attends over, and a 512-pixel image makes 1024 SigLIP
    patches (of 16 pixels): one image can cost more than the whole text. Pixel shuffle keeps all the numbers but
    moves them from the sequence into the channels: the four patches of each 2x2 block of the grid are laid side
    by side in one vector of 4C channels. Neighbours stay together, so the Linear can still see local detail.

    Prefer pooling? Average each 2x2 block instead (nn.functional.avg_pool2d on a (B, C, side, side) grid) and
    make the Linear in_size -> out_size. It throws away detail that pixel shuffle keeps, for 4x fewer weights;
    the checker accepts either design.
    """

    def __init__(self, config):
        super().__init__()
        in_size, out_size = projector_sizes(config)
        # TODO 3a: make `self.linear`, a Linear layer from the shuffled width, FACTOR * FACTOR * in_size, to
        # out_size.
        raise NotImplementedError(
            "TODO 3a: in CompressingProjector.__init__, make self.linear = nn.Linear(FACTOR * FACTOR * in_size, "
            "out_size)"
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, num_patches, channels = features.shape
        side = math.isqrt(num_patches)  # the N patches are a side x side grid, stored row after row
        # TODO 3b: regroup each 2x2 block of neighbouring patches into one token, then apply self.linear:
        #   (B, N, C) -> (B, side/2, 2, side/2, 2, C)   split rows and columns into (block, place in block)
        #             -> (B, side/2, side/2, 2, 2, C)   permute: the four patches of a block next to each other
        #             -> (B, N/4, 4C)                   reshape: one block, one token
        #             -> (B, N/4, D)                    self.linear
        # A plain reshape of (B, N, C) to (B, N/4, 4C) has the right shape too, but it glues together 4 patches
        # of one row, not a 2x2 square. The checker looks for that.
        raise NotImplementedError(
            "TODO 3b: in CompressingProjector.forward, regroup each 2x2 block of patches into one token of 4C "
            f"channels (reshape, permute, reshape), then apply self.linear; here the {batch} images are each a "
            f"{side}x{side} grid of {channels}-channel patches"
        )

    @staticmethod
    def num_tokens(config, num_patches: int) -> int:
        # TODO 3c: how many tokens does it make from num_patches patches?
        raise NotImplementedError("TODO 3c: in CompressingProjector.num_tokens, return the number of tokens it emits")
