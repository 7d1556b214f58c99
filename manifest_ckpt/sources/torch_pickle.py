"""Read pickled ``torch.save`` checkpoints without ever running code from them.

Two defences, in order. First, every pickle the loader would unpickle is scanned opcode by
opcode (``pickletools.genops``) and every global it references, in ``GLOBAL``, ``INST`` or
``STACK_GLOBAL`` form, is checked against a small allowlist of plain-data constructors; one
outside it stops the read before a single object is built. Second, the file is then loaded
with torch's weights-only unpickler (``torch.load(weights_only=True)``), which enforces its
own allowlist; the few extras (``argparse.Namespace``, numpy scalars and dtypes) are mapped
to harmless stand-ins defined here, so numpy and argparse code never runs either.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import pickletools
import re
import stat
import struct
import sys
import threading
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any, Final, Literal

import torch

from manifest_ckpt.errors import ConversionError, ManifestCkptError, UnsafeCheckpointError
from manifest_ckpt.format.integrity import file_sha256

__all__ = ["TorchFileContents", "read_torch_file"]

TorchFormat = Literal["torch-zip", "torch-legacy"]

_ZIP_MAGIC: Final = b"PK\x03\x04"
# torch.serialization.MAGIC_NUMBER: the first pickle of every legacy (pre-1.6) file.
_LEGACY_MAGIC: Final = 0x1950A86A20F9469CFC6C
# magic, protocol version, sys_info, the object, the storage keys; raw storage bytes follow.
_LEGACY_PICKLES: Final = 5
_LEGACY_HEAD: Final = pickle.dumps(_LEGACY_MAGIC, protocol=2)
# Longest text line (a GLOBAL's module or name) the legacy scan reads; real ones are < 200 bytes.
_MAX_LINE: Final = 1 << 16
# Deeper than any real checkpoint; keeps the post-processing walk far from RecursionError.
_MAX_DEPTH: Final = 200

# Opcodes torch's weights-only unpickler implements (torch/_weights_only_unpickler.py).
# Anything else (protocol 3+ framing, SHORT_BINUNICODE, MEMOIZE...) makes it fail, so a file
# using them is reported as unsupported before torch is asked.
_TORCH_OPCODES: Final = frozenset(
    {
        "PROTO", "STOP", "GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM",
        "SETITEMS", "MARK", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE",
        "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "BININT", "BININT1", "BININT2",
        "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING", "BINPERSID", "BINGET", "LONG_BINGET",
        "BINPUT", "LONG_BINPUT", "LONG1",
    }
)  # fmt: skip


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class TorchFileContents:
    """What a pickled torch checkpoint holds, read without running any of its code.

    Attributes:
        obj: the object tree: dicts, lists, tuples, str, int, float, bool, None and
            ``torch.Tensor``; ``argparse.Namespace`` becomes a dict, numpy scalars become
            Python numbers, numpy dtypes become their name (``"float32"``). Tensors that
            shared storage in the file share it here too; zip files are memory-mapped.
        format: ``"torch-zip"`` (torch >= 1.6) or ``"torch-legacy"``.
        globals: every ``module.qualname`` the pickles reference, sorted.
        size: file size in bytes.
        sha256: hex sha256 of the file (empty when ``read_torch_file(..., sha256=False)``).
    """

    obj: Any
    format: TorchFormat
    globals: tuple[str, ...]
    size: int
    sha256: str


# --------------------------------------------------------------------------- numpy / argparse stand-ins

# numpy's dtype descr ("f8") -> name ("float64"); only fixed-size numbers are plain data.
_NUMPY_DESCR_NAMES: Final = {
    "b1": "bool", "i1": "int8", "i2": "int16", "i4": "int32", "i8": "int64",
    "u1": "uint8", "u2": "uint16", "u4": "uint32", "u8": "uint64",
    "f2": "float16", "f4": "float32", "f8": "float64", "c8": "complex64", "c16": "complex128",
}  # fmt: skip
_NUMPY_FLOAT_CODES: Final = {2: "e", 4: "f", 8: "d"}


class _BadValue(ValueError):
    """A stand-in was handed data it does not accept; reported as ConversionError."""


@dataclass(frozen=True)
class _NumpyTypeName:
    """Stand-in for a numpy scalar type or DType class (``numpy.float32``); becomes its name."""

    name: str


class _NumpyDType:
    """Stand-in for ``numpy.dtype(descr, align, copy)`` restricted to fixed-size numbers."""

    __slots__ = ("byteorder", "descr")

    def __init__(self, descr: object, align: object = False, copy: object = True) -> None:
        if not isinstance(descr, str) or descr not in _NUMPY_DESCR_NAMES:
            raise _BadValue(f"numpy dtype {descr!r} is not a plain number type")
        self.descr = descr
        self.byteorder = "="

    def __setstate__(self, state: object) -> None:
        """Take the byte order from numpy's dtype state ``(version, byteorder, subarray, names, fields, ...)``."""
        if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in ("<", ">", "|", "=")):
            raise _BadValue(f"unexpected numpy dtype state {state!r}")
        if any(part is not None for part in state[2:5]):
            raise _BadValue("structured or sub-array numpy dtypes are not plain data")
        self.byteorder = state[1]

    @property
    def name(self) -> str:
        """numpy's name for the dtype, e.g. ``float64``."""
        return _NUMPY_DESCR_NAMES[self.descr]


