"""Tests of ``manifest_ckpt.comparison.remap``: ordered rules that never fail silently."""

from __future__ import annotations

import pytest

from manifest_ckpt.comparison.remap import apply_remap, compile_remap, parse_remap_args
from manifest_ckpt.errors import ManifestCkptError, RemapError

KEYS = ["module.encoder.0.weight", "module.encoder.0.bias", "module.head.weight"]


def test_no_remap_is_the_identity() -> None:
    """None or an empty mapping maps every key to itself, in input order."""
    assert apply_remap(KEYS, None) == {k: k for k in KEYS}
    assert list(apply_remap(KEYS, {})) == KEYS


def test_rule_renames_every_match_and_keeps_order() -> None:
    """A rule applies re.sub to every key it matches; untouched keys keep their names; order is the input order."""
    names = apply_remap(KEYS, {r"^module\.": ""})
    assert names == {
        "module.encoder.0.weight": "encoder.0.weight",
        "module.encoder.0.bias": "encoder.0.bias",
        "module.head.weight": "head.weight",
    }
    assert list(names) == KEYS
    assert apply_remap(KEYS, {r"encoder": "enc"})["module.head.weight"] == "module.head.weight"


def test_rules_apply_in_order_each_to_the_previous_result() -> None:
    """The second rule sees the names the first one produced."""
    names = apply_remap(KEYS, {r"^module\.": "", r"^encoder\.": "backbone."})
    assert names["module.encoder.0.weight"] == "backbone.0.weight"
    assert names["module.head.weight"] == "head.weight"


def test_rule_order_matters() -> None:
    """Swapping two rules changes the result: the later rule no longer matches and is an error."""
    remap = {r"^module\.": "", r"^encoder\.": "backbone."}
    assert apply_remap(KEYS, remap)["module.encoder.0.bias"] == "backbone.0.bias"
    with pytest.raises(RemapError, match=r"remap pattern '\^encoder\\\\\.' matches no checkpoint key"):
        apply_remap(KEYS, dict(reversed(list(remap.items()))))


def test_group_references_in_the_replacement() -> None:
    """Replacements may use groups, as re.sub does."""
    names = apply_remap(["h.3.attn.c_attn.weight"], {r"^h\.(\d+)\.": r"layers.\1."})
    assert names == {"h.3.attn.c_attn.weight": "layers.3.attn.c_attn.weight"}


def test_pattern_matching_nothing_is_an_error_naming_it() -> None:
    """A rule that matches no key raises RemapError naming the pattern and showing sample keys."""
    with pytest.raises(RemapError) as info:
        apply_remap(KEYS, {r"^model\.": ""})
    text = str(info.value)
    assert text.startswith(r"remap pattern '^model\\.' matches no checkpoint key")
    assert "'module.encoder.0.weight'" in text
    assert "fix or drop the rule" in text


def test_pattern_matching_nothing_shows_at_most_five_keys() -> None:
    """The sample of keys in the error is cut at five, followed by an ellipsis."""
    keys = [f"k{i}" for i in range(8)]
    with pytest.raises(RemapError) as info:
        apply_remap(keys, {"zzz": ""})
    assert "'k4', ..." in str(info.value)
    assert "'k5'" not in str(info.value)


def test_collision_names_both_keys_and_the_target() -> None:
    """Two keys renamed onto one name raise RemapError naming both original keys and the shared name."""
    with pytest.raises(RemapError) as info:
        apply_remap(["a.weight", "b.weight"], {r"^[ab]\.": "x."})
    assert str(info.value) == "remap renames both 'a.weight' and 'b.weight' to 'x.weight'; make the rules more specific"


def test_collision_with_a_key_that_was_not_renamed() -> None:
    """Renaming a key onto another existing key is a collision too."""
    with pytest.raises(RemapError, match=r"both 'fc\.weight' and 'old_fc\.weight' to 'fc\.weight'"):
        apply_remap(["fc.weight", "old_fc.weight"], {r"^old_": ""})


def test_collisions_are_checked_on_the_final_names_only() -> None:
    """Rules may pass through a temporary name, so two keys can exchange names."""
    names = apply_remap(["a", "b"], {"^a$": "tmp", "^b$": "a", "^tmp$": "b"})
    assert names == {"a": "b", "b": "a"}


@pytest.mark.parametrize("pattern", ["(", "[a-", "*x", "(?P<n>a)(?P<n>b)"])
def test_invalid_regex_is_a_remap_error_naming_the_pattern(pattern: str) -> None:
    """A pattern that does not compile raises RemapError (not re.error) naming it."""
    with pytest.raises(RemapError) as info:
        apply_remap(KEYS, {pattern: ""})
    assert str(info.value).startswith(f"remap pattern {pattern!r} is not a valid regular expression: ")
    with pytest.raises(RemapError):
        compile_remap({pattern: ""})


def test_invalid_replacement_is_a_remap_error() -> None:
    """A replacement referring to a group the pattern lacks raises RemapError naming both."""
    with pytest.raises(RemapError) as info:
        apply_remap(KEYS, {r"^module\.": r"\2"})
    assert str(info.value).startswith(r"remap replacement '\\2' for '^module\\.': ")


def test_remap_error_is_in_the_family() -> None:
    """RemapError is a ManifestCkptError and a ValueError."""
    assert issubclass(RemapError, ManifestCkptError)
    assert issubclass(RemapError, ValueError)


def test_parse_remap_args_splits_on_the_first_equals_sign() -> None:
    """REGEX=REPLACEMENT items become an ordered mapping; the replacement may be empty or contain '='."""
    remap = parse_remap_args([r"^module\.=", r"^a=b=c", r"x(\d)=y\1"])
    assert remap == {r"^module\.": "", "^a": "b=c", r"x(\d)": r"y\1"}
    assert list(remap) == [r"^module\.", "^a", r"x(\d)"]
    assert parse_remap_args([]) == {}


def test_parse_remap_args_without_equals_sign_is_an_error() -> None:
    """An item without '=' raises RemapError naming the item and showing the expected form."""
    with pytest.raises(RemapError) as info:
        parse_remap_args([r"^module\."])
    assert str(info.value) == "--remap '^module\\\\.': expected REGEX=REPLACEMENT, e.g. '^module\\.='"


def test_parse_remap_args_refuses_a_repeated_pattern() -> None:
    """A pattern given twice is an error, not a rule silently dropped (regression: the last one used to win)."""
    with pytest.raises(RemapError) as info:
        parse_remap_args(["a=1", "b=2", "a=3"])
    assert str(info.value) == "--remap 'a=3': pattern 'a' is given twice (a=1 first); give each pattern once"
