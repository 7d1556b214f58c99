"""Builders of hostile and damaged torch checkpoints for the safe-reader tests.

Every payload here, if it ever ran, would create a sentinel file; tests assert it never appears.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

# The first three pickles of a legacy torch.save file (torch.serialization constants).
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

PROTO2 = b"\x80\x02"
PROTO4 = b"\x80\x04"
STOP = b"."


class Reducer:
    """An object whose unpickling calls ``fn(*args)``: the classic pickle exploit."""

    def __init__(self, fn: Any, args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


def touch_code(sentinel: Path) -> str:
    """Python source that creates ``sentinel``."""
    return f"open({str(sentinel)!r}, 'w').close()"


def payloads(sentinel: Path) -> dict[str, tuple[Reducer, str]]:
    """Payload name -> (object that creates ``sentinel`` when unpickled, the global it pickles as)."""
    argv = [sys.executable, "-c", touch_code(sentinel)]
    return {
        "os.system": (
            Reducer(os.system, (f'{sys.executable} -c "{touch_code(sentinel)}"',)),
            f"{os.system.__module__}.system",
        ),
        "builtins.exec": (Reducer(exec, (touch_code(sentinel),)), "builtins.exec"),
        "subprocess.Popen": (Reducer(subprocess.Popen, (argv,)), "subprocess.Popen"),
        "subprocess.run": (Reducer(subprocess.run, (argv,)), "subprocess.run"),
    }


def unicode(text: str) -> bytes:
    """BINUNICODE opcode pushing ``text`` (protocol 1+)."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def short_unicode(text: str) -> bytes:
    """SHORT_BINUNICODE opcode pushing ``text`` (protocol 4)."""
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def system_call(sentinel: Path) -> bytes:
    """Opcodes that push the shell command argument tuple and REDUCE (call) the global below it."""
    return unicode(f'{sys.executable} -c "{touch_code(sentinel)}"') + b"\x85" + b"R"


def global_pickle(sentinel: Path) -> bytes:
    """Hand-built protocol-2 pickle: GLOBAL 'os system', then call it."""
    return PROTO2 + b"cos\nsystem\n" + system_call(sentinel) + STOP


def stack_global_pickle(sentinel: Path, *, memoized: bool = False) -> bytes:
    """Hand-built protocol-4 pickle: STACK_GLOBAL from pushed (optionally memoized) strings."""
    if memoized:
        # push, MEMOIZE, POP each name; then fetch both back with BINGET.
        names = short_unicode("os") + b"\x94" + b"0" + short_unicode("system") + b"\x94" + b"0" + b"h\x00" + b"h\x01"
    else:
        names = short_unicode("os") + short_unicode("system")
    return PROTO4 + names + b"\x93" + system_call(sentinel) + STOP


def unresolvable_stack_global_pickle() -> bytes:
    """STACK_GLOBAL whose module operand is built at run time (an empty dict), not a literal string."""
    return PROTO4 + b"}" + short_unicode("system") + b"\x93" + b")" + b"R" + STOP


def doubling_dag_pickle(levels: int) -> bytes:
    """Lists where list i holds list i-1 twice: tiny on disk, 2**levels paths for a naive walk."""

    def put(i: int) -> bytes:
        return b"r" + i.to_bytes(4, "little")  # LONG_BINPUT

    def get(i: int) -> bytes:
        return b"j" + i.to_bytes(4, "little")  # LONG_BINGET

    body = b"]" + put(0)
    for i in range(1, levels + 1):
        body += b"]" + put(i) + b"(" + get(i - 1) + get(i - 1) + b"e"  # MARK ... APPENDS
    return PROTO2 + body + STOP


def legacy_bytes(main_pickle: bytes) -> bytes:
    """A legacy torch.save stream around ``main_pickle`` (no storages)."""
    sys_info = {
        "protocol_version": LEGACY_PROTOCOL,
        "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 4},
    }
    return (
        pickle.dumps(LEGACY_MAGIC, protocol=2)
        + pickle.dumps(LEGACY_PROTOCOL, protocol=2)
        + pickle.dumps(sys_info, protocol=2)
        + main_pickle
        + pickle.dumps([], protocol=2)
    )


def swap_data_pkl(src: Path, dst: Path, data_pkl: bytes) -> Path:
    """Copy the zip checkpoint ``src`` to ``dst`` with its ``<archive>/data.pkl`` replaced."""
    with zipfile.ZipFile(src) as original, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for info in original.infolist():
            data = data_pkl if info.filename.endswith("/data.pkl") else original.read(info)
            out.writestr(info, data)
    return dst


def zip_with(dst: Path, members: dict[str, bytes]) -> Path:
    """A stored (uncompressed) zip archive holding ``members``."""
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for name, data in members.items():
            out.writestr(name, data)
    return dst


def sized_call(module: str, name: str, count: int, opcode: bytes = b"R") -> bytes:
    """``{"w": module.name(count)}`` as protocol-2 opcodes: a constructor called with a bare size."""
    call = b"c" + f"{module}\n{name}\n".encode() + b"J" + struct.pack("<i", count) + b"\x85" + opcode
    return PROTO2 + b"}" + unicode("w") + call + b"s" + STOP


def rebuilt_from_sized_storage(count: int) -> bytes:
    """``{"w": _rebuild_tensor_v2(TypedStorage(count), 0, (count,), (1,), False, OrderedDict())}``."""
    size = b"J" + struct.pack("<i", count)
    storage = b"ctorch.storage\nTypedStorage\n" + size + b"\x85R"
    args = b"(" + storage + b"K\x00" + size + b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)Rt"
    return PROTO2 + b"}" + unicode("w") + b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R" + b"s" + STOP
