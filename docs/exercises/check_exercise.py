"""Check the projectors of docs/exercises/projector_exercise.py, part by part, and say what is still wrong.

    python docs/exercises/check_exercise.py               # your exercise
    python docs/exercises/check_exercise.py --solutions   # the reference solutions
    pytest docs/exercises                                 # the same checks as tests (add --solutions)

Each part is checked in order: it builds from a `VLMConfig`, makes the right output shape, says how many tokens
it emits, has the parameter count its design implies, mixes only the patches it should, is linear or not as
its design says, keeps the dtype, plugs into `VLMForConditionalGeneration` through `PROJECTORS`, and lowers the
loss in 10 training steps. A part stops at its first failed check, and the failure says what was expected, what
came, and a hint. The exit status is 0 when every part passes.
"""

import argparse
import contextlib
import importlib.util
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import LlamaConfig, SiglipVisionConfig

from hf_vlm import PROJECTORS, VLMConfig, VLMForConditionalGeneration

HERE = Path(__file__).resolve().parent
EXERCISE = HERE / "projector_exercise.py"
SOLUTIONS = HERE / "solutions" / "projector_exercise.py"

IMAGE_TOKEN_ID = 127  # the last id of the tiny vocabulary, reserved for image placeholders
BATCH = 2
TRAINING_STEPS = 10


def tiny_config(projector_type: str) -> VLMConfig:
    """A random SigLIP tower (16-pixel images, 4-pixel patches: a 4x4 grid of N=16 patches, width C=32) and a
    random Llama of width D=64, 2 layers each. The widths differ so that a swapped size shows."""
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return VLMConfig(
        vision_config=vision, text_config=text, projector_type=projector_type, image_token_id=IMAGE_TOKEN_ID
    )


@contextlib.contextmanager
def registered_as(name: str, projector_class: type):
    """`PROJECTORS[name]` is `projector_class` inside the block; afterwards the entry is what it was (or gone).

    `VLMConfig.projector_type` is a `Literal` of the names `PROJECTORS` held when hf_vlm was imported, so a config
    cannot name a new entry. Each part therefore takes the place of the built-in projector of its design
    ("linear", "mlp", "pixel_shuffle") for the duration of a check. That is the same path a new name would take:
    the config asks `PROJECTORS[name].num_tokens` for `image_seq_length` and `VLMModel` builds
    `PROJECTORS[name](config)`.
    """
    missing = object()
    previous = PROJECTORS.get(name, missing)
    PROJECTORS[name] = projector_class
    try:
        yield
    finally:
        if previous is missing:
            del PROJECTORS[name]
        else:
            PROJECTORS[name] = previous


@dataclass(frozen=True)
class Part:
    """One projector of the exercise and what its design implies."""

    number: int
    title: str
    class_name: str
    builtin: str  # the PROJECTORS entry whose place it takes in the model checks
    patches_per_token: int
    parameter_counts: dict[str, Callable[[int, int], int]]  # design -> its parameter count from (C, D)
    affine: bool  # whether the design is one linear map (plus a bias) of its input

    @property
    def name(self) -> str:
        return f"Part {self.number}: {self.title} ({self.class_name})"


PARTS = [
    Part(
        1,
        "linear projection",
        "LinearProjector",
        builtin="linear",
        patches_per_token=1,
        parameter_counts={"Linear(C, D)": lambda c, d: c * d + d},
        affine=True,
    ),
    Part(
        2,
        "MLP",
        "MLPProjector",
        builtin="mlp",
        patches_per_token=1,
        parameter_counts={"Linear(C, D), GELU, Linear(D, D)": lambda c, d: (c * d + d) + (d * d + d)},
        affine=False,
    ),
    Part(
        3,
        "token-compressing projector",
        "CompressingProjector",
        builtin="pixel_shuffle",
        patches_per_token=4,
        parameter_counts={
            "pixel shuffle, then Linear(4C, D)": lambda c, d: 4 * c * d + d,
            "2x2 pooling, then Linear(C, D)": lambda c, d: c * d + d,
        },
        affine=True,  # pixel shuffle moves numbers and pooling averages them: both stay linear
    ),
]


class CheckFailed(Exception):
    """A check's verdict: what was expected, what came, and a hint; printed as is, without a traceback."""

    def __init__(self, expected: str, got: str, hint: str):
        super().__init__(expected)
        self.expected, self.got, self.hint = expected, got, hint


def sizes(config: VLMConfig) -> tuple[int, int, int]:
    """(N, C, D): patches per image, vision width, language-model width."""
    return config.vision_num_patches, config.vision_feature_size, config.text_config.hidden_size


