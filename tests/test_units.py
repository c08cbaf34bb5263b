"""Token counts in and out."""

from __future__ import annotations

import pytest

from rankscope.settings.units import fmt_count, parse_count


@pytest.mark.parametrize(
    "text,n",
    [
        ("4096", 4096),
        ("25M", 25_000_000),
        ("1.5e6", 1_500_000),
        ("1_000", 1000),
        ("1.5k", 1500),
        (" 2B ", 2_000_000_000),
        ("3g", 3_000_000_000),
        ("0", 0),
    ],
)
def test_parse_count(text, n):
    assert parse_count(text) == n


@pytest.mark.parametrize("text", ["abc", "1.5", "1.0001k", "", "-5", "1e400", "2MM"])
def test_parse_count_rejects(text):
    with pytest.raises(ValueError):
        parse_count(text)


def test_fmt_count_reads_the_way_papers_write_counts():
    assert [fmt_count(t) for t in (0, 50_000, 100_000, 500_000, 1_000_000, 16_384_000, 25_000_000, 1.5e9, 2e12)] == [
        "0",
        "50k",
        "0.1M",
        "0.5M",
        "1M",
        "16.4M",
        "25M",
        "1.5B",
        "2T",
    ]
    assert [fmt_count(t) for t in (None, float("nan"), 999, -2_000_000)] == ["?", "?", "999", "-2M"]


@pytest.mark.parametrize("n", [0, 7, 4000, 25_000_000, 1_500_000_000])
def test_what_is_formatted_parses_back_for_round_counts(n):
    assert parse_count(fmt_count(n)) == n
