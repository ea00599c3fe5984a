"""`pytest docs/exercises --solutions` checks the reference solutions instead of your exercise."""

import pytest
import torch
import transformers
from check_exercise import EXERCISE, SOLUTIONS, load


def pytest_addoption(parser):
    parser.addoption("--solutions", action="store_true", help="check docs/exercises/solutions/projector_exercise.py")


@pytest.fixture(scope="session")
def projectors(request):
    """The module whose projectors the tests check."""
    transformers.logging.set_verbosity_error()  # the learner reads the checks, not the library's notices
    torch.set_num_threads(1)  # models this small run faster on one thread than on several that wait for each other
    try:
        return load(SOLUTIONS if request.config.getoption("--solutions") else EXERCISE)
    except SystemExit as error:  # a syntax error, say: its line, without a traceback
        pytest.fail(str(error), pytrace=False)
