"""Semantic versions: parsing, precedence (prereleases included), the sortable key, bump rules."""

from __future__ import annotations

import random

import pytest
import semver
from hypothesis import given, settings
from hypothesis import strategies as st

from neuroweaver_registry.domain.versions import bump, looks_like_version, parse_version, sort_key
from neuroweaver_runtime.errors import InvalidArgument

# Precedence example straight from semver.org §11.
ORDERED = [
    "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2", "1.0.0-beta.11",
    "1.0.0-rc.1", "1.0.0", "1.0.1", "1.1.0", "2.0.0-0", "2.0.0", "10.0.0",
]  # fmt: skip


def test_semver_org_precedence_example_sorts_by_key():
    shuffled = ORDERED[:]
    random.Random(7).shuffle(shuffled)
    assert sorted(shuffled, key=lambda v: sort_key(parse_version(v))) == ORDERED


def test_prerelease_is_below_its_release():
    assert sort_key(parse_version("1.0.0-rc.1")) < sort_key(parse_version("1.0.0"))
    assert sort_key(parse_version("1.0.0")) < sort_key(parse_version("1.0.1-rc.1"))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1",
        "1.0",
        "01.0.0",
        "1.0.0-",
        "1.0.0-01",
        "v1.0.0",
        "1.0.0+build.1",
        "1.0.0-rc.1+sha",
        "a.b.c",
        "1.0.0 ",
        "2147483648.0.0",
        "1.0.0-rc.2147483648",
    ],
)
def test_invalid_versions_are_rejected(text):
    with pytest.raises(InvalidArgument) as caught:
        parse_version(text, field="version")
    assert caught.value.reason == "INVALID_VERSION"
    assert caught.value.violations[0].field == "version"


def test_largest_allowed_components_parse():
    assert str(parse_version("2147483647.0.0-rc.2147483647")) == "2147483647.0.0-rc.2147483647"


def test_looks_like_version():
    assert looks_like_version("1.2.3") and looks_like_version("1.2.3-rc.1")
    assert not looks_like_version("prod") and not looks_like_version("latest")


_ident = st.one_of(
    st.integers(min_value=0, max_value=2**31 - 1).map(str),
    st.from_regex(r"[0-9A-Za-z-]*[A-Za-z-][0-9A-Za-z-]*", fullmatch=True).filter(lambda s: 0 < len(s) <= 12),
)
_versions = st.builds(
    lambda ma, mi, pa, pre: semver.Version(ma, mi, pa, ".".join(pre) if pre else None),
    st.integers(0, 5), st.integers(0, 5), st.integers(0, 2**31 - 1),
    st.lists(_ident, max_size=4),
)  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(_versions, _versions)
def test_sort_key_order_equals_semver_precedence(a, b):
    expected = a.compare(b)
    ka, kb = sort_key(parse_version(str(a))), sort_key(parse_version(str(b)))
    assert (ka > kb) - (ka < kb) == expected


def test_sort_key_matches_semver_on_many_random_versions():
    rng = random.Random(2024)
    words = ["alpha", "beta", "rc", "a", "b-1", "x9", "0", "1", "2", "10", "11"]

    def rand() -> semver.Version:
        pre = ".".join(rng.choice(words) for _ in range(rng.randint(0, 3))) or None
        return semver.Version(rng.randint(0, 3), rng.randint(0, 3), rng.randint(0, 3), pre)

    sample = [rand() for _ in range(2000)]
    by_key = sorted(sample, key=lambda v: sort_key(v))
    for left, right in zip(by_key, by_key[1:], strict=False):
        assert left.compare(right) <= 0, (str(left), str(right))


@pytest.mark.parametrize(
    ("highest", "level", "expected"),
    [
        (None, "patch", "0.0.1"), (None, "minor", "0.1.0"), (None, "major", "1.0.0"),
        ("1.4.2", "major", "2.0.0"), ("1.4.2", "minor", "1.5.0"), ("1.4.2", "patch", "1.4.3"),
        ("1.0.0-rc.1", "patch", "1.0.1"),  # never 1.0.0: the release of a prerelease is not a patch bump
        ("1.0.0-rc.1", "minor", "1.1.0"), ("1.0.0-rc.1", "major", "2.0.0"),
        ("0.9.9", "major", "1.0.0"),
    ],
)  # fmt: skip
def test_bump_rules(highest, level, expected):
    base = parse_version(highest) if highest else None
    result = bump(base, level)
    assert str(result) == expected
    if base is not None:
        assert result.compare(base) > 0


def test_unknown_bump_level():
    with pytest.raises(InvalidArgument) as caught:
        bump(None, "micro")
    assert caught.value.reason == "INVALID_BUMP"
