"""Reference solutions of docs/exercises/projector_exercise.py: the same classes, the TODOs written.

Check them with `python docs/exercises/check_exercise.py --solutions`.
"""

import math

import torch
from torch import nn


def projector_sizes(config) -> tuple[int, int]:
    """(C, D): the width of the vision features and the width of the language model's embeddings."""
    return config.vision_feature_size, config.text_config.hidden_size


class LinearProjector(nn.Module):
    """One Linear map applied to every patch: (B, N, C) -> (B, N, D), as in LLaVA."""

    def __init__(self, config):
        super().__init__()
        self.linear = nn.Linear(*projector_sizes(config))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    @staticmethod
    def num_tokens(config, num_patches: int) -> int:
        return num_patches  # one token per patch


class MLPProjector(nn.Module):
    """Linear -> GELU -> Linear on every patch: (B, N, C) -> (B, N, D), as in LLaVA-1.5."""

    def __init__(self, config):
        super().__init__()
        in_size, out_size = projector_sizes(config)
        self.linear_1 = nn.Linear(in_size, out_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_size, out_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))

    @staticmethod
    def num_tokens(config, num_patches: int) -> int:
        return num_patches


FACTOR = 2  # each FACTOR x FACTOR block of neighbouring patches becomes one token: 4x fewer tokens


class CompressingProjector(nn.Module):
    """Pixel shuffle by 2, then one Linear: (B, N, C) -> (B, N/4, 4C) -> (B, N/4, D), as in InternVL and SmolVLM."""

    def __init__(self, config):
        super().__init__()
        in_size, out_size = projector_sizes(config)
        self.linear = nn.Linear(FACTOR * FACTOR * in_size, out_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, num_patches, channels = features.shape
        side = math.isqrt(num_patches)  # the N patches are a side x side grid, stored row after row
        blocks = side // FACTOR
        # (B, N, C) -> (B, blocks, 2, blocks, 2, C) -> (B, blocks, blocks, 2, 2, C) -> (B, N/4, 4C)
        grid = features.reshape(batch, blocks, FACTOR, blocks, FACTOR, channels).permute(0, 1, 3, 2, 4, 5)
        return self.linear(grid.reshape(batch, blocks * blocks, FACTOR * FACTOR * channels))  # (B, N/4, D)

    @staticmethod
    def num_tokens(config, num_patches: int) -> int:
        return num_patches // (FACTOR * FACTOR)
