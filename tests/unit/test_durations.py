"""Durations as admins write them ([retention], ``messages prune --older-than``)."""

from __future__ import annotations

import pytest

from relaygate.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45s", 45),
        ("90m", 5400),
        ("12h", 43200),
        ("30d", 2_592_000),
        ("2w", 1_209_600),
        ("1h30m", 5400),
        (" 7D ", 604_800),
        ("0s", 0),
    ],
)
def test_durations_people_write(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty duration"),
        ("30", "not a duration: '30'"),
        ("d30", "not a duration"),
        ("30 d", "not a duration"),
        ("1.5h", "not a duration"),
        ("-5m", "not a duration"),
        ("5y", "not a duration"),
        ("30d junk", "not a duration"),
        ("99999999w", "too long"),
    ],
)
def test_anything_else_is_refused_with_one_line(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        parse_duration(text)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("seconds", "text"), [(2_592_000, "30d"), (5400, "90m"), (45, "45s"), (1_209_600, "2w")]
)
def test_formatted_back_in_the_largest_whole_unit(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(format_duration(seconds)) == seconds
