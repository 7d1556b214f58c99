"""The ``manifest-ckpt`` command line.

``run(argv, stdout, stderr) -> int`` does the work and is what tests call; ``main()`` is the
console script. Exit codes: 0 ok, 1 a check or verification failed, 2 bad usage or
unreadable input. Every command prints a human view by default and JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from manifest_ckpt._version import __version__
from manifest_ckpt.cli.render import inspect_text
from manifest_ckpt.errors import (
    ArchiveError,
    CheckpointNotFoundError,
    IntegrityError,
    ManifestCkptError,
    ManifestError,
)
from manifest_ckpt.format.integrity import os_reason
from manifest_ckpt.storage.store import is_url, open_store, read_store_manifest

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _UsageError(Exception):
    """Raised by the parser instead of exiting, so ``run`` can return 2."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, stream: TextIO, out: TextIO | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stream = stream
        self._out = out if out is not None else stream

    def _print_message(self, message: str, file: Any = None) -> None:
        # argparse sends --help and --version to stdout (so `$(manifest-ckpt --version)` works)
        # and usage errors to stderr; keep that split with the streams run() was given.
        if message:
            (self._out if file is None or file is sys.stdout else self._stream).write(message)

    def error(self, message: str) -> NoReturn:
        self.print_usage(self._stream)
        raise _UsageError(f"{self.prog}: error: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self._stream.write(message)
        raise SystemExit(status)


def _error_json(exc: BaseException) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(exc).__name__, "message": failure_reason(exc)}
    if isinstance(exc, OSError) and not isinstance(exc, ManifestCkptError):
        if isinstance(exc.errno, int):
            out["errno"] = errno.errorcode.get(exc.errno, exc.errno)
        if exc.filename is not None:
            out["file"] = str(exc.filename)
    for attr in ("file", "field", "key", "member", "global_name", "argument", "pattern"):
        value = getattr(exc, attr, None)
        if value is not None:
            out[attr] = value
    return out