def _numpy_scalar(dtype: object, data: object) -> bool | int | float | complex:
    """Stand-in for ``numpy.core.multiarray.scalar``: decode the scalar's raw bytes."""
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
        raise _BadValue(f"numpy scalar needs (dtype, bytes), got ({type(dtype).__name__}, {type(data).__name__})")
    kind, size = dtype.descr[0], int(dtype.descr[1:])
    if len(data) != size:
        raise _BadValue(f"numpy {dtype.name} scalar needs {size} bytes, got {len(data)}")
    big = dtype.byteorder == ">" or (dtype.byteorder == "=" and sys.byteorder == "big")
    if kind == "b":
        return data != b"\x00"
    if kind in "iu":
        return int.from_bytes(data, "big" if big else "little", signed=kind == "i")
    order = ">" if big else "<"
    if kind == "f":
        return float(struct.unpack(order + _NUMPY_FLOAT_CODES[size], data)[0])
    real, imag = struct.unpack(order + _NUMPY_FLOAT_CODES[size // 2] * 2, data)
    return complex(real, imag)


class _Namespace:
    """Stand-in for ``argparse.Namespace``: an attribute bag later turned into a dict."""

    def __setstate__(self, state: object) -> None:
        """Keep the attributes of the pickled namespace; names must be strings."""
        if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
            raise _BadValue(f"argparse.Namespace state must be a dict with str keys, got {type(state).__name__}")
        self.__dict__.update(state)


_NUMPY_TYPE_NAMES: Final = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
)  # fmt: skip
_NUMPY_DTYPE_CLASSES: Final = {
    "Bool": "bool", "Int8": "int8", "Int16": "int16", "Int32": "int32", "Int64": "int64",
    "UInt8": "uint8", "UInt16": "uint16", "UInt32": "uint32", "UInt64": "uint64",
    "Float16": "float16", "Float32": "float32", "Float64": "float64",
    "Complex64": "complex64", "Complex128": "complex128",
}  # fmt: skip


def _extra_safe_globals() -> dict[str, object]:
    """The globals allowed beyond torch's own list, each mapped to a harmless stand-in."""
    extras: dict[str, object] = {
        "argparse.Namespace": _Namespace,
        "numpy.dtype": _NumpyDType,
        "numpy.core.multiarray.scalar": _numpy_scalar,
        "numpy._core.multiarray.scalar": _numpy_scalar,
        "numpy.bool_": _NumpyTypeName("bool"),
    }
    for name in _NUMPY_TYPE_NAMES:
        extras[f"numpy.{name}"] = _NumpyTypeName(name)
    for cls, name in _NUMPY_DTYPE_CLASSES.items():
        extras[f"numpy.dtypes.{cls}DType"] = _NumpyTypeName(name)
    return extras


_EXTRA_SAFE_GLOBALS: Final = _extra_safe_globals()


# --------------------------------------------------------------------------- allowlist


_LEGACY_TYPES: Final = ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")


def _torch_allowlist() -> frozenset[str]:
    """Globals a ``torch.save`` of tensors and plain containers uses; all build data, none run code."""
    names = {
        "collections.OrderedDict",
        "collections.Counter",
        "builtins.set",
        "builtins.bytearray",
        "builtins.complex",
        "_codecs.encode",  # protocol 2 spells bytes as _codecs.encode(str, "latin1")
        "torch.Size",
        "torch.Tensor",
        "torch.device",
        "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout",
        "torch._tensor._rebuild_from_type_v2",
        "torch.storage.UntypedStorage",
        "torch.storage.TypedStorage",
        "torch.per_tensor_affine",
        "torch.per_tensor_symmetric",
        "torch.per_channel_affine",
        "torch.per_channel_symmetric",
        "torch.per_channel_affine_float_qparams",
    }
    names.update(
        f"torch._utils.{fn}"
        for fn in (
            "_rebuild_tensor",
            "_rebuild_tensor_v2",
            "_rebuild_tensor_v3",
            "_rebuild_parameter",
            "_rebuild_parameter_with_state",
            "_rebuild_qtensor",
            "_rebuild_sparse_tensor",
            "_rebuild_meta_tensor_no_storage",
            "_rebuild_device_tensor_from_cpu_tensor",
        )
    )
    # dtypes pickle as ``torch.float32``...
    names.update(str(value) for value in vars(torch).values() if isinstance(value, torch.dtype))
    # Legacy typed storages and tensor types; pre-1.6 files saved on a GPU name the cuda ones.
    for kind in _LEGACY_TYPES:
        names.update(
            {f"torch.{kind}Storage", f"torch.cuda.{kind}Storage", f"torch.{kind}Tensor", f"torch.cuda.{kind}Tensor"}
        )
    names.update(
        f"torch.{kind}Storage"
        for kind in ("ComplexDouble", "ComplexFloat", "QUInt8", "QInt8", "QInt32", "QUInt4x2", "QUInt2x4")
    )
    names.update(f"torch.cuda.{kind}Storage" for kind in ("ComplexDouble", "ComplexFloat"))
    return frozenset(names)


ALLOWED_GLOBALS: Final = _torch_allowlist() | frozenset(_EXTRA_SAFE_GLOBALS)


# --------------------------------------------------------------------------- opcode scan


class _Unresolved:
    """A stack value the scan cannot know statically (anything built at unpickling time)."""


_UNKNOWN: Final = _Unresolved()
_MARK: Final = object()  # a MARK on the simulated stack
_STRING_OPCODES: Final = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
)
_INT_OPCODES: Final = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"})
_PUT_OPCODES: Final = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_TUPLE_SIZES: Final = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "TUPLE": None}
_GET_OPCODES: Final = frozenset({"GET", "BINGET", "LONG_BINGET"})
_MAX_LISTED: Final = 10  # refused globals named in one message
# Strings that only an nn.Module's pickled __dict__ contains together.
_MODULE_MARKERS: Final = frozenset({"_parameters", "_modules"})


