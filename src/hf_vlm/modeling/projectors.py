"""Projectors: map vision features (B, N, C_vision) to image tokens (B, M, C_text).

Each projector is a small module chosen by `VLMConfig.projector_type` through `PROJECTORS`, the one
dispatch table. Each one also says how many tokens it emits for N input patches (`num_tokens`), so
the config can derive `image_seq_length` and the processor never has to guess.

Grid-based projectors (pixel shuffle, C-Abstractor) read the N patches as a square sqrt(N) x sqrt(N)
grid in row-major order, which is how ViT patch sequences and flattened CNN maps are laid out.
"""

import math
from typing import Literal

import torch
from torch import nn


def _projector_sizes(config) -> tuple[int, int]:
    """(input channels, output channels): selected vision layers are concatenated on channels."""
    return config.vision_feature_size, config.text_config.hidden_size


def _square_side(num_patches: int, projector: str) -> int:
    """The side of the patch grid: what `num_tokens` checks and what `forward` reshapes with."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"The {projector!r} projector needs a square grid of patches, got {num_patches} patches; "
            "if the vision tower adds CLS or register tokens, set drop_cls_token=True."
        )
    return side


def _num_heads(width: int) -> int:
    """Heads of about 64 channels that divide `width`: the largest divisor not above width // 64, at least 1.

    `width // 64` alone fails for widths such as 200, 480 or 720; where it divides, it is what this returns.
    """
    return next(heads for heads in range(max(1, width // 64), 0, -1) if width % heads == 0)


class LinearProjector(nn.Module):
    """One linear map per patch, as in LLaVA (https://arxiv.org/abs/2304.08485)."""

    def __init__(self, config):
        super().__init__()
        self.linear = nn.Linear(*_projector_sizes(config))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    @staticmethod
    def num_tokens(config, num_patches: int) -> int:
        return num_patches


class MLPProjector(nn.Module):
    """Linear, GELU, Linear per patch, as in LLaVA-1.5 (https://arxiv.org/abs/2310.03744).

    Parameter names match transformers' `LlavaMultiModalProjector`, so weights move between the two
    without a key map.
    """

    def __init__(self, config):
        super().__init__()
        in_size, out_size = _projector_sizes(config)
        self.linear_1 = nn.Linear(in_size, out_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_size, out_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))

    @staticmethod
    def num_tokens(config, num_patches: int) -> int:
        return num_patches