def _emit_json(stdout: TextIO, document: Any) -> None:
    stdout.write(json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


# -- commands ---------------------------------------------------------------------------


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--storage-option KEY=VALUE`` pairs as fsspec options (empty for local paths)."""
    from manifest_ckpt.storage.remote import parse_storage_options

    return parse_storage_options(getattr(args, "storage_option", None))


def _cmd_inspect(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    store = open_store(args.path, storage_options=_storage_options(args))
    manifest = read_store_manifest(store)
    if args.json:
        from manifest_ckpt.cli.render import dtype_totals, state_rows

        _emit_json(
            out,
            {"checkpoint": store.location, "digest": manifest.digest, "totals": dtype_totals(manifest),
             "state": state_rows(manifest) if manifest.state is not None else None,
             "manifest": manifest.to_dict()},
        )
    else:
        out.write(inspect_text(manifest, store.location, max_depth=args.depth) + "\n")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from manifest_ckpt.reader import verify_report

    try:
        result = verify_report(
            args.path, progress=not args.quiet, search=args.search, storage_options=_storage_options(args)
        )
    except CheckpointNotFoundError:
        raise
    except (IntegrityError, ManifestError, ArchiveError) as exc:  # a damaged archive fails verification
        if args.json:
            _emit_json(out, {"checkpoint": str(args.path), "ok": False, "error": _error_json(exc)})
        else:
            err.write(f"FAILED {args.path}\n{exc}\n")
        return EXIT_FAILED
    if args.json:
        _emit_json(out, {"checkpoint": str(args.path), "ok": True, **result})
    else:
        out.write(
            f"OK {args.path}\n  digest   {result['digest']}\n  verified {result['tensors']} tensors, "
            f"{result['bytes']:,} bytes in {result['files']} file{'s' if result['files'] != 1 else ''}\n"
        )
        for line in result.get("parents_text", []):
            out.write(f"  {line}\n")
    return EXIT_OK


def _cmd_check(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from manifest_ckpt.cli.factory import build_model
    from manifest_ckpt.comparison.remap import parse_remap_args
    from manifest_ckpt.comparison.transforms import parse_transforms_arg
    from manifest_ckpt.reader import check

    model = build_model(args.model)
    report = check(
        model,
        args.path,
        remap=parse_remap_args(args.remap) or None,
        transforms=parse_transforms_arg(args.transforms),
        allow_missing=args.allow_missing,
        allow_unexpected=args.allow_unexpected,
        strict=args.strict,
        cast=args.cast,
        check_classes=args.check_classes,
        untie=args.untie,
        tie=args.tie,
        storage_options=_storage_options(args),
    )
    if args.json:
        _emit_json(out, {"checkpoint": str(args.path), "model": args.model, **report.to_dict()})
    else:
        out.write(f"{'OK' if report.ok else 'MISMATCH'} {args.path} vs {args.model}\n{report}\n")
    return EXIT_OK if report.ok else EXIT_FAILED


def _cmd_schema(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from manifest_ckpt.format.schema import schema_text

    out.write(schema_text())  # already the JSON document, with or without --json
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from manifest_ckpt.cli.demo import run_demo

    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        return run_demo(Path(args.dir), out, as_json=args.json)
    with tempfile.TemporaryDirectory(prefix="manifest-ckpt-demo-") as tmp:
        return run_demo(Path(tmp), out, as_json=args.json)


def _cmd_convert(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from manifest_ckpt.cli.convert import cli_convert

    return cli_convert(args, out, err)


def _cmd_export_hf(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from manifest_ckpt.cli.progress import human_bytes
    from manifest_ckpt.exporters.hf import export_hf

    size = int(args.max_shard_size) if args.max_shard_size and args.max_shard_size.isdigit() else args.max_shard_size
    result = export_hf(
        args.ckpt,
        args.dir,
        max_shard_size=size,
        overwrite=args.overwrite,
        record_digest=not args.no_digest,
        storage_options=_storage_options(args),
    )
    if args.json:
        _emit_json(out, {"ok": True, "checkpoint": str(args.ckpt), **result.to_dict()})
        return EXIT_OK
    files = result.files if len(result.files) <= 2 else (result.files[0], "...", result.files[-1])
    counts = f"{len(result.files)} file{'' if len(result.files) == 1 else 's'}, {len(result.weight_map)} tensors"
    rows = [("files", f"{' '.join(files)} ({counts}, {human_bytes(result.total_size)})")]
    if result.index:
        rows.append(("index", result.index))
    rows += [("tie", f"{alias} left out (transformers re-ties it to {target})")
             for alias, target in result.dropped_ties.items()]
    rows.append(("digest", f"{result.digest} (every tensor verified first)"))
    out.write(f"exported {args.ckpt} -> {args.dir}\n" + "".join(f"  {k:<7} {v}\n" for k, v in rows))
    return EXIT_OK


def _cmd_pack(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from manifest_ckpt.storage.archive import pack

    verify = not args.no_verify
    options = _storage_options(args)
    manifest = pack(
        args.ckpt, args.out, overwrite=args.overwrite, verify=verify, progress=not args.quiet, storage_options=options
    )
    if is_url(args.out):
        from manifest_ckpt.storage.remote import object_size

        size = object_size(args.out, options)
    else:
        size = Path(args.out).stat().st_size
    members = 1 + len(manifest.files)
    if args.json:
        _emit_json(out, {"archive": str(args.out), "checkpoint": str(args.ckpt), "digest": manifest.digest,
                         "bytes": size, "members": members, "verified": verify})
    else:
        checked = f"{len(manifest.tensors)} tensors verified" if verify else "tensors not verified"
        out.write(f"packed {args.ckpt} -> {args.out}\n  digest   {manifest.digest}\n"
                  f"  archive  {size:,} bytes, {members} members, {checked}\n")
    return EXIT_OK


def _cmd_unpack(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from manifest_ckpt.storage.archive import unpack

    verify = not args.no_verify
    manifest = unpack(
        args.archive, args.dir, verify=verify, progress=not args.quiet, storage_options=_storage_options(args)
    )
    if args.json:
        _emit_json(out, {"archive": str(args.archive), "checkpoint": str(args.dir), "digest": manifest.digest,
                         "files": 1 + len(manifest.files), "verified": verify})
    else:
        checked = f"{len(manifest.tensors)} tensors verified" if verify else "tensors not verified"
        out.write(f"unpacked {args.archive} -> {args.dir}\n  digest   {manifest.digest}\n"
                  f"  {1 + len(manifest.files)} files, {checked}\n")
    return EXIT_OK


def _cmd_diff(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from manifest_ckpt.comparison.diff import diff

    result = diff(
        args.a, args.b, values=not args.no_values, progress=not args.quiet, storage_options=_storage_options(args)
    )
    if args.json:
        _emit_json(out, result.to_dict())
    else:
        out.write(f"{result}\n")
    return EXIT_OK if result.identical else EXIT_FAILED


def _cmd_lineage(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from manifest_ckpt.lineage import ancestry

    chain = ancestry(
        args.path, search=args.search, verify=not args.no_verify, progress=not args.quiet,
        storage_options=_storage_options(args),
    )
    if args.json:
        _emit_json(out, chain.to_dict())
    else:
        out.write(f"{chain}\n")
    return EXIT_OK if chain.ok else EXIT_FAILED


# -- parser -----------------------------------------------------------------------------

Command = Callable[[argparse.Namespace, TextIO, TextIO], int]


def add_policies(p: argparse.ArgumentParser) -> None:
    """The key policies ``check`` and ``convert`` share with ``load`` (same names, same meaning)."""
    p.add_argument("--allow-missing", action="append", default=[], metavar="REGEX",
                   help="module keys (re.fullmatch) the checkpoint may lack (repeatable)")
    p.add_argument("--allow-unexpected", action="append", default=[], metavar="REGEX",
                   help="checkpoint keys (re.fullmatch) the module may lack; left out (repeatable)")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="allow every missing and unexpected key, as torch's strict=False")
    p.add_argument("--untie", action="store_true",
                   help="a checkpoint tie may load into tensors the module keeps separate (each gets the value)")
    p.add_argument("--tie", action="store_true",
                   help="different checkpoint values may load into one tied module tensor (the first is kept)")


def _parser(stream: TextIO, out: TextIO | None = None) -> _Parser:
    parser = _Parser(
        prog="manifest-ckpt",
        description="PyTorch checkpoints with a validated manifest: inspect, verify, check, convert, archive.",
        stream=stream,
        out=out,
    )
    parser.add_argument("--version", action="version", version=f"manifest-ckpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(
        name: str, handler: Command, help_text: str, *, storage: bool = False, progress: bool = False
    ) -> argparse.ArgumentParser:
        """A subcommand; every one takes ``--json``, long-running ones ``--quiet``, URL-reading ones storage options."""
        p = sub.add_parser(name, help=help_text, description=help_text, stream=stream, out=out)
        p.set_defaults(handler=handler)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if progress:
            p.add_argument("--quiet", action="store_true", help="no progress bar")
        if storage:
            p.add_argument(
                "--storage-option", action="append", default=[], metavar="KEY=VALUE",
                help="fsspec option for URL paths (s3://, gs://, memory://...), repeatable; JSON values are "
                "parsed (anon=true). Endpoints and credentials also come from AWS_ENDPOINT_URL and friends.",
            )
        return p

    p = add("inspect", _cmd_inspect, "show the module tree, dtypes, sizes, digest and lineage", storage=True)
    p.add_argument("path", help="checkpoint directory, manifest.json, archive or URL")
    p.add_argument("--depth", type=int, default=None, help="show the module tree to this depth")

    p = add("verify", _cmd_verify, "check schema, file binding, sizes, every digest, and parents found", storage=True, progress=True)
    p.add_argument("path", help="checkpoint directory, manifest.json, archive or URL")
    p.add_argument("--search", action="append", default=[], metavar="DIR",
                   help="also verify parents found under DIR (repeatable)")

    p = add("check", _cmd_check, "compare a checkpoint with a model built by a factory; load nothing", storage=True)
    p.add_argument("path", help="checkpoint directory, manifest.json, archive or URL")
    p.add_argument("--model", required=True, metavar="pkg.module:factory",
                   help="import path (or file.py:name) of a module or a factory that builds one")
    p.add_argument("--remap", action="append", default=[], metavar="REGEX=REPLACEMENT",
                   help="rename checkpoint keys first (repeatable, applied in order)")
    p.add_argument("--transforms", metavar="NAME|RULES.json",
                   help="key transforms after --remap: a rule set (mixtral, qwen2_moe, qwen3_moe, deepseek_v2, "
                        "deepseek_v3) or a JSON list of rules (stack/unstack/concat/split/transpose/rename)")
    add_policies(p)
    p.add_argument("--cast", action="store_true", help="accept dtype differences (load would cast)")
    p.add_argument("--no-check-classes", dest="check_classes", action="store_false",
                   help="accept different layer classes (a deliberate swap); names, shapes, dtypes still checked")

    add("schema", _cmd_schema, "print the manifest JSON Schema")

    p = add("demo", _cmd_demo, "save, inspect, verify, refuse a wrong model, load through a suggested remap")
    p.add_argument("--dir", help="keep the demo's checkpoints in this directory")

    p = add("convert", _cmd_convert, "convert a .pth/.ckpt/.bin, .safetensors or sharded HF checkpoint; runs no pickled code", storage=True, progress=True)
    p.add_argument("src", help="a torch.save file (.pt/.pth/.bin/.ckpt), a .safetensors file, a *.safetensors.index.json or "
                               "*.bin.index.json, or a directory with one index and its shards")
    p.add_argument("dst", help="the checkpoint directory to create")
    p.add_argument("--model", metavar="pkg.module:factory", help="check the keys against this model and record its module tree")
    p.add_argument("--key", metavar="NAME", help="where the tensor dict lies in the container (e.g. state_dict)")
    p.add_argument("--remap", action="append", default=[], metavar="REGEX=REPLACEMENT",
                   help="rename source keys first (repeatable, applied in order)")
    add_policies(p)
    p.add_argument("--transforms", metavar="NAME|RULES.json",
                   help="key transforms after --remap: a rule set (mixtral, qwen2_moe, qwen3_moe, deepseek_v2, "
                        "deepseek_v3) or a JSON list of rules (stack/unstack/concat/split/transpose/rename)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at DST")

    p = add("export-hf", _cmd_export_hf, "write a checkpoint as a save_pretrained directory (from_pretrained loads it)",
            storage=True)
    p.add_argument("ckpt", help="checkpoint directory, manifest.json, archive or URL")
    p.add_argument("dir", help="directory to write the weights into (config.json and other files are left alone)")
    p.add_argument("--max-shard-size", metavar="SIZE", help="bytes per shard, e.g. 5GB or 200MB (default 50GB, as save_pretrained)")
    p.add_argument("--overwrite", action="store_true", help="replace weight files already in DIR")
    p.add_argument("--no-digest", action="store_true",
                   help="leave the checkpoint's digest out of the files' metadata (exactly save_pretrained's bytes)")

    p = add("pack", _cmd_pack, "write a checkpoint as one reproducible, page-aligned tar archive", storage=True, progress=True)
    p.add_argument("ckpt", help="checkpoint directory or manifest.json")
    p.add_argument("out", help="archive file to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-verify", action="store_true", help="skip hashing every tensor before packing")

    p = add("unpack", _cmd_unpack, "extract an archive into a new directory; refuse unsafe entries", storage=True, progress=True)
    p.add_argument("archive", help="archive file")
    p.add_argument("dir", help="directory to create (must not exist, or be empty)")
    p.add_argument("--no-verify", action="store_true", help="skip hashing every tensor before extracting")

    p = add("diff", _cmd_diff, "structure, value and lineage differences; exit 0 identical, 1 different", storage=True, progress=True)
    p.add_argument("a", help="checkpoint directory, manifest.json, archive or URL")
    p.add_argument("b", help="checkpoint directory, manifest.json, archive or URL")
    p.add_argument("--no-values", action="store_true", help="list keys whose digests differ without reading them")

    p = add("lineage", _cmd_lineage, "print the ancestry, verifying every ancestor found by digest", storage=True, progress=True)
    p.add_argument("path", help="checkpoint directory, manifest.json, archive or URL")
    p.add_argument("--search", action="append", default=[], metavar="DIR",
                   help="look for ancestors under DIR (repeatable): checkpoint directories and archives")
    p.add_argument("--no-verify", action="store_true", help="find ancestors without hashing their tensors")
    return parser


def run(argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run the command line; return the exit code instead of exiting."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    parser = _parser(err, out)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except _UsageError as exc:
        err.write(f"{exc}\n")
        return EXIT_USAGE
    except SystemExit as exc:  # --help and --version
        if exc.code == 0 and argv is not None:
            return EXIT_OK
        return int(exc.code or 0)
    try:
        return int(args.handler(args, out, err))
    except KeyboardInterrupt:
        err.write("interrupted\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns any failure into exit 2
        if getattr(args, "json", False):
            _emit_json(out, {"ok": False, "error": _error_json(exc)})
        err.write(f"error: {failure_reason(exc)}\n")
        return EXIT_USAGE


def failure_reason(exc: BaseException) -> str:
    """What to print for a command that could not run: never a traceback.

    Library errors carry their own message (what, where, what to do). Environment failures
    (disk full, read-only file system, permissions, memory) and input nested deeper than
    Python recurses get one line naming the file where known. Anything else is a bug in
    manifest-ckpt, said so in one line.
    """
    if isinstance(exc, ManifestCkptError):
        return str(exc)
    if isinstance(exc, OSError):
        what = os_reason(exc) if exc.errno or exc.strerror else str(exc) or type(exc).__name__
        code = errno.errorcode.get(exc.errno, "") if isinstance(exc.errno, int) else ""
        where = f"{exc.filename}: " if exc.filename is not None else ""
        advice = _OS_ADVICE.get(code, "check the path and the file system, then try again")
        return f"{where}{what}{f' ({code})' if code else ''}; {advice}"
    if isinstance(exc, MemoryError):
        return "out of memory; free memory or use a machine with more, then try again"
    if isinstance(exc, RecursionError):
        return "the input is nested too deeply to read (hostile or corrupt input?); nothing was written"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return (
        f"internal error {type(exc).__name__}{f': {text}' if text else ''}; this is a bug in manifest-ckpt "
        f"{__version__}, please report it with the command line"
    )


_OS_ADVICE = {
    "ENOSPC": "the disk is full: free space or write elsewhere",
    "EDQUOT": "the disk quota is exhausted: free space or write elsewhere",
    "EROFS": "the file system is read-only: write elsewhere",
    "EACCES": "permission denied: check the file's and directory's permissions",
    "EPERM": "operation not permitted: check permissions",
    "ENOENT": "no such file or directory: check the path",
    "ENOTDIR": "a component of the path is not a directory: check the path",
    "EISDIR": "it is a directory: give a file path",
    "EIO": "the device reported an I/O error: check the disk",
    "EMFILE": "too many open files: raise the limit (ulimit -n)",
}


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())


if __name__ == "__main__":
    main()