class _CorruptPickle(ValueError):
    """The byte stream is not a complete, well-formed pickle."""


@dataclass(frozen=True)
class _Global:
    """A global on the simulated stack, so a later call of it can be judged by name."""

    name: str


@dataclass
class _Scan:
    """What the opcode scan of one or more pickles found."""

    globals: dict[str, None]  # insertion-ordered set: the first global is the outermost object's
    unresolved: list[str]  # descriptions of globals that could not be named statically
    opcodes: set[str]
    markers: set[str]
    result: object = _UNKNOWN  # the value STOP returned, when it is a plain str/int
    # Calls that would allocate memory from nothing: (callable, byte position).
    allocations: list[tuple[str, int]] = field(default_factory=list)
    # Storage key -> bytes it declares (its persistent id's element count x element size).
    storages: dict[str, int] = field(default_factory=dict)
    # Persistent ids that are not the literal storage tuple torch.save writes (byte positions).
    odd_pids: list[int] = field(default_factory=list)


def _new_scan() -> _Scan:
    return _Scan({}, [], set(), set())


# Callables torch.save never calls through REDUCE/NEWOBJ: each builds an n-element storage
# or tensor from an integer, i.e. uninitialised memory of the converting process (or, for
# bytearray, n zero bytes from a 5-byte opcode).
_STORAGE_KINDS: Final = (*_LEGACY_TYPES, "ComplexDouble", "ComplexFloat", "QUInt8", "QInt8", "QInt32", "QUInt4x2", "QUInt2x4")
_ALLOCATORS: Final = frozenset(
    {"torch.storage.UntypedStorage", "torch.storage.TypedStorage", "torch.Tensor", "torch.nn.parameter.Parameter"}
    | {f"torch.{kind}Storage" for kind in _STORAGE_KINDS}
    | {f"torch.cuda.{kind}Storage" for kind in _STORAGE_KINDS}
    | {f"torch.{kind}Tensor" for kind in _LEGACY_TYPES}
    | {f"torch.cuda.{kind}Tensor" for kind in _LEGACY_TYPES}
)
_SIZED: Final = frozenset({"builtins.bytearray"})  # allowed with data, refused with an integer size
_CALL_DEPTH: Final = {"REDUCE": 2, "NEWOBJ": 2, "NEWOBJ_EX": 3}  # the callable's distance from the top


_STORAGE_ITEMSIZES: Final = {
    "Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1, "Byte": 1,
    "Bool": 1, "ComplexDouble": 16, "ComplexFloat": 8, "QUInt8": 1, "QInt8": 1, "QInt32": 4, "QUInt4x2": 1,
    "QUInt2x4": 1,
}  # fmt: skip


def _storage_itemsize(type_name: str) -> int:
    """Bytes per element of a storage type named in a persistent id (``torch.FloatStorage`` -> 4)."""
    kind = type_name.rpartition(".")[2].removesuffix("Storage")
    return _STORAGE_ITEMSIZES.get(kind, 1)  # UntypedStorage counts bytes