def random_features(config: VLMConfig, batch: int = BATCH) -> torch.Tensor:
    num_patches, channels, _ = sizes(config)
    return torch.randn(batch, num_patches, channels, generator=torch.Generator().manual_seed(0))


def build(projector_class: type, config: VLMConfig) -> nn.Module:
    torch.manual_seed(0)
    return projector_class(config).eval()


def check_builds(part, projector_class, config):
    """`projector_class(config)` is an nn.Module with weights."""
    projector = projector_class(config)
    if not isinstance(projector, nn.Module) or not list(projector.parameters()):
        raise CheckFailed(
            "an nn.Module with weights",
            f"{type(projector).__name__} with {len(list(projector.parameters()))} parameter tensors",
            "subclass nn.Module, call super().__init__() first, and assign the layers to attributes of self",
        )


def check_num_tokens(part, projector_class, config):
    """`num_tokens(config, N)` is N, or N / 4 for the compressing part."""
    num_patches = config.vision_num_patches
    expected = num_patches // part.patches_per_token
    got = projector_class.num_tokens(config, num_patches)
    if got != expected:
        fewer = "4x fewer tokens than patches" if part.patches_per_token == 4 else "one token per patch"
        raise CheckFailed(
            f"num_tokens(config, {num_patches}) == {expected}: {fewer}",
            repr(got),
            "num_tokens is a count worked out from num_patches alone; the processor uses it to put that many image "
            "placeholders in the prompt",
        )


def check_output_shape(part, projector_class, config):
    """(B, N, C) features give (B, M, D) tokens."""
    num_patches, channels, width = sizes(config)
    tokens = num_patches // part.patches_per_token
    with torch.no_grad():
        output = build(projector_class, config)(random_features(config))
    expected = (BATCH, tokens, width)
    got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if got != expected:
        raise CheckFailed(
            f"{expected}: (images, tokens, D) for input features ({BATCH}, {num_patches}, {channels}) = (B, N, C)",
            str(got),
            "forward returns one tensor; its last size is the language model's width D, "
            f"config.text_config.hidden_size, and the middle one the number of tokens, {tokens} here",
        )


def check_parameter_count(part, projector_class, config):
    """The parameter count is one of those the part's designs imply."""
    _, channels, width = sizes(config)
    got = sum(p.numel() for p in build(projector_class, config).parameters())
    counts = {design: count(channels, width) for design, count in part.parameter_counts.items()}
    if got not in counts.values():
        designs = " or ".join(f"{count:,} for {design}" for design, count in counts.items())
        raise CheckFailed(
            f"{designs}, with biases (C={channels}, D={width})",
            f"{got:,}",
            "nn.Linear(a, b) has a * b weights and b biases; count the layers your design has and their sizes",
        )


