"""Key renaming rules: regular expression -> replacement, applied in order (pure, no torch).

The usual hand-written rename loop fails silently when a pattern matches nothing; here a
rule that matches no key, or renames two keys onto one, is an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from manifest_ckpt.errors import RemapError

Remap = Mapping[str, str]


def compile_remap(remap: Remap) -> list[tuple[re.Pattern[str], str]]:
    """Compile the rules, naming a pattern that is not a valid regular expression."""
    rules = []
    for pattern, replacement in remap.items():
        try:
            rules.append((re.compile(pattern), replacement))
        except re.error as exc:
            raise RemapError(f"remap pattern {pattern!r} is not a valid regular expression: {exc}") from None
    return rules


def apply_remap(keys: Iterable[str], remap: Remap | None) -> dict[str, str]:
    """Map each key to its new name by applying every rule in order (``re.sub``, all matches).

    Returns:
        ``{old key: new key}`` for every key, renamed or not, in input order.

    Raises:
        RemapError: a pattern is invalid, matches no key at its turn, or two keys end up
            with the same name.
    """
    listed = list(keys)
    names = dict(zip(listed, listed))
    if not remap:
        return names
    for pattern, replacement in compile_remap(remap):
        hits = 0
        for old, current in names.items():
            if pattern.search(current):
                hits += 1
                try:
                    names[old] = pattern.sub(replacement, current)
                except (re.error, IndexError) as exc:
                    raise RemapError(f"remap replacement {replacement!r} for {pattern.pattern!r}: {exc}") from None
        if hits == 0:
            sample = ", ".join(repr(k) for k in list(names.values())[:5])
            raise RemapError(
                f"remap pattern {pattern.pattern!r} matches no checkpoint key (keys at that point: {sample}"
                f"{', ...' if len(names) > 5 else ''}); fix or drop the rule"
            )
    seen: dict[str, str] = {}
    for old, new in names.items():
        if new in seen:
            raise RemapError(
                f"remap renames both {seen[new]!r} and {old!r} to {new!r}; make the rules more specific"
            )
        seen[new] = old
    return names


def parse_remap_args(items: Iterable[str]) -> dict[str, str]:
    """Parse CLI ``REGEX=REPLACEMENT`` items (the first ``=`` splits; the replacement may be empty)."""
    remap: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise RemapError(f"--remap {item!r}: expected REGEX=REPLACEMENT, e.g. '^module\\.='")
        pattern, replacement = item.split("=", 1)
        if pattern in remap:
            # A mapping holds one rule per pattern: keeping only the last would drop a rule silently.
            raise RemapError(
                f"--remap {item!r}: pattern {pattern!r} is given twice ({pattern}={remap[pattern]} first); "
                "give each pattern once"
            )
        remap[pattern] = replacement
    return remap