def _judge_call(scan: _Scan, name: str, stack: list[object], pos: int) -> None:
    """Record a REDUCE/NEWOBJ/NEWOBJ_EX/OBJ whose callable allocates memory from a size."""
    if name == "OBJ":
        mark = max((i for i, v in enumerate(stack) if v is _MARK), default=-1)
        callable_ = stack[mark + 1] if 0 <= mark < len(stack) - 1 else None
        args: object = tuple(stack[mark + 2 :]) if mark >= 0 else None
    else:
        depth = _CALL_DEPTH[name]
        if len(stack) < depth:
            return  # the generic pop reports the underflow
        callable_, args = stack[-depth], stack[-depth + 1]
    if not isinstance(callable_, _Global):
        return
    if callable_.name in _ALLOCATORS or (callable_.name in _SIZED and not (isinstance(args, tuple) and args and not isinstance(args[0], int))):
        scan.allocations.append((callable_.name, pos))


def _record_pid(scan: _Scan, pid: object, pos: int) -> None:
    """Note the storage a ``BINPERSID`` names: ``('storage', type, key, location, numel, ...)``."""
    if (
        isinstance(pid, tuple)
        and len(pid) >= 5
        and pid[0] == "storage"
        and isinstance(pid[1], _Global)
        and isinstance(pid[2], str)
        and type(pid[4]) is int
        and pid[4] >= 0
    ):
        scan.storages[pid[2]] = pid[4] * _storage_itemsize(pid[1].name)
    else:
        scan.odd_pids.append(pos)


def _canonical(module: str, name: str) -> str:
    """``module.name`` as Python's unpickler resolves it.

    Protocol-2 pickles spell some globals the Python 2 way (``subprocess.Popen`` is written as
    ``commands.Popen``); naming them the Python 3 way makes the refusal readable. torch's own
    remapping table is a subset of this one, so a name allowed here is what torch looks up too.
    """
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _memo_index(arg: object) -> int:
    """A memo opcode's argument, which genops decodes to an int."""
    if not isinstance(arg, int):
        raise _CorruptPickle(f"memo index {arg!r} is not an integer")
    return arg


def _scan_pickle(stream: IO[bytes], scan: _Scan) -> None:
    """Walk one pickle's opcodes up to STOP, recording every global it can reference.

    The stack is simulated symbolically so ``STACK_GLOBAL`` can be resolved from the strings
    (pushed directly or fetched from the memo) it consumes. Every opcode consumes at least one
    byte, so the walk is bounded by the input's size.

    Raises:
        _CorruptPickle: the stream is truncated or malformed.
    """
    stack: list[object] = []
    memo: dict[int, object] = {}

    def pop() -> object:
        if not stack or stack[-1] is _MARK:
            raise _CorruptPickle("stack underflow")
        return stack.pop()

    def pop_mark() -> None:
        while stack:
            if stack.pop() is _MARK:
                return
        raise _CorruptPickle("no MARK on the stack")

    try:
        for opcode, arg, at in pickletools.genops(stream):
            pos = at if at is not None else -1  # genops gives positions: the stream has tell()
            name = opcode.name
            scan.opcodes.add(name)
            pushed: object = _UNKNOWN  # what the generic branch leaves on top, when known better
            if name in ("GLOBAL", "INST"):
                module, _, qualname = str(arg).partition(" ")
                pushed = _Global(_canonical(module, qualname))
                scan.globals[pushed.name] = None
                if name == "INST" and pushed.name in _ALLOCATORS:
                    scan.allocations.append((pushed.name, pos))
            elif name == "STACK_GLOBAL":
                qualname_value, module_value = pop(), pop()
                if isinstance(module_value, str) and isinstance(qualname_value, str):
                    pushed = _Global(_canonical(module_value, qualname_value))
                    scan.globals[pushed.name] = None
                else:
                    scan.unresolved.append(f"STACK_GLOBAL at byte {pos}")
                stack.append(pushed)
                continue
            elif name in _CALL_DEPTH or name == "OBJ":
                _judge_call(scan, name, stack, pos)
            elif name == "BINPERSID" and stack and stack[-1] is not _MARK:
                _record_pid(scan, stack[-1], pos)
            elif name == "PERSID":
                scan.odd_pids.append(pos)
            elif name in _TUPLE_SIZES:
                count = _TUPLE_SIZES[name]
                if count is None:
                    mark = max((i for i, v in enumerate(stack) if v is _MARK), default=-1)
                    pushed = tuple(stack[mark + 1 :])
                elif len(stack) >= count and _MARK not in stack[len(stack) - count :]:
                    pushed = tuple(stack[len(stack) - count :])
            elif name in ("EXT1", "EXT2", "EXT4"):
                scan.unresolved.append(f"{name} (copyreg extension code {arg}) at byte {pos}")

            if name in _PUT_OPCODES or name == "MEMOIZE":
                if not stack or stack[-1] is _MARK:
                    raise _CorruptPickle(f"{name} with an empty stack at byte {pos}")
                memo[len(memo) if name == "MEMOIZE" else _memo_index(arg)] = stack[-1]
            elif name in _GET_OPCODES:
                stack.append(memo.get(_memo_index(arg), _UNKNOWN))
            elif name == "DUP":
                value = pop()
                stack += [value, value]
            elif name == "POP" and stack and stack[-1] is _MARK:
                stack.pop()  # pickle's POP on an empty frame discards the MARK itself
            elif name == "STOP":
                scan.result = pop()
                return
            else:
                before = opcode.stack_before
                if pickletools.markobject in before:
                    pop_mark()
                    for _ in range(before.index(pickletools.markobject)):
                        pop()
                else:
                    for _ in before:
                        pop()
                for item in opcode.stack_after:
                    if item is pickletools.markobject:
                        stack.append(_MARK)
                    elif name in _STRING_OPCODES:
                        stack.append(str(arg))
                        if arg in _MODULE_MARKERS:
                            scan.markers.add(str(arg))
                    elif name in _INT_OPCODES:
                        stack.append(arg)
                    else:
                        stack.append(pushed)
    except (ValueError, EOFError, OverflowError, IndexError, KeyError, struct.error) as exc:
        if isinstance(exc, _CorruptPickle):
            raise
        raise _CorruptPickle(str(exc)) from exc
    raise _CorruptPickle("pickle ended before its STOP opcode")  # pragma: no cover - genops raises first


