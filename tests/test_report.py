"""The run report's comparison sentences: significance in words, saturation and too-few-queries warnings."""

from __future__ import annotations

from mpr.orchestrate.report import _pair_sentence


def test_a_clear_gain_is_called_significant() -> None:
    a = {f"q{i}": 0.6 + 0.01 * (i % 3) for i in range(30)}
    b = {f"q{i}": 0.4 for i in range(30)}
    row, words = _pair_sentence("relabeled", a, "single", b, 3)
    assert row[4] == "30/0/0" and float(row[5].lstrip("<")) < 0.001
    assert "the difference is significant" in words and "relabeled is better" in words
    assert "stays significant after a Bonferroni correction for 3 tests" in words
    assert "WARNING" not in words


def test_noise_is_not_significant() -> None:
    a = {f"q{i}": 0.5 + (0.1 if i % 2 else -0.1) for i in range(20)}
    b = {f"q{i}": 0.5 for i in range(20)}
    _, words = _pair_sentence("x", a, "y", b, 1)
    assert "NOT significant" in words and "cannot tell them apart" in words


def test_saturated_and_too_few_are_warned() -> None:
    _, words = _pair_sentence("x", {f"q{i}": 1.0 for i in range(12)}, "y", {f"q{i}": 0.995 for i in range(12)}, 1)
    assert "saturated" in words
    _, words = _pair_sentence("x", {"q1": 0.9, "q2": 0.8}, "y", {"q1": 0.1, "q2": 0.2}, 1)
    assert "too few for a paired test" in words and "significant" not in words