class PixelShuffleProjector(nn.Module):
    """Space-to-depth by factor r on the patch grid, then LayerNorm and one linear map: r*r fewer tokens.

    As in InternVL (https://arxiv.org/abs/2404.16821) and SmolVLM (https://arxiv.org/abs/2504.05299):
    each r x r block of neighbouring patches becomes one token with r*r times the channels. The
    LayerNorm is InternVL's; it puts features of any encoder (a CNN's unnormalised maps too) on one scale
    (`config.pixel_shuffle_layernorm=False` leaves it out).
    """

    def __init__(self, config):
        super().__init__()
        in_size, out_size = _projector_sizes(config)
        self.factor = config.pixel_shuffle_factor
        self.side = _square_side(config.vision_num_patches, "pixel_shuffle")
        # Identity without it: the study's ablation, and the state dict then holds no norm weights.
        self.norm = nn.LayerNorm(in_size * self.factor**2) if config.pixel_shuffle_layernorm else nn.Identity()
        self.linear = nn.Linear(in_size * self.factor**2, out_size, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, _, channels = features.shape
        r = self.factor
        side = self.side // r
        # (B, N, C) -> (B, side, r, side, r, C) -> (B, side, side, r, r, C) -> (B, side*side, r*r*C)
        blocks = features.reshape(batch, side, r, side, r, channels).permute(0, 1, 3, 2, 4, 5)
        return self.linear(self.norm(blocks.reshape(batch, side * side, r * r * channels)))

    @staticmethod
    def num_tokens(config, num_patches: int) -> int:
        side, r = _square_side(num_patches, "pixel_shuffle"), config.pixel_shuffle_factor
        if side % r:
            raise ValueError(f"pixel_shuffle_factor={r} must divide the patch grid side {side}.")
        return (side // r) ** 2


class _ResidualConvBlock(nn.Module):
    """3x3 conv, norm, SiLU, 3x3 conv, norm, plus a (1x1 conv when channels change) shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(1, out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(1, out_channels),
        )
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class CAbstractorProjector(nn.Module):
    """Honeybee's C-Abstractor (https://arxiv.org/abs/2312.06742): locality-preserving compression.

    Residual conv blocks on the patch grid, adaptive average pooling to a sqrt(M) x sqrt(M) grid, more
    residual conv blocks, then an MLP readout. Honeybee uses RegNet stages; plain residual blocks
    keep the same shape of computation with fewer moving parts.
    """

    def __init__(self, config):
        super().__init__()
        in_size, out_size = _projector_sizes(config)
        self.side = _square_side(config.vision_num_patches, "c_abstractor")
        self.out_side = math.isqrt(config.projector_num_tokens)
        self.before_pool = nn.Sequential(_ResidualConvBlock(in_size, out_size), _ResidualConvBlock(out_size, out_size))
        self.pool = nn.AdaptiveAvgPool2d(self.out_side)
        self.after_pool = nn.Sequential(_ResidualConvBlock(out_size, out_size), _ResidualConvBlock(out_size, out_size))
        self.readout = nn.Sequential(nn.Linear(out_size, out_size), nn.GELU(), nn.Linear(out_size, out_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, _, channels = features.shape
        grid = features.transpose(1, 2).reshape(batch, channels, self.side, self.side)  # (B, C, side, side)
        grid = self.after_pool(self.pool(self.before_pool(grid)))  # (B, D, out_side, out_side)
        return self.readout(grid.flatten(2).transpose(1, 2))  # (B, M, D)

    @staticmethod
    def num_tokens(config, num_patches: int) -> int:
        _square_side(num_patches, "c_abstractor")
        _square_side(config.projector_num_tokens, "c_abstractor output (projector_num_tokens)")
        return config.projector_num_tokens


class ResamplerProjector(nn.Module):
    """M learnable queries cross-attend to the patches, as in Qwen-VL (https://arxiv.org/abs/2308.12966).

    Qwen-VL adds fixed 2-D sin-cos positions to the keys; a learned position table is used here, so
    the resampler also works on sequences with CLS or register tokens.
    """

    def __init__(self, config):
        super().__init__()
        in_size, out_size = _projector_sizes(config)
        self.queries = nn.Parameter(torch.zeros(config.projector_num_tokens, out_size))
        self.key_positions = nn.Parameter(torch.zeros(config.vision_num_patches, out_size))
        self.kv_proj = nn.Linear(in_size, out_size, bias=False)
        self.ln_q = nn.LayerNorm(out_size)
        self.ln_kv = nn.LayerNorm(out_size)
        self.attn = nn.MultiheadAttention(out_size, num_heads=_num_heads(out_size), batch_first=True)
        self.ln_post = nn.LayerNorm(out_size)
        self.proj = nn.Linear(out_size, out_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        values = self.ln_kv(self.kv_proj(features))  # (B, N, D)
        queries = self.ln_q(self.queries).expand(features.shape[0], -1, -1)  # (B, M, D)
        attended, _ = self.attn(queries, values + self.key_positions, values, need_weights=False)
        return self.proj(self.ln_post(attended))  # (B, M, D)

    @staticmethod
    def num_tokens(config, num_patches: int) -> int:
        return config.projector_num_tokens


PROJECTORS = {
    "linear": LinearProjector,
    "mlp": MLPProjector,
    "pixel_shuffle": PixelShuffleProjector,
    "c_abstractor": CAbstractorProjector,
    "resampler": ResamplerProjector,
}

# The config's type for `projector_type`, derived so the names live in one place.
ProjectorType = Literal[tuple(PROJECTORS)]
