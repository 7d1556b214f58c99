"""What to do about each kind of problem, and what a cast would do (no torch import).

``compare`` lists the differences; this module words the fix for each kind: the option
that allows it (``cast=True``, ``check_classes=False``, ``untie=True``/``tie=True``,
``allow_missing``/``allow_unexpected`` with patterns that match exactly the keys reported),
with the CLI spelling beside the Python one.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from manifest_ckpt.comparison.report import Problem
from manifest_ckpt.format.dtypes import PACKED


@dataclass(frozen=True)
class _Float:
    """What a floating dtype can represent: enough to say whether a cast keeps every value."""

    mantissa: int  # explicit mantissa bits
    largest: float  # largest finite value
    smallest_exp: int  # log2 of the smallest positive value (subnormals included)
    signed: bool = True
    inf: bool = True  # has infinities
    negative_zero: bool = True
    zero: bool = True


_FLOATS: dict[str, _Float] = {
    "float64": _Float(52, 1.7976931348623157e308, -1074),
    "float32": _Float(23, 3.4028234663852886e38, -149),
    "bfloat16": _Float(7, 3.3895313892515355e38, -133),
    "float16": _Float(10, 65504.0, -24),
    "float8_e4m3fn": _Float(3, 448.0, -9, inf=False),
    "float8_e4m3fnuz": _Float(3, 240.0, -10, inf=False, negative_zero=False),
    "float8_e5m2": _Float(2, 57344.0, -16),
    "float8_e5m2fnuz": _Float(2, 57344.0, -17, inf=False, negative_zero=False),
    # A power-of-two scale: no mantissa, no sign, no zero.
    "float8_e8m0fnu": _Float(0, 2.0**127, -127, signed=False, inf=False, negative_zero=False, zero=False),
}
# The real dtype of each component of a complex dtype.
_COMPLEX = {"complex64": "float32"}
# Integer dtypes: (value bits without the sign, signed).
_INTS: dict[str, tuple[int, bool]] = {
    "uint8": (8, False),
    "int8": (7, True),
    "int16": (15, True),
    "uint16": (16, False),
    "int32": (31, True),
    "uint32": (32, False),
    "int64": (63, True),
    "uint64": (64, False),
}


def uncastable(source: str, target: str) -> str | None:
    """Why ``cast=True`` never converts ``source`` to ``target``; None when it does.

    A complex value cast to a real dtype loses its imaginary part; packed 4-bit floats
    (``float4_e2m1fn_x2``) have no conversion kernel in torch, to or from anything.
    """
    if source in PACKED or target in PACKED:
        return "torch has no cast kernel for packed 4-bit floats (float4_e2m1fn_x2)"
    if source in _COMPLEX and target not in _COMPLEX:
        return "a complex value cast to a real dtype would lose its imaginary part"
    return None


def cast_effect(source: str, target: str) -> str:
    """What ``cast=True`` does to the values of a ``source`` tensor loaded as ``target``.

    ``"exact"`` when every value survives (NaN stays NaN); otherwise what is lost, in a few
    words. tests/test_hints.py checks each claim against torch's casts, value by value.
    """
    reason = uncastable(source, target)
    if reason is not None:
        return f"not castable: {reason}"
    if source == target:
        return "exact"
    if target == "bool":
        return "lossy: every nonzero value becomes True"
    if source in _COMPLEX:  # complex to complex: only complex64 exists here
        return "exact"
    if target in _COMPLEX:
        return cast_effect(source, _COMPLEX[target]) + " (imaginary parts 0)"
    if source == "bool":
        return "exact" if target in _INTS or _FLOATS[target].zero else f"lossy: {target} has no zero, False becomes a value"
    if source in _INTS:
        bits, signed = _INTS[source]
        if target in _INTS:
            t_bits, t_signed = _INTS[target]
            if (signed <= t_signed) and bits <= t_bits:
                return "exact"
            return f"lossy: values outside {target}'s range wrap around"
        t = _FLOATS[target]
        if t.mantissa + 1 >= bits and t.largest >= 2.0**bits and t.zero and (t.signed or not signed):
            return "exact"
        return f"lossy: integers beyond {target}'s {t.mantissa + 1} significant bits or range are rounded"
    if target in _INTS:
        return "lossy: fractions are truncated toward zero; NaN, infinities and out-of-range values are undefined"
    s, t = _FLOATS[source], _FLOATS[target]
    losses = []
    if t.mantissa < s.mantissa:
        losses.append(f"rounds to {t.mantissa} mantissa bits (from {s.mantissa})")
    if t.largest < s.largest:
        losses.append(f"values beyond {t.largest:g} overflow")
    if t.smallest_exp > s.smallest_exp:
        losses.append(f"values below 2**{t.smallest_exp} are rounded away")
    if s.signed and not t.signed:
        losses.append("negative values cannot be represented")
    if s.zero and not t.zero:
        losses.append("zero cannot be represented")
    if s.inf and not t.inf:
        losses.append("infinities become NaN or the largest value")
    if s.negative_zero and not t.negative_zero:
        losses.append("negative zero becomes zero")
    return "lossy: " + "; ".join(losses) if losses else "exact"


def allow_patterns(keys: Iterable[str], universe: Iterable[str] = (), *, limit: int = 4) -> list[str] | None:
    """Few ``re.fullmatch`` patterns that match exactly ``keys`` among ``universe``, or None.

    Numbered layers collapse (``h.0.attn.masked_bias`` ... to ``h\\.\\d+\\.attn\\.masked_bias``);
    when that still leaves more than ``limit`` patterns, keys are grouped by their first
    segment (``teacher\\..*``); then each key is escaped whole (up to ``2 * limit``). A
    candidate is offered only when, over ``universe`` (every key on that side) and ``keys``,
    it matches the given keys and no other: an allow pattern must not hide another key.
    """
    keys = sorted(set(keys))
    wanted = set(keys)
    others = [k for k in universe if k not in wanted]

    def exact(patterns: list[str]) -> bool:
        joined = re.compile("|".join(f"(?:{p})" for p in patterns))
        return all(joined.fullmatch(k) for k in keys) and not any(joined.fullmatch(k) for k in others)

    layered = sorted({r"\.".join(r"\d+" if s.isdigit() else re.escape(s) for s in k.split(".")) for k in keys})
    grouped = []
    for head in sorted({k.split(".")[0] for k in keys}):
        below = any(k.startswith(head + ".") for k in keys)
        alone = head in wanted
        grouped.append(re.escape(head) + ((r"(?:\..*)?" if alone else r"\..*") if below else ""))
    escaped = [re.escape(k) for k in keys]
    for candidate, most in ((layered, limit), (grouped, limit), (escaped, 2 * limit)):
        if candidate and len(candidate) <= most and exact(candidate):
            return candidate
    return None


def _python_list(patterns: Sequence[str]) -> str:
    return "[" + ", ".join(repr(p) for p in patterns) + "]"


def _cli_flags(flag: str, patterns: Sequence[str]) -> str:
    return " ".join(f"{flag} '{p}'" for p in patterns)


def _some(keys: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def problem_hints(
    problems: Sequence[Problem],
    *,
    explained_missing: Iterable[str] = (),
    explained_unexpected: Iterable[str] = (),
    dtype_pairs: dict[str, tuple[str, str]] | None = None,
    module_keys: Iterable[str] = (),
    checkpoint_keys: Iterable[str] = (),
) -> list[str]:
    """One hint per problem kind present, naming the option that allows it and its effect.

    Args:
        explained_missing, explained_unexpected: keys a suggested remap already pairs; the
            allow hints cover only the rest.
        dtype_pairs: ``{key: (checkpoint dtype, module dtype)}`` for the dtype problems.
        module_keys, checkpoint_keys: every key on each side, so that a suggested allow
            pattern is checked to match no key but the reported ones.
    """
    by_kind: dict[str, list[Problem]] = defaultdict(list)
    for p in problems:
        by_kind[p.kind].append(p)
    hints: list[str] = []
    skip_m, skip_u = set(explained_missing), set(explained_unexpected)

    missing = [p.key for p in by_kind["missing"] if p.key not in skip_m]
    if missing:
        pats = allow_patterns(missing, module_keys)
        if pats is None:
            hints.append(
                f"{len(missing)} module keys are not in the checkpoint ({_some(missing)}): if the module may keep "
                "their initial values, load with strict=False (CLI: --no-strict), or list them in allow_missing"
            )
        else:
            hints.append(
                f"to keep the initial values of {_some(missing)} (not in the checkpoint), pass "
                f"allow_missing={_python_list(pats)} (CLI: {_cli_flags('--allow-missing', pats)})"
            )
    unexpected = [p.key for p in by_kind["unexpected"] if p.key not in skip_u]
    if unexpected:
        pats = allow_patterns(unexpected, checkpoint_keys)
        if pats is None:
            hints.append(
                f"{len(unexpected)} checkpoint keys are not in the module ({_some(unexpected)}): to leave them "
                "out, load with strict=False (CLI: --no-strict), or list them in allow_unexpected"
            )
        else:
            hints.append(
                f"to leave out {_some(unexpected)} (not in the module), pass "
                f"allow_unexpected={_python_list(pats)} (CLI: {_cli_flags('--allow-unexpected', pats)})"
            )
    if by_kind["shape"]:
        keys = [p.key for p in by_kind["shape"]]
        hints.append(
            f"shapes differ for {_some(keys)}: no option loads a tensor of another shape; build the module with "
            "the checkpoint's configuration, or remap the keys if they belong to other layers"
        )
    if by_kind["dtype"]:
        hints += _dtype_hints([p.key for p in by_kind["dtype"]], dtype_pairs or {})
    if by_kind["class"]:
        paths = [p.key or "(root)" for p in by_kind["class"]]
        hints.append(
            f"layer classes differ at {_some(paths)}: if the swap is deliberate (same parameters, another "
            "implementation), pass check_classes=False (CLI: --no-check-classes); names, shapes and dtypes are "
            "still checked"
        )
    aliases = by_kind["alias"]
    untie = [p.key for p in aliases if p.found and p.found.startswith("tied")]
    tie = [p.key for p in aliases if not (p.found and p.found.startswith("tied"))]
    if untie:
        hints.append(
            f"the checkpoint ties {_some(untie)} to another key that the module keeps separate: pass untie=True "
            "(CLI: --untie) to copy the stored value into each separate module tensor (torch's load_state_dict "
            "does this silently, and the module stays untied)"
        )
    if tie:
        hints.append(
            f"the module ties {_some(tie)} to another key, but the checkpoint holds different values for them: "
            "pass tie=True (CLI: --tie) to load the value of the tie's first key the checkpoint holds and discard "
            "the others (torch's load_state_dict silently keeps whichever it copies last), or untie the module's "
            "tensors before loading"
        )
    return hints


def _dtype_hints(keys: list[str], pairs: dict[str, tuple[str, str]]) -> list[str]:
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for key in keys:
        if key in pairs:
            groups[pairs[key]].append(key)
    castable = {pair: ks for pair, ks in groups.items() if uncastable(*pair) is None}
    hints = []
    if castable:
        effects = "; ".join(f"{a} -> {b} {cast_effect(a, b)} ({_some(ks, 2)})" for (a, b), ks in sorted(castable.items()))
        n = sum(len(ks) for ks in castable.values())
        hints.append(
            f"pass cast=True (CLI: --cast) to convert {n} tensor{'s' if n != 1 else ''} to the module's dtypes: {effects}"
        )
    for (a, b), ks in sorted(groups.items()):
        reason = uncastable(a, b)
        if reason is not None:
            hints.append(
                f"{_some(ks, 2)}: {a} cannot be loaded as {b} even with cast=True ({reason}); change the module's "
                "dtype or convert the checkpoint"
            )
    return hints