def _module_pickle(scan: _Scan, bad: list[str]) -> str | None:
    """The class of a pickled ``nn.Module`` among the refused globals, if this looks like one.

    ``torch.save(model)`` pickles the module's ``__dict__``, whose ``_parameters`` and
    ``_modules`` keys no state dict has; its first global is the outermost module's class.
    """
    if bad and (scan.markers >= _MODULE_MARKERS or any(name.startswith("torch.nn.modules.") for name in bad)):
        return bad[0]
    return None


def _check_scan(scan: _Scan, path: str) -> None:
    """Raise if the scan found any global outside the allowlist.

    Raises:
        UnsafeCheckpointError: naming the first offending global (all are listed).
    """
    bad = [name for name in scan.globals if name not in ALLOWED_GLOBALS]  # in order of first use
    if not bad and not scan.unresolved:
        _check_allocations(scan, path)
        return
    module_class = _module_pickle(scan, bad)
    if module_class is not None:
        raise UnsafeCheckpointError(
            f"{path}: refusing to unpickle a whole pickled model: the file references the class "
            f"`{module_class}`, and rebuilding it would import and run that class's code "
            f"(refused globals: {', '.join(bad[:_MAX_LISTED])}{' ...' if len(bad) > _MAX_LISTED else ''}). "
            "Nothing from the file was executed. "
            "In the trusted environment that has the model's code, load it and save only the "
            "weights: `model = torch.load(path, weights_only=False)` then "
            "`torch.save(model.state_dict(), 'weights.pt')`, and convert that file instead.",
            global_name=module_class,
            file=path,
        )
    first = bad[0] if bad else None
    found = [f"`{name}`" for name in bad] + scan.unresolved
    if len(found) > _MAX_LISTED:
        found = [*found[:_MAX_LISTED], f"and {len(found) - _MAX_LISTED} more"]
    raise UnsafeCheckpointError(
        f"{path}: refusing to unpickle: the pickle references {', '.join(found)}, outside the "
        "allowlist of plain-data globals (tensors, storages, dtypes, containers, argparse.Namespace, "
        "numpy scalars and dtypes); unpickling could run arbitrary code. Nothing from the file was "
        "executed. If the file is trusted, load it in the environment that wrote it and re-save "
        "only tensors and plain values, e.g. `torch.save(model.state_dict(), path)`.",
        global_name=first,
        file=path,
    )


def _check_allocations(scan: _Scan, path: str) -> None:
    """Refuse calls that build storages, tensors or buffers from a bare size.

    Raises:
        UnsafeCheckpointError: naming the callable and where it is called.
    """
    if not scan.allocations:
        return
    callable_, pos = scan.allocations[0]
    raise UnsafeCheckpointError(
        f"{path}: refusing to unpickle: the pickle calls `{callable_}` at byte {pos} to build an object from a bare "
        "size instead of from the file's stored data; that would hand out uninitialised memory of the converting "
        f"process (or allocate memory the file does not hold){f' ({len(scan.allocations)} such calls)' if len(scan.allocations) > 1 else ''}. "
        "torch.save never writes such a call, so the file is hand-made. Nothing from the file was executed. "
        "Re-save the weights with `torch.save(model.state_dict(), path)` in a trusted environment.",
        global_name=callable_,
        file=path,
    )


