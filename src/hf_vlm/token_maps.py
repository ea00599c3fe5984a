"""What each image token reads: a projector's patch-to-token influence, measured with autograd and drawn.

For image token m and patch n the influence is the size of the gradient of token m (its squared norm) with
respect to patch n's features: zero when the token never looks at the patch. It is measured on the real module
with real features, so the picture is what the projector does, not a diagram of what it should do: a linear or
MLP projector maps patch n to token n only; pixel shuffle gathers each 2 x 2 block into one token; the
C-Abstractor's convolutions reach past their pooling window, strongest inside it; a resampler's queries may read
any patch, with weights it learned.
"""

import math

import torch


def token_influence(projector: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """(M, N) influence of each of the N patches on each of the M tokens, each row scaled to a maximum of 1.

    Args:
        projector: a module from `PROJECTORS` (or any (1, N, C) -> (1, M, D) map).
        features: (1, N, C), what `get_vision_features` returns for one image.
    """
    features = features.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        tokens = projector(features)[0]  # (M, D)
        rows = []
        for token in tokens:
            (gradient,) = torch.autograd.grad(token.pow(2).sum(), features, retain_graph=True)
            rows.append(gradient[0].norm(dim=-1))  # (N,)
    influence = torch.stack(rows)
    return influence / influence.amax(dim=1, keepdim=True).clamp_min(1e-12)


def shown_tokens(num_tokens: int, count: int = 4) -> list[int]:
    """`count` tokens spread evenly from the first to the last: the diagonal of a 4 x 4 token grid."""
    if num_tokens <= count:
        return list(range(num_tokens))
    return [round(i * (num_tokens - 1) / (count - 1)) for i in range(count)]


def draw_token_maps(maps: dict[str, torch.Tensor], image, path, count: int = 4) -> None:
    """One row per design: the image, then the patch-grid influence map of up to `count` of its tokens.

    Args:
        maps: design name -> its `token_influence` (M, N) on `image`; N must be a square grid.
        image: the PIL image the features came from.
        path: where the PNG goes.
    """
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, no pyplot state

    figure = Figure(figsize=(1.7 * (count + 1), 1.75 * len(maps)), layout="constrained")
    axes = figure.subplots(len(maps), count + 1, squeeze=False)
    for row, (name, influence) in zip(axes, maps.items()):
        num_tokens, num_patches = influence.shape
        side = math.isqrt(num_patches)
        row[0].imshow(image)
        for line in range(1, side):  # the patch grid over the image
            row[0].axhline(line * image.height / side - 0.5, color="grey", linewidth=0.5)
            row[0].axvline(line * image.width / side - 0.5, color="grey", linewidth=0.5)
        row[0].set_ylabel(f"{name}\n{num_tokens} tokens", fontsize=8)
        for column, token in zip(row[1:], shown_tokens(num_tokens, count)):
            column.imshow(influence[token].reshape(side, side).numpy(), cmap="magma", vmin=0, vmax=1)
            column.set_title(f"token {token}", fontsize=8)
        for axis in row:
            axis.set_xticks([])
            axis.set_yticks([])
        for axis in row[1 + min(num_tokens, count) :]:
            axis.set_visible(False)
    figure.suptitle(f"Which of the {side} x {side} patches each image token reads (bright: more)", fontsize=10)
    figure.savefig(path, dpi=110)
