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


# --------------------------------------------------------------------------- payload assembler
# A payload is a call tree: ``Call(Global(module, name), args)``, args being strings, lists of
# strings, bytes or nested calls. ``assemble`` renders it as pickle opcodes in one of STYLES, each
# a different way of naming the global and of calling it, so that a scanner has to understand
# every opcode family, not one spelling.


class Global:
    """The global ``module.name`` (a dotted name is an attribute path at protocol 4)."""

    def __init__(self, module: str, name: str) -> None:
        self.module = module
        self.name = name


class Call:
    """``func(*args)`` when unpickled."""

    def __init__(self, func: Global | Call, *args: Any) -> None:
        self.func = func
        self.args = args


# name style / call style; ``assemble`` documents each.
STYLES = (
    "GLOBAL",
    "GLOBAL-proto4",
    "GLOBAL-memo-call",
    "STACK_GLOBAL",
    "STACK_GLOBAL-memoize",
    "STACK_GLOBAL-memo-overwrite",
    "STACK_GLOBAL-text-put-get",
    "STACK_GLOBAL-framed",
    "INST",
    "OBJ",
    "NEWOBJ-partial",
    "NEWOBJ_EX-partial",
)


class _Assembler:
    def __init__(self, style: str, memo_base: int) -> None:
        self.style = style
        self.memo = memo_base  # next free memo index (explicit PUTs never collide with the carrier's)

    def _put(self) -> bytes:
        index, self.memo = self.memo, self.memo + 1
        return b"r" + struct.pack("<I", index)

    def _get(self, index: int) -> bytes:
        return b"j" + struct.pack("<I", index)

    def string(self, text: str) -> bytes:
        if self.style == "STACK_GLOBAL-text-put-get":
            return b"V" + text.encode("raw_unicode_escape") + b"\n"
        return unicode(text)

    def global_(self, g: Global) -> bytes:
        style = self.style
        if style in ("GLOBAL", "GLOBAL-proto4", "INST", "OBJ"):
            return b"c" + f"{g.module}\n{g.name}\n".encode()
        if style == "GLOBAL-memo-call":  # the global is memoized, popped, and fetched back later
            index = self.memo
            return b"c" + f"{g.module}\n{g.name}\n".encode() + self._put() + b"0" + b"N0" + self._get(index)
        if style == "STACK_GLOBAL-memoize":  # both names memoized, popped, fetched back with GET
            first = self.memo
            names = unicode(g.module) + self._put() + b"0" + unicode(g.name) + self._put() + b"0"
            return names + self._get(first) + self._get(first + 1) + b"\x93"
        if style == "STACK_GLOBAL-memo-overwrite":  # a harmless module name, then overwritten in place
            index = self.memo
            slot = self._put()
            fake = unicode("torch") + slot + b"0" + unicode(g.module) + slot + b"0"
            return fake + self._get(index) + unicode(g.name) + b"\x93"
        if style == "STACK_GLOBAL-text-put-get":  # text-mode PUT/GET (protocol 0 opcodes)
            index = self.memo
            self.memo += 1
            put, get = f"p{index}\n".encode(), f"g{index}\n".encode()
            return self.string(g.module) + put + b"0" + get + self.string(g.name) + b"\x93"
        return unicode(g.module) + unicode(g.name) + b"\x93"  # STACK_GLOBAL, STACK_GLOBAL-framed

    def value(self, arg: Any) -> bytes:
        if isinstance(arg, Call):
            return self.call(arg, outer=False)
        if isinstance(arg, str):
            return self.string(arg)
        if isinstance(arg, bytes):
            return b"B" + struct.pack("<I", len(arg)) + arg
        if isinstance(arg, list):
            return b"](" + b"".join(self.value(a) for a in arg) + b"e"
        raise TypeError(arg)

    def func(self, func: Global | Call) -> bytes:
        return self.global_(func) if isinstance(func, Global) else self.call(func, outer=False)

    def args(self, args: tuple[Any, ...]) -> bytes:
        return b"(" + b"".join(self.value(a) for a in args) + b"t"

    def call(self, call: Call, *, outer: bool = True) -> bytes:
        style = self.style if outer else "REDUCE"
        body = b"".join(self.value(a) for a in call.args)
        if style == "INST" and isinstance(call.func, Global):  # MARK args INST module name: func(*args)
            return b"(" + body + b"i" + f"{call.func.module}\n{call.func.name}\n".encode()
        if style == "OBJ":  # MARK func args OBJ: func(*args)
            return b"(" + self.func(call.func) + body + b"o"
        if style in ("NEWOBJ-partial", "NEWOBJ_EX-partial"):
            # functools.partial's __new__ binds func and args; an empty REDUCE then calls it.
            partial = b"cfunctools\npartial\n"
            bound = (
                self.args((call.func, *call.args))
                if isinstance(call.func, Call)
                else (b"(" + self.func(call.func) + body + b"t")
            )
            built = partial + bound + (b"\x81" if style == "NEWOBJ-partial" else b"}\x92")
            return built + b")R"
        return self.func(call.func) + self.args(call.args) + b"R"


def assemble(payload: Call, style: str, *, memo_base: int = 1 << 20) -> bytes:
    """Opcodes (no PROTO, no STOP) that leave ``payload``'s result on the stack when unpickled.

    Styles: ``GLOBAL`` (``c`` opcode), ``GLOBAL-proto4`` (the same after a PROTO 4, where dotted
    names are attribute paths), ``GLOBAL-memo-call`` (the function memoized, popped, fetched
    later), ``STACK_GLOBAL`` and its memo tricks (``-memoize``: names fetched back from the memo;
    ``-memo-overwrite``: a harmless name memoized then overwritten at the same index;
    ``-text-put-get``: protocol-0 PUT/GET of text strings; ``-framed``: inside a FRAME),
    ``INST``, ``OBJ``, and ``NEWOBJ``/``NEWOBJ_EX`` building ``functools.partial(func, *args)``
    that an empty REDUCE then calls.
    """
    ops = _Assembler(style, memo_base).call(payload)
    if style == "GLOBAL-proto4":
        return PROTO4 + ops
    if style == "STACK_GLOBAL-framed":
        return b"\x95" + struct.pack("<Q", len(ops)) + ops
    return ops


def payload_pickle(payload: Call, style: str) -> bytes:
    """A whole pickle whose unpickling runs ``payload`` and returns its result."""
    header = PROTO2 if style in ("GLOBAL", "GLOBAL-memo-call", "INST", "OBJ") else PROTO4
    return header + assemble(payload, style) + STOP


def inject(carrier: bytes, payload: Call, style: str, *, at: str = "head") -> bytes:
    """fickling-style injection: run ``payload`` inside the real pickle ``carrier``, result popped.

    ``head`` puts it right after the carrier's PROTO, ``tail`` right before its final STOP, so
    an unsafe load runs the payload and still returns the carrier's object.
    """
    if not carrier.startswith(b"\x80") or not carrier.endswith(STOP):
        raise ValueError("carrier must start with PROTO and end with STOP")
    ops = assemble(payload, style) + b"0"  # POP the payload's result
    if at == "head":
        return carrier[:2] + ops + carrier[2:]
    return carrier[:-1] + ops + STOP