def _check_storages(scan: _Scan, path: str, size: int) -> None:
    """Every storage must be named by a literal persistent id and fit, all together, in the file.

    torch.save writes each storage's bytes into the file (uncompressed), so storages declaring
    more bytes than the file holds are a lie that would make torch allocate them anyway.

    Raises:
        ConversionError: an odd persistent id, or more declared storage bytes than the file has.
    """
    if scan.odd_pids:
        raise ConversionError(
            f"{path}: the pickle has a persistent id at byte {scan.odd_pids[0]} that is not the literal "
            "('storage', type, key, location, size) tuple torch.save writes; the file is hand-made or damaged. "
            "Re-save it with `torch.save(model.state_dict(), path)`.",
            file=path,
        )
    declared = sum(scan.storages.values())
    if declared > size:
        raise ConversionError(
            f"{path}: its {len(scan.storages)} storages declare {declared} bytes but the file has only {size}; "
            "torch.save stores every storage's bytes in the file, so the file is truncated, compressed by hand "
            "or hand-made. Re-copy the file, or re-save it with `torch.save(model.state_dict(), path)`.",
            file=path,
        )


def _check_opcodes(scan: _Scan, path: str) -> None:
    """Refuse pickles that use opcodes torch's weights-only unpickler cannot read.

    Raises:
        ConversionError: naming the opcodes and how to re-save.
    """
    extra = sorted(scan.opcodes - _TORCH_OPCODES)
    if extra:
        raise ConversionError(
            f"{path}: the pickle uses opcodes {', '.join(extra)} (a pickle protocol other than 2, or hand-made), "
            "which torch's weights-only loader cannot read; expected torch.save's default protocol 2. "
            "Re-save it with `torch.save(obj, path)` without `pickle_protocol`.",
            file=path,
        )


# --------------------------------------------------------------------------- containers


@dataclass(frozen=True)
class _ZipPickle:
    """The data.pkl torch will unpickle, and whether every record is stored uncompressed."""

    data: bytes
    stored: bool


def _zip_data_pickle(path: str) -> _ZipPickle:
    """Check the zip's layout and return the bytes torch will unpickle (``<archive>/data.pkl``).

    Raises:
        ConversionError: not a readable zip, duplicate members, no data.pkl, or TorchScript.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ConversionError(
            f"{path}: starts like a zip archive but its directory cannot be read ({exc}); the file is truncated "
            "or damaged. Expected an intact torch.save file; re-copy or re-save it.",
            file=path,
        ) from exc
    counts = Counter(info.filename for info in infos)
    duplicates = sorted(name for name, count in counts.items() if count > 1)
    if duplicates:
        # Zip readers disagree on which duplicate wins; a torch.save file never has any.
        raise ConversionError(
            f"{path}: zip archive has duplicate members ({', '.join(duplicates[:5])}); a torch.save file "
            "has each record once. Refusing a possibly tampered file; re-save it.",
            file=path,
        )
    records = {name.partition("/")[2] for name in counts}
    if "constants.pkl" in records:
        raise ConversionError(
            f"{path}: is a TorchScript archive (torch.jit.save), not a torch.save checkpoint. "
            "Load it with torch.jit.load in a trusted environment and save "
            "`torch.save(module.state_dict(), path)` instead.",
            file=path,
        )
    if "data.pkl" not in records:
        found = ", ".join(sorted(counts)[:5]) or "no members"
        raise ConversionError(
            f"{path}: zip archive has no data.pkl record; expected the torch.save layout "
            f"'<archive>/data.pkl' plus '<archive>/data/<key>' (found: {found}).",
            file=path,
        )
    try:
        # torch's own reader, so the bytes scanned are the bytes torch.load will unpickle.
        with open(path, "rb") as f:
            data = bytes(torch._C.PyTorchFileReader(f).get_record("data.pkl"))
    except (RuntimeError, OSError, ValueError) as exc:
        raise ConversionError(
            f"{path}: torch cannot read this zip archive ({_first_line(exc)}); expected an intact torch.save file.",
            file=path,
        ) from exc
    return _ZipPickle(data, all(info.compress_type == zipfile.ZIP_STORED for info in infos))


def _scan_zip(path: str) -> tuple[_Scan, bool]:
    """Scan a zip checkpoint's data.pkl; also say whether its records can be memory-mapped."""
    scan = _new_scan()
    record = _zip_data_pickle(path)
    try:
        _scan_pickle(io.BytesIO(record.data), scan)
    except _CorruptPickle as exc:
        _check_scan(scan, path)  # a refused global seen before the damage is the better report
        raise ConversionError(
            f"{path}: data.pkl is not a complete pickle ({exc}); expected the object pickle torch.save writes. "
            "The file is truncated or damaged; re-copy or re-save it.",
            file=path,
        ) from exc
    return scan, record.stored


