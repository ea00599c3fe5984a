"""docs/exercises: the checker passes the solutions, explains the untouched exercise without a traceback, and
names the usual mistakes."""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_vlm import PROJECTORS

EXERCISES = Path(__file__).resolve().parents[1] / "docs" / "exercises"


# The commands a learner types from the repository root (with `python` for this interpreter).
COMMANDS = {
    "solutions": ["docs/exercises/check_exercise.py", "--solutions"],
    "exercise": ["docs/exercises/check_exercise.py"],
    "pytest": ["-m", "pytest", "docs/exercises", "-q", "-p", "no:cacheprovider"],
}


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess]:
    """What each command prints and returns. They start at once: each spends most of its time importing torch."""
    started = {
        name: subprocess.Popen(
            [sys.executable, *command],
            cwd=EXERCISES.parents[1],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for name, command in COMMANDS.items()
    }
    runs = {}
    try:
        for name, process in started.items():
            stdout, stderr = process.communicate(timeout=300)  # the outputs are a few kB: no pipe fills up meanwhile
            runs[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        return runs
    finally:
        for process in started.values():
            process.kill()  # after a timeout; a finished process ignores it


@pytest.fixture(scope="module")
def checker():
    """check_exercise.py, imported by path as the learner's script is not a package module."""
    spec = importlib.util.spec_from_file_location("check_exercise", EXERCISES / "check_exercise.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the checker's main() does: its tiny models train faster on one thread
    yield module
    torch.set_num_threads(threads)
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def solutions(checker):
    return checker.load(checker.SOLUTIONS)


def test_checker_passes_the_solutions(runs):
    """`check_exercise.py --solutions` exits 0 and reports every check of every part as ok."""
    result = runs["solutions"]
    assert result.returncode == 0, result.stdout + result.stderr
    for number in (1, 2, 3):
        assert f"passed           Part {number}:" in result.stdout
    assert result.stdout.count("  ok    ") == 3 * 9  # 3 parts, 9 checks each
    assert "All 3 parts pass" in result.stdout
    assert "FAIL" not in result.stdout and "TODO" not in result.stdout


def test_checker_explains_the_untouched_exercise(runs):
    """On the exercise as shipped it exits 1, names part 1's first TODO and what to write, and shows no traceback."""
    result = runs["exercise"]
    assert result.returncode == 1, result.stdout + result.stderr
    assert "TODO  builds from the config: not written yet (projector_exercise.py, line" in result.stdout
    assert "TODO 1a: in LinearProjector.__init__, make self.linear = nn.Linear(in_size, out_size)" in result.stdout
    assert "not written yet  Part 1: linear projection (TODO 1a)" in result.stdout
    assert "0 of 3 parts pass" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_pytest_runs_the_same_checks_on_the_exercise(runs):
    """`pytest docs/exercises` fails each part of the untouched exercise with the checker's message, no traceback."""
    result = runs["pytest"]
    assert result.returncode == 1, result.stdout + result.stderr
    assert "3 failed" in result.stdout
    assert "TODO 1a: in LinearProjector.__init__" in result.stdout
    assert "Traceback" not in result.stdout and "raise NotImplementedError" not in result.stdout


def test_registered_as_restores_projectors(checker):
    """Inside the block the entry is the given class; after it, also after an error, the entry is what it was."""
    builtin = PROJECTORS["linear"]
    with pytest.raises(RuntimeError), checker.registered_as("linear", torch.nn.Identity):
        assert PROJECTORS["linear"] is torch.nn.Identity
        raise RuntimeError
    assert PROJECTORS["linear"] is builtin
    with checker.registered_as("not_a_projector", torch.nn.Identity):
        assert PROJECTORS["not_a_projector"] is torch.nn.Identity
    assert "not_a_projector" not in PROJECTORS


def check_in_learner_file(checker, number: int, projector_class: type):
    """check_part for part `number` on a module that holds `projector_class` under the exercise's class name."""
    part = checker.PARTS[number - 1]
    module = type(sys)("learner")
    module.__file__ = __file__
    setattr(module, part.class_name, projector_class)
    return checker.check_part(part, module)


def mistakes(solutions) -> dict[str, tuple[int, type, str, str]]:
    """Usual mistakes, each a small change of a solution: name -> (part, class, failed check, text of its message)."""

    class NarrowLinear(solutions.LinearProjector):
        def __init__(self, config):
            super().__init__(config)
            self.linear = torch.nn.Linear(config.vision_feature_size, config.vision_feature_size)

    class LinearMLP(solutions.MLPProjector):
        def forward(self, features):
            return self.linear_2(self.linear_1(features))

    class RowReshape(solutions.CompressingProjector):
        def forward(self, features):
            batch, num_patches, channels = features.shape
            return self.linear(features.reshape(batch, num_patches // 4, 4 * channels))

    class NoCompression(solutions.CompressingProjector):
        @staticmethod
        def num_tokens(config, num_patches):
            return num_patches

    class Float32(solutions.LinearProjector):
        def forward(self, features):
            return super().forward(features).float()

    class Detached(solutions.MLPProjector):
        def forward(self, features):
            return super().forward(features).detach()

    return {
        "narrow output": (1, NarrowLinear, "output shape", "(2, 16, 64): (images, tokens, D)"),
        "no activation": (2, LinearMLP, "linear or not, as its design says", "a non-linearity between the two"),
        "row reshape": (3, RowReshape, "each token reads the patches it should", "glues 4 patches of one row"),
        "no compression": (3, NoCompression, "says how many tokens it emits for a grid", "4x fewer tokens"),
        "float32 output": (1, Float32, "keeps the dtype", "got       torch.float32"),
        "detached output": (2, Detached, "10 training steps lower the loss", "no gradient reached linear_1.weight"),
    }


@pytest.mark.parametrize(
    "mistake", ["narrow output", "no activation", "row reshape", "no compression", "float32 output", "detached output"]
)
def test_each_usual_mistake_fails_its_check_with_a_hint(checker, solutions, mistake):
    """The check that the mistake breaks is the one that fails, with expected, got and a hint."""
    number, projector_class, check, text = mistakes(solutions)[mistake]
    result = check_in_learner_file(checker, number, projector_class)
    message = "\n".join(result.lines)
    assert (result.status, result.detail) == ("failed", check), message
    assert text in message and "hint      " in message


class PoolingProjector(torch.nn.Module):
    """Part 3 as the exercise's other design: average each 2x2 block of patches, then Linear(C, D)."""

    def __init__(self, config):
        super().__init__()
        self.linear = torch.nn.Linear(config.vision_feature_size, config.text_config.hidden_size)

    def forward(self, features):
        batch, num_patches, channels = features.shape
        side = math.isqrt(num_patches)
        grid = features.transpose(1, 2).reshape(batch, channels, side, side)  # (B, C, side, side)
        return self.linear(torch.nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2))  # (B, N/4, D)

    @staticmethod
    def num_tokens(config, num_patches):
        return num_patches // 4


def test_pooling_passes_part_3_as_the_exercise_says(checker, solutions):
    """The exercise offers pooling instead of pixel shuffle for part 3; the checker accepts it."""
    result = check_in_learner_file(checker, 3, PoolingProjector)
    assert result.status == "passed", "\n".join(result.lines)


def test_a_file_that_does_not_import_gets_its_line_not_a_traceback(checker, tmp_path):
    """load() turns a syntax error in the learner's file into one sentence with the file's line."""
    broken = tmp_path / "projector_exercise.py"
    broken.write_text("import torch\n\nclass LinearProjector(\n")
    with pytest.raises(SystemExit, match=r"does not import \(projector_exercise.py, line 3\): SyntaxError"):
        checker.load(broken)


def test_an_error_in_the_learners_code_gets_its_line_not_a_traceback(checker, tmp_path):
    """An exception in the learner's forward is reported as the check that failed, the error and its line."""
    learner = tmp_path / "projector_exercise.py"
    learner.write_text(
        "from torch import nn\n"
        "class LinearProjector(nn.Module):\n"
        "    def __init__(self, config):\n"
        "        super().__init__()\n"
        "        self.linear = nn.Linear(config.vision_feature_size, config.text_config.hidden_size)\n"
        "    def forward(self, features):\n"
        "        return self.linaer(features)\n"
        "    @staticmethod\n"
        "    def num_tokens(config, num_patches):\n"
        "        return num_patches\n"
    )
    result = checker.check_part(checker.PARTS[0], checker.load(learner))
    assert (result.status, result.detail) == ("failed", "output shape")
    assert result.lines[-1].strip().startswith("your code raised AttributeError (projector_exercise.py, line 7): ")
    assert "linaer" in result.lines[-1]
