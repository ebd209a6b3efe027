"""pipeline.data.labels: the one definition of a positive, shared by relabel, synth and train."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.labels import (
    DEFAULT_POSITIVE_THRESHOLD,
    check_threshold,
    encoder_text,
    is_positive,
    level_grade,
    positive_levels,
)


def test_levels_on_the_grade_scale():
    assert [level_grade(k, 4) for k in range(4)] == [0, 1 / 3, 2 / 3, 1]
    assert level_grade(1.5, 4) == 0.5  # an expected grade of the 0-3 judge
    # the default: grade 2 of 0-3, the top two of 4 levels
    assert {n: positive_levels(DEFAULT_POSITIVE_THRESHOLD, n) for n in range(2, 7)} == {
        2: [1],
        3: [2],
        4: [2, 3],
        5: [3, 4],
        6: [4, 5],
    }


def test_a_grade_read_back_from_float32_is_still_at_the_threshold():
    stored = float(np.float32(0.7))
    assert stored < 0.7 and is_positive(stored, 0.7)
    assert not is_positive(0.69, 0.7) and is_positive(2 / 3, DEFAULT_POSITIVE_THRESHOLD)


def test_a_threshold_must_split_the_levels():
    with pytest.raises(ValueError, match="0 makes every level positive"):
        check_threshold(0, 4)
    assert check_threshold(1.0, 4) == 1.0 and positive_levels(1.0, 4) == [3]


def test_encoder_text():
    assert (
        encoder_text("Title", "text") == "Title text"
        and encoder_text(None, "text") == encoder_text("", "text") == "text"
    )