def token_of(part: Part, patch: int, side: int) -> int:
    """The output token that reads `patch` of a side x side grid (row-major), for this part's design."""
    if part.patches_per_token == 1:
        return patch
    row, column = divmod(patch, side)
    return (row // 2) * (side // 2) + column // 2


def check_locality(part, projector_class, config):
    """Changing one patch changes the one token that reads it: its own, or its 2x2 block's."""
    projector = build(projector_class, config)
    features = random_features(config, batch=1)
    num_patches = features.shape[1]
    side = config.vision_grid_size
    with torch.no_grad():
        base = projector(features)
        for patch in range(num_patches):
            moved = features.clone()
            moved[0, patch] += 1.0
            changed = ((projector(moved) - base).abs().amax(-1)[0] > 1e-5).nonzero().flatten().tolist()
            expected = [token_of(part, patch, side)]
            if changed != expected:
                row, column = divmod(patch, side)
                if part.patches_per_token == 1:
                    hint = "each patch is projected on its own: nothing in forward should mix patches"
                else:
                    hint = (
                        "each token is one 2x2 square of neighbouring patches. A plain reshape (B, N, C) -> "
                        "(B, N/4, 4C) glues 4 patches of one row together: split rows and columns into "
                        "(block, place in block), permute, then reshape"
                    )
                raise CheckFailed(
                    f"changing patch {patch} (row {row}, column {column} of the {side}x{side} grid) changes output "
                    f"token {expected} only",
                    f"it changes tokens {changed}",
                    hint,
                )


def check_linearity(part, projector_class, config):
    """A linear design is affine in the features; the MLP is not."""
    projector = build(projector_class, config)
    x, y = random_features(config), random_features(config).flip(1)
    with torch.no_grad():
        # Zero for a map A @ x + b, and well away from zero with a GELU between two Linears.
        gap = (projector(x) + projector(y) - projector(x + y) - projector(torch.zeros_like(x))).abs().max().item()
    if part.affine and gap > 1e-3:
        raise CheckFailed(
            "one linear map of the features: f(x) + f(y) == f(x + y) + f(0)",
            f"they differ by up to {gap:.3g}",
            "this design has no activation; pixel shuffle and pooling only move and average numbers",
        )
    if not part.affine and gap < 1e-3:
        raise CheckFailed(
            "a non-linearity between the two Linears",
            f"f(x) + f(y) - f(x + y) - f(0) is {gap:.1g}: the projector is linear",
            "apply self.act (nn.GELU()) between linear_1 and linear_2; without it the two Linears multiply out "
            "to one Linear",
        )


def check_dtype(part, projector_class, config):
    """bfloat16 weights and features give bfloat16 tokens."""
    projector = build(projector_class, config).to(torch.bfloat16)
    with torch.no_grad():
        output = projector(random_features(config).to(torch.bfloat16))
    if output.dtype != torch.bfloat16:
        raise CheckFailed(
            "bfloat16 output from bfloat16 weights and features (models are often trained in bfloat16)",
            str(output.dtype),
            "create no float32 tensors in forward (torch.zeros(...) without dtype= does); nn layers follow the "
            "dtype of their weights",
        )


def tiny_model(part: Part) -> VLMForConditionalGeneration:
    torch.manual_seed(0)
    return VLMForConditionalGeneration(tiny_config(part.builtin))


def prompt(config: VLMConfig, text: list[int]) -> list[int]:
    """BOS, one image's placeholders, then some text."""
    return [1] + [IMAGE_TOKEN_ID] * config.image_seq_length + text


def check_plugs_into_model(part, projector_class, config):
    """Through PROJECTORS it becomes the model's projector and sets image_seq_length; a forward with an image runs."""
    tokens = config.vision_num_patches // part.patches_per_token
    with registered_as(part.builtin, projector_class):
        model = tiny_model(part).eval()
    config = model.config
    if type(model.model.multi_modal_projector) is not projector_class:
        raise CheckFailed(
            f"model.model.multi_modal_projector is your {projector_class.__name__}",
            type(model.model.multi_modal_projector).__name__,
            "this is the checker's fault, not yours: VLMModel builds PROJECTORS[config.projector_type](config)",
        )
    if config.image_seq_length != tokens:
        raise CheckFailed(
            f"config.image_seq_length == {tokens} (the config asks your num_tokens)",
            str(config.image_seq_length),
            "num_tokens is what the config reads; it must agree with what forward returns",
        )
    pixel_values = torch.randn(1, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    input_ids = torch.tensor([prompt(config, [5, 6, 7])])
    with torch.no_grad():
        image_tokens = model.model.get_image_features(pixel_values=pixel_values).pooler_output[0]
    if tuple(image_tokens.shape) != (tokens, config.text_config.hidden_size):
        raise CheckFailed(
            f"one image gives ({tokens}, {config.text_config.hidden_size}) image tokens inside the model",
            str(tuple(image_tokens.shape)),
            "forward must work for any batch size: read B, N and C from features.shape",
        )
    with torch.no_grad():  # the model checks that the prompt's placeholders and the image tokens are as many
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    if tuple(logits.shape) != (*input_ids.shape, config.text_config.vocab_size) or not logits.isfinite().all():
        raise CheckFailed(
            f"finite logits of shape {(*input_ids.shape, config.text_config.vocab_size)}",
            f"shape {tuple(logits.shape)}, finite: {bool(logits.isfinite().all())}",
            "look for a division by zero or a log of a negative number in forward",
        )


def training_losses(part: Part, projector_class: type) -> tuple[list[float], list[str]]:
    """Losses of `TRAINING_STEPS` AdamW steps on the projector alone, and the names of its parameters that got no
    gradient. Two images, each with its own 4-token answer; seeded, so the same numbers every run."""
    with registered_as(part.builtin, projector_class):
        model = tiny_model(part)
    config = model.config
    # Stage 1 (alignment) trains the projector only: what hf_vlm.training.set_trainable(model, vision=False,
    # projector=True, language=False) does, written out because importing that module also imports TRL.
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector.requires_grad_(True)
    model.train()
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, config.image_size, config.image_size, generator=generator)
    input_ids = torch.tensor([prompt(config, [5, 6, 7, 8]), prompt(config, [9, 10, 11, 12])])
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN_ID, -100)
    labels[:, 0] = -100  # BOS is given, not predicted
    optimizer = torch.optim.AdamW(projector.parameters(), lr=1e-2)
    losses, no_gradient = [], []
    for _ in range(TRAINING_STEPS):
        loss = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss
        losses.append(loss.item())
        if loss.requires_grad:  # when not, the projector's output was cut from its weights: nothing can train
            loss.backward()
        no_gradient = [name for name, p in projector.named_parameters() if p.grad is None or not p.grad.any()]
        optimizer.step()
        optimizer.zero_grad()
    return losses, no_gradient


