"""Property: Manifest.from_json's msgspec fast path accepts and refuses exactly what the strict reader does.

The text is a real manifest, written by hand with every JSON spelling the strict reader
accepts: any JSON whitespace around tokens (before colons too), ``\\uXXXX`` and ``\\/``
escapes, surrogate pairs, integers spelled as integral floats (``8.0``, ``8e0``) in tensor,
file and module entries, free-form metadata and lineage values (NaN, infinities, -0.0,
huge integers, quotes and ``":`` in strings and keys), keys repeated anywhere, and a BOM.
Whatever the fast path decides must be what ``json.loads`` + ``Manifest.from_dict`` decide:
the same manifest (entries, digests, canonical bytes) or the same typed error and message.
"""

from __future__ import annotations

import functools
import json
import math
import random
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import manifest_ckpt as mc
from manifest_ckpt.format import jsonio
from manifest_ckpt.format.manifest import Manifest, compute_record_digest

from .strategies import record_example


class _Raw(str):
    """JSON text written as it is (an integer past Python's 4,300-digit limit, ``1e400``)."""


_WHITESPACE = " \t\n\r"
_plain = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**64, -(2**63) - 1, 10**300, -0.0, 5e-324, 1.7976931348623157e308])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.sampled_from(['a":b', 'q"', "\\", "/", "\u2028", "\U0001f600", "\x7f"])
)
# What msgspec refuses or the strict reader refuses, so that the fast path must step aside.
_odd = (
    st.sampled_from([math.nan, math.inf, -math.inf, "\ud800"])
    | st.builds(_Raw, st.sampled_from(["9" * 4301, "-0", "1e400", "-1E400", "1e-400", "Infinity"]))
    | st.just(functools.reduce(lambda inner, _: [inner], range(jsonio.MAX_DEPTH + 1), 0))
)
_scalars = st.integers(0, 9).flatmap(lambda n: _odd if n == 9 else _plain)
_free_form = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=3) | st.sampled_from(['k":', 'a"', "", "\x00"]), children, max_size=4)
    ),
    max_leaves=20,
)


@functools.cache
def _document() -> str:
    """A small saved checkpoint's manifest, as text (saved once per process)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with tempfile.TemporaryDirectory() as tmp:
        mc.save(model, Path(tmp) / "ck", record_code=False)
        return (Path(tmp) / "ck" / "manifest.json").read_text()


class _IntegralFloat(int):
    """An int to be written as an integral float (``8.0``), which the schema counts as an integer."""


def _floated(value: Any, rng: random.Random) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | list | dict):
        return value
    if isinstance(value, int):
        return _IntegralFloat(value) if rng.random() < 0.3 else value
    if isinstance(value, list):
        return [_floated(v, rng) for v in value]
    return {k: _floated(v, rng) for k, v in value.items()}


class _Writer:
    """Writes a JSON value with random (valid) spellings; ``repeat`` is the chance an object repeats a key."""

    def __init__(self, rng: random.Random, spaced: bool, repeat: float) -> None:
        self.rng, self.spaced, self.repeat = rng, spaced, repeat

    def space(self) -> str:
        if not self.spaced or self.rng.random() < 0.6:
            return ""
        return "".join(self.rng.choice(_WHITESPACE) for _ in range(self.rng.randint(1, 2)))

    def string(self, text: str) -> str:
        out = []
        for ch in text:
            code = ord(ch)
            if ch in '"\\':
                out.append("\\" + ch)
            elif code < 0x20 or self.rng.random() < 0.1:
                if code > 0xFFFF:
                    code -= 0x10000
                    out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04X}")
                else:
                    out.append(f"\\u{code:04x}" if self.rng.random() < 0.5 else f"\\u{code:04X}")
            elif ch == "/" and self.rng.random() < 0.5:
                out.append("\\/")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'

    def value(self, value: Any) -> str:
        s = self.space
        if isinstance(value, dict):
            pairs = [(k, v, s()) for k, v in value.items()]
            if pairs and self.rng.random() < self.repeat:
                name, old, _ = self.rng.choice(pairs)
                # The copy's colon is spaced half the time: one key a plain count of '":' misses.
                gap = self.rng.choice(["", "", " ", "\t", "\n", "\r"])
                pairs.insert(
                    self.rng.randint(0, len(pairs)), (name, self.rng.choice([old, old, old, 0, "x", None]), gap)
                )
            body = ",".join(f"{s()}{self.string(k)}{gap}:{s()}{self.value(v)}{s()}" for k, v, gap in pairs)
            return "{" + body + s() + "}"
        if isinstance(value, list):
            return "[" + ",".join(s() + self.value(v) + s() for v in value) + s() + "]"
        if isinstance(value, _IntegralFloat):
            return self.rng.choice(["{}.0", "{}e0", "{}.000", "{}E+0"]).format(int(value))
        if isinstance(value, _Raw):
            return str(value)
        if isinstance(value, str):
            return self.string(value)
        if isinstance(value, float) and math.isfinite(value) and self.rng.random() < 0.3:
            return f"{value:.20e}"
        return json.dumps(value)


def _outcome(text: bytes, *, strict: bool) -> tuple[Any, ...]:
    try:
        if strict:
            with mock.patch.object(jsonio, "decode_fast", lambda data: None):
                manifest = Manifest.from_json(text)
        else:
            manifest = Manifest.from_json(text)
    except mc.ManifestCkptError as exc:
        return ("refused", type(exc).__name__, str(exc), getattr(exc, "field", None))
    modules = None if manifest.modules is None else {p: manifest.modules[p] for p in manifest.modules}
    return (
        "read",
        manifest.to_json(),
        manifest.digest,
        manifest.record_digest,
        repr({k: manifest.tensors[k] for k in manifest.tensors}),
        repr(modules),
        manifest.keys(),
    )


@given(
    metadata=_free_form,
    lineage_extra=st.sampled_from([None] * 4) | _free_form,
    seed=st.integers(0, 2**32 - 1),
    spaced=st.integers(0, 3).map(lambda n: n == 3),
    repeat=st.sampled_from([0.0, 0.03, 0.1]),
    floated=st.booleans(),
    bom=st.integers(0, 9).map(lambda n: n == 9),
)
def test_fast_path_decides_as_the_strict_reader(
    metadata: Any, lineage_extra: Any, seed: int, spaced: bool, repeat: float, floated: bool, bom: bool
) -> None:
    """The same manifest, or the same typed error with the same message, whichever way it is parsed."""
    rng = random.Random(seed)  # the spelling choices (a drawn Random would be drawn char by char)
    document = json.loads(_document())
    document["metadata"] = metadata
    if lineage_extra is not None:
        document["lineage"]["extra"] = lineage_extra  # outside the schema: refused, alike
    document["record_digest"] = compute_record_digest(document["lineage"], metadata, document.get("extensions"))
    if floated:
        for part in ("tensors", "files", "modules"):
            document[part] = _floated(document[part], rng)
    text = _Writer(rng, spaced, repeat).value(document).encode("utf-8", "surrogatepass")
    if bom:
        text = b"\xef\xbb\xbf" + text
    assert _outcome(text, strict=False) == _outcome(text, strict=True)
    record_example()
