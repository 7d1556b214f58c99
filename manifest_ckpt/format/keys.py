"""What a storable state-dict key is, checked by every writer before it writes (no torch import).

The manifest schema bounds keys (``$defs.key``: 1 to 4096 characters) and a safetensors
header reserves ``__metadata__``; a writer that let such a key through would write a
checkpoint its own reader refuses. Keys are also written as UTF-8, so a lone surrogate
(which Python strings can hold and UTF-8 cannot encode) is refused here too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from manifest_ckpt.errors import InvalidKeyError
from manifest_ckpt.format.safetensors_header import METADATA_KEY

# The schema's $defs.key.maxLength (tests/test_keys.py keeps the two equal).
MAX_KEY_LENGTH: Final = 4096
RESERVED_KEYS: Final = frozenset({METADATA_KEY})
_SHOWN: Final = 10


def key_problem(key: object) -> str | None:
    """Why ``key`` cannot be stored, or None when it can."""
    if not isinstance(key, str):
        return f"is a {type(key).__name__}, not a string"
    if not key:
        return "is empty"
    if key in RESERVED_KEYS:
        return "is reserved by the safetensors format for the header's metadata"
    if len(key) > MAX_KEY_LENGTH:
        return f"is {len(key)} characters long; the manifest schema allows at most {MAX_KEY_LENGTH}"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "holds a lone surrogate, which UTF-8 (and so JSON on disk) cannot encode"
    return None


def check_keys(keys: Iterable[object], *, writer: str) -> None:
    """Refuse every key that cannot be stored, naming each, before anything is written.

    Args:
        keys: the state-dict keys about to be written.
        writer: the writing call, for the message (``save``, ``convert``, ``distributed.save``).

    Raises:
        InvalidKeyError: one or more keys are empty, reserved, too long or not encodable.
    """
    bad = [(k, why) for k in keys if (why := key_problem(k)) is not None]
    if not bad:
        return
    lines = "\n".join(f"  {_show(k)} {why}" for k, why in bad[:_SHOWN])
    more = f"\n  ... and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    raise InvalidKeyError(
        f"{writer}: {len(bad)} state-dict key{'s' if len(bad) != 1 else ''} cannot be stored:\n{lines}{more}\n"
        "Rename them (for example with a remap, or by renaming the module attribute) and save again; "
        "nothing was written.",
        key=bad[0][0] if isinstance(bad[0][0], str) else None,
    )


def _show(key: object) -> str:
    text = ascii(key)
    return text if len(text) <= 80 else text[:40] + "..." + text[-20:]