def check_training_lowers_loss(part, projector_class, config):
    """Training the projector alone for a few steps lowers the loss, and every weight of it gets a gradient."""
    losses, no_gradient = training_losses(part, projector_class)
    if no_gradient or not losses[-1] < losses[0]:
        raise CheckFailed(
            f"the loss falls over {TRAINING_STEPS} steps that train only the projector",
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
            + (f"; no gradient reached {', '.join(no_gradient)}" if no_gradient else ""),
            "gradients must flow through forward: no torch.no_grad(), .detach(), .data or .item() inside it",
        )


CHECKS = [
    ("builds from the config", check_builds),
    ("output shape", check_output_shape),
    ("says how many tokens it emits for a grid", check_num_tokens),
    ("parameter count", check_parameter_count),
    ("each token reads the patches it should", check_locality),
    ("linear or not, as its design says", check_linearity),
    ("keeps the dtype", check_dtype),
    ("plugs into VLMForConditionalGeneration through PROJECTORS", check_plugs_into_model),
    (f"{TRAINING_STEPS} training steps lower the loss", check_training_lowers_loss),
]


@dataclass
class Result:
    part: Part
    status: str  # "passed", "failed" or "not written yet"
    detail: str  # the failed check, or the TODO still to write
    lines: list[str]


def where(error: BaseException, source_file: str) -> str:
    """' (projector_exercise.py, line 42)' for the deepest frame of the traceback in `source_file`, else ''."""
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == source_file]
    if isinstance(error, SyntaxError) and error.filename == source_file:
        lines.append(error.lineno)
    return f" ({Path(source_file).name}, line {lines[-1]})" if lines else ""


def check_part(part: Part, module) -> Result:
    """Run the part's checks in order, stopping at the first that fails."""
    lines = [part.name]
    projector_class = getattr(module, part.class_name, None)
    if not isinstance(projector_class, type):
        lines += [f"  FAIL  {part.class_name} is missing from {Path(module.__file__).name}: keep the class names"]
        return Result(part, "failed", "class missing", lines)
    source_file = module.__file__
    config = tiny_config("linear")
    for name, check in CHECKS:
        try:
            check(part, projector_class, config)
        except CheckFailed as failure:
            lines += [
                f"  FAIL  {name}",
                f"          expected  {failure.expected}",
                f"          got       {failure.got}",
                f"          hint      {failure.hint}",
            ]
            return Result(part, "failed", name, lines)
        except NotImplementedError as todo:
            lines += [f"  TODO  {name}: not written yet{where(todo, source_file)}", f"          {todo}"]
            return Result(part, "not written yet", str(todo).split(":")[0], lines)
        except Exception as error:  # the learner's code, or the library reading its output, raised
            lines += [
                f"  FAIL  {name}",
                f"          your code raised {type(error).__name__}{where(error, source_file)}: {error}",
            ]
            return Result(part, "failed", name, lines)
        lines.append(f"  ok    {name}")
    return Result(part, "passed", "", lines)


def load(path: Path):
    """The module at `path`, or a `SystemExit` that says why it does not import (its line, no traceback)."""
    spec = importlib.util.spec_from_file_location(f"{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise SystemExit(f"{path} does not import{where(error, str(path))}: {type(error).__name__}: {error}") from None
    return module


def summary(results: list[Result]) -> list[str]:
    lines = ["Summary"]
    for result in results:
        detail = f" ({result.detail})" if result.detail else ""
        lines.append(f"  {result.status:<16} Part {result.part.number}: {result.part.title}{detail}")
    passed = sum(result.status == "passed" for result in results)
    if passed == len(results):
        lines.append(f"All {len(results)} parts pass: your projectors plug into the VLM and train.")
    else:
        lines.append(f"{passed} of {len(results)} parts pass; the first failure above says what to do next.")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solutions", action="store_true", help="check the reference solutions instead")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()  # the learner reads the checks, not the library's notices
    torch.set_num_threads(1)  # models this small run faster on one thread than on several that wait for each other
    module = load(SOLUTIONS if args.solutions else EXERCISE)
    results = []
    for part in PARTS:
        results.append(check_part(part, module))
        print("\n".join(results[-1].lines), end="\n\n", flush=True)
    print("\n".join(summary(results)))
    return 0 if all(result.status == "passed" for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