class _ClampedReader:
    """A file reader whose ``read(n)`` never asks for more than the bytes left in the file.

    A hostile length prefix (a 4 GiB string in a 100-byte file) would otherwise make the
    buffered reader allocate the claimed size before finding out it is not there.
    """

    def __init__(self, f: IO[bytes], size: int) -> None:
        self._f = f
        self._size = size

    def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes, never more than remain."""
        left = max(0, self._size - self._f.tell())
        return self._f.read(left if n < 0 else min(n, left))

    def readline(self) -> bytes:
        """Read one line of at most ``_MAX_LINE`` bytes (GLOBAL names; a longer one fails the scan)."""
        return self._f.readline(_MAX_LINE)

    def tell(self) -> int:
        """Current offset, for genops' positions."""
        return self._f.tell()


def _scan_legacy(path: str, size: int) -> _Scan:
    """Scan the five pickles at the head of a legacy (pre-1.6) torch.save file.

    Raises:
        UnsafeCheckpointError: a pickle references a global outside the allowlist.
        ConversionError: the file is not a legacy checkpoint or is truncated.
    """
    scan = _new_scan()
    with open(path, "rb") as raw:
        stream: Any = _ClampedReader(raw, size)
        for index in range(_LEGACY_PICKLES):
            try:
                _scan_pickle(stream, scan)
            except _CorruptPickle as exc:
                if index == 0:
                    raise ConversionError(f"{path}: {_not_a_checkpoint(path, size)}", file=path) from exc
                _check_scan(scan, path)  # a refused global seen before the damage is the better report
                what = "the legacy header" if index < 3 else "the pickled object"
                raise ConversionError(
                    f"{path}: {what} (pickle {index + 1} of {_LEGACY_PICKLES}) is not a complete pickle ({exc}); "
                    "expected a legacy torch.save file. It is truncated or damaged; re-copy or re-save it.",
                    file=path,
                ) from exc
            if index == 0:
                _check_scan(scan, path)  # a plain hostile pickle is reported as hostile, not as "no magic"
                if scan.result != _LEGACY_MAGIC:
                    raise ConversionError(
                        f"{path}: is a pickle but not a torch.save checkpoint: expected the legacy magic number "
                        f"{_LEGACY_MAGIC:#x} as its first pickle. Convert only files written by torch.save.",
                        file=path,
                    )
    return scan


def _not_a_checkpoint(path: str, size: int) -> str:
    """Explain why a file whose first pickle is unreadable was refused."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_HEAD))
        f.seek(257)
        tar = f.read(5) == b"ustar"
    if _LEGACY_HEAD.startswith(head):
        return (
            f"ends after {size} bytes, inside the legacy torch.save header; expected a complete file. "
            "It is truncated; re-copy or re-save it."
        )
    if tar:
        return (
            "is a tar-format torch checkpoint (torch < 0.4), which cannot be read safely; "
            "load and re-save it with a current torch in a trusted environment."
        )
    return (
        "is not a torch.save checkpoint: expected a zip archive (starting b'PK\\x03\\x04') or a legacy "
        f"pickle stream (starting b'\\x80\\x02'), found {head[:8]!r}."
    )


def _head(path: str) -> bytes:
    """The first 8 bytes of a file, for error messages."""
    with open(path, "rb") as f:
        return f.read(8)


def _torch_reason(exc: BaseException) -> str:
    """The reason inside torch's weights-only error, without its generic advice."""
    found = _TORCH_REASON.search(str(exc))
    return found.group(1).strip() if found else _first_line(exc)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch appends long advice)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- load


# torch's safe_globals context manager edits a process-wide set; concurrent loads must not
# remove each other's entries mid-load.
_LOAD_LOCK: Final = threading.Lock()
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")
# torch prefixes the unpickler's reason with several lines of advice about weights_only.
_TORCH_REASON = re.compile(r"WeightsUnpickler error:\s*(.+)")


def _torch_load(path: str, *, mmap: bool) -> Any:
    """``torch.load`` with weights_only, on CPU, with the stand-ins registered."""
    replacements: list[Any] = [(stand_in, name) for name, stand_in in _EXTRA_SAFE_GLOBALS.items()]
    with _LOAD_LOCK, torch.serialization.safe_globals(replacements):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


