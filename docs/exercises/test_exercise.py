"""`pytest docs/exercises`: each part of the exercise as one test, with check_exercise.py's checks and messages."""

import pytest
from check_exercise import PARTS, check_part


@pytest.mark.parametrize("part", PARTS, ids=lambda part: part.class_name)
def test_part(part, projectors):
    """The part passes every check, in order: shapes, parameters, locality, dtype, the model, training."""
    result = check_part(part, projectors)
    if result.status != "passed":
        pytest.fail("\n".join(result.lines), pytrace=False)
