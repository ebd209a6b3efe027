"""What a positive is, written once: the label values, the 0-1 grade scale, the threshold on it, and the
text of a passage.

Every shard row carries `grade` in [0, 1] (relabel: the judge's 0-3 grade / 3; synth: level / (L-1);
qrels: score / the split's top score), `level` and `label` (data/README.md). `mpr relabel --mode
graded`, `mpr synth` and `mpr train` call a row positive by the same rule on the same scale:
`is_positive(grade, positive_threshold)`.
"""

from __future__ import annotations

POSITIVE = 1
NEGATIVE = 0
PADDING = -1  # a group slot without a passage (train.groups, train.losses)

#: Grade 2 of the judge's 0-3, and the top two of SyCL's 4 levels (grades 2/3 and 1).
DEFAULT_POSITIVE_THRESHOLD = 2 / 3
# Grades are stored as float32: read back, a grade may sit this far below the float64 value it was
# written from.
GRADE_TOLERANCE = 1e-6


def level_grade(level: float, levels: int) -> float:
    """Level `level` of `levels` (0 ... levels-1) on the 0-1 grade scale."""
    return level / (levels - 1)


def is_positive(grade: float, threshold: float) -> bool:
    return grade >= threshold - GRADE_TOLERANCE


def positive_levels(threshold: float, levels: int) -> list[int]:
    """The levels of a `levels`-level scale that `threshold` makes positive."""
    return [level for level in range(levels) if is_positive(level_grade(level, levels), threshold)]


def check_threshold(threshold: float, levels: int) -> float:
    """`threshold`, when it leaves both a negative and a positive among `levels` levels; else a ValueError."""
    positive = positive_levels(threshold, levels)
    if len(positive) in (0, levels):
        grades = ", ".join(f"{level_grade(k, levels):.3g}" for k in range(levels))
        raise ValueError(
            f"{threshold:g} makes {'every' if positive else 'no'} level positive "
            f"(grades of the {levels} levels: {grades})"
        )
    return threshold


def encoder_text(title: str | None, text: str) -> str:
    """A passage as the encoders see it: title and text joined by a space (as BEIR and
    sentence-transformers)."""
    return f"{title} {text}" if title else text