class _Plainer:
    """Replaces stand-ins by plain values, in place, visiting each shared container once."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.active: set[int] = set()  # containers on the current path, to spot cycles
        # id -> (original, result); holding the original keeps its id from being reused.
        self.done: dict[int, tuple[object, object]] = {}

    def __call__(self, value: Any, depth: int = 0) -> Any:
        """The plain form of ``value``; tensors and unchanged containers keep their identity.

        Raises:
            ConversionError: the tree has a reference cycle or is nested absurdly deep.
        """
        if isinstance(value, _NumpyDType | _NumpyTypeName):
            return value.name
        if not isinstance(value, dict | list | tuple | _Namespace):
            return value
        key = id(value)
        if key in self.done:  # a shared sub-tree: walking it again could take exponential time
            return self.done[key][1]
        if key in self.active:
            raise ConversionError(
                f"{self.path}: the pickled object contains a reference cycle; expected a tree of containers and tensors.",
                file=self.path,
            )
        if depth > _MAX_DEPTH:
            raise ConversionError(
                f"{self.path}: containers are nested more than {_MAX_DEPTH} levels deep; refusing as malformed.",
                file=self.path,
            )
        self.active.add(key)
        result = self._convert(value, depth + 1)
        self.active.discard(key)
        self.done[key] = (value, result)
        return result

    def _convert(self, value: dict[Any, Any] | list[Any] | tuple[Any, ...] | _Namespace, depth: int) -> Any:
        """Convert one container's items (the container itself is already on the active path)."""
        if isinstance(value, _Namespace):
            return {name: self(item, depth) for name, item in vars(value).items()}
        if isinstance(value, tuple):
            items = [self(item, depth) for item in value]
            # Only rebuild when a stand-in was replaced, so torch.Size and shared tuples keep identity.
            changed = any(new is not old for new, old in zip(items, value, strict=True))
            return tuple(items) if changed else value
        if isinstance(value, list):
            value[:] = [self(item, depth) for item in value]
            return value
        # dict (incl. OrderedDict, whose _metadata attribute must survive): rewrite in place.
        pairs = [(self(key, depth), self(item, depth)) for key, item in value.items()]
        value.clear()
        value.update(pairs)
        return value


def _detect_format(path: str) -> TorchFormat:
    """``torch-zip`` or ``torch-legacy`` from the first bytes (legacy is confirmed by its scan)."""
    return "torch-zip" if _head(path)[:4] == _ZIP_MAGIC else "torch-legacy"


def read_torch_file(path: str | os.PathLike[str], *, sha256: bool = True) -> TorchFileContents:
    """Read a ``torch.save`` checkpoint (zip or legacy) without executing anything from it.

    Args:
        path: the ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` file.
        sha256: hash the whole file; a caller that hashes it concurrently passes False.

    Returns:
        The unpickled object tree with tensors (memory-mapped for zip files), the format, the
        referenced globals, and the file's size and sha256.

    Raises:
        UnsafeCheckpointError: the pickle references a global outside the allowlist (named in
            ``.global_name``), including whole pickled ``nn.Module`` objects; nothing was run.
        ConversionError: the file is missing, empty, not a torch checkpoint, or damaged.
    """
    where = os.fspath(path)
    try:
        info = os.stat(where)
    except OSError as exc:
        raise ConversionError(
            f"{where}: cannot read the checkpoint ({exc.strerror or type(exc).__name__}); expected a torch.save file.",
            file=where,
        ) from exc
    if not stat.S_ISREG(info.st_mode):  # a directory, or a FIFO that would block the read
        raise ConversionError(f"{where}: is not a regular file; expected a torch.save checkpoint file.", file=where)
    size = info.st_size
    if size == 0:
        raise ConversionError(f"{where}: the file is empty; expected a torch.save checkpoint.", file=where)

    fmt = _detect_format(where)
    if fmt == "torch-zip":
        scan, mappable = _scan_zip(where)
    else:
        scan, mappable = _scan_legacy(where, size), False
    _check_scan(scan, where)
    _check_opcodes(scan, where)
    _check_storages(scan, where, size)
    digest = file_sha256(where) if sha256 else ""

    try:
        # A hand-made zip with compressed records would map compressed bytes; read those normally.
        obj = _torch_load(where, mmap=mappable)
    except pickle.UnpicklingError as exc:
        # Second line of defence: torch's own allowlist refused something the scan let through.
        match = _REFUSED_GLOBAL.search(str(exc))
        raise UnsafeCheckpointError(
            f"{where}: torch's weights-only unpickler refused the file ({_torch_reason(exc)}). Nothing from the file "
            "was executed. Re-save plain tensors with `torch.save(model.state_dict(), path)` in a trusted environment.",
            global_name=match.group(1) if match else None,
            file=where,
        ) from exc
    except ManifestCkptError:
        raise
    except Exception as exc:
        # Whatever else torch.load raises (RuntimeError, EOFError, KeyError...) means a damaged file.
        raise ConversionError(
            f"{where}: could not read the {fmt} checkpoint ({type(exc).__name__}: {_first_line(exc)}); expected an "
            "intact torch.save file. It is truncated, damaged, or holds values that are not plain data.",
            file=where,
        ) from exc
    try:
        obj = _Plainer(where)(obj)
    except RecursionError as exc:  # pragma: no cover - _MAX_DEPTH stops well before
        raise ConversionError(f"{where}: containers are nested too deeply.", file=where) from exc
    return TorchFileContents(obj=obj, format=fmt, globals=tuple(sorted(scan.globals)), size=size, sha256=digest)
