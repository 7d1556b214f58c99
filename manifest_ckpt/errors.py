"""The exception family of manifest-ckpt.

Every error raised on bad input derives from :class:`ManifestCkptError` and from the
matching builtin, so ``except ValueError`` in caller code keeps working. Messages name the
file, key or field, say what was expected and what was found, and what to do next.
This module imports nothing from the rest of the package to avoid import cycles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from manifest_ckpt.comparison.report import Report


class ManifestCkptError(Exception):
    """Base class of every error manifest-ckpt raises on purpose."""


class ManifestError(ManifestCkptError, ValueError):
    """The manifest is unreadable, violates the schema, or disagrees with its weights files.

    Attributes:
        file: the file the problem was found in, if known.
        field: a JSON path such as ``tensors["fc.weight"].shape``, if known.
    """

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.file = file
        self.field = field


class CheckpointNotFoundError(ManifestCkptError, FileNotFoundError):
    """The path does not exist, or is not a checkpoint directory, manifest or archive."""

    def __init__(self, message: str, *, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file

    def __str__(self) -> str:
        return str(self.args[0])


class UnsupportedVersionError(ManifestError):
    """The manifest's format major version is not one this release can read."""


class IntegrityError(ManifestCkptError, OSError):
    """A weights file is missing, truncated, or its bytes do not match their digest."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.file = file
        self.key = key

    def __str__(self) -> str:
        # OSError formats multi-argument instances as "[Errno ...]"; keep the plain message.
        return str(self.args[0])


class ModelMismatchError(ManifestCkptError, ValueError):
    """The live module and the checkpoint disagree; ``.report`` lists every difference."""

    def __init__(self, report: Report, *, path: str | None = None) -> None:
        where = f" ({path})" if path else ""
        super().__init__(f"checkpoint does not match the module{where}:\n{report}")
        self.report = report
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild from the report: the default (type, args) would wrap the message twice when
        # the error crosses a process boundary (torch.distributed.checkpoint pickles errors
        # between ranks, multiprocessing between workers).
        return (_rebuild_model_mismatch, (type(self), self.report, self.path))


def _rebuild_model_mismatch(cls: type[ModelMismatchError], report: Report, path: str | None) -> ModelMismatchError:
    return cls(report, path=path)


class StateMismatchError(ModelMismatchError):
    """A training state and the live application state disagree; ``.report`` lists every difference.

    A subclass of :class:`ModelMismatchError`, so ``except ModelMismatchError`` catches both.
    """

    def __init__(self, report: Report, *, path: str | None = None) -> None:
        where = f" ({path})" if path else ""
        ManifestCkptError.__init__(self, f"checkpoint does not match the application state{where}:\n{report}")
        self.report = report
        self.path = path


class UnsupportedValueError(ManifestCkptError, TypeError):
    """A value cannot be stored without pickle; nothing was written.

    Attributes:
        keys: the dotted keys of every refused value.
    """

    def __init__(self, message: str, *, keys: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.keys = keys


class RemapError(ManifestCkptError, ValueError):
    """A remap rule is invalid, matches no key, or makes two keys collide."""


class TransformError(ManifestCkptError, ValueError):
    """A key transform is malformed, matches no key, or does not fit the keys it matches.

    Attributes:
        rule: the rule, as written (``Stack(source=..., ...)``), when one is at fault.
        key: the key it could not build or would have built twice, when known.
        unmatched: the rule matched no key at all (rather than keys it cannot fit).
    """

    def __init__(
        self, message: str, *, rule: str | None = None, key: str | None = None, unmatched: bool = False
    ) -> None:
        super().__init__(message)
        self.rule = rule
        self.key = key
        self.unmatched = unmatched


class UnsupportedTensorError(ManifestCkptError, TypeError):
    """A tensor cannot be stored faithfully (complex, sparse, quantized, unknown dtype...)."""


class LoadAbortedError(ManifestCkptError, RuntimeError):
    """A copy failed during ``load``; every tensor already overwritten was restored.

    Attributes:
        key: the module key whose copy failed.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class CheckpointExistsError(ManifestCkptError, FileExistsError):
    """The destination exists and ``overwrite`` was not given."""


class ConcurrentWriteError(CheckpointExistsError):
    """Another writer committed a checkpoint at the URL after this save checked it; this one did not commit.

    Attributes:
        url: the checkpoint URL.
    """

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class UnsafeCheckpointError(ManifestCkptError, ValueError):
    """A pickled source references a global outside the allowlist; nothing of it ran.

    Attributes:
        global_name: the offending ``module.qualname``, when one is known.
    """

    def __init__(self, message: str, *, global_name: str | None = None, file: str | None = None) -> None:
        super().__init__(message)
        self.global_name = global_name
        self.file = file


class ConversionError(ManifestCkptError, ValueError):
    """A source file could not be read as any supported checkpoint format."""

    def __init__(self, message: str, *, file: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.file = file
        self.extra = extra


class ExportError(ManifestCkptError, ValueError):
    """A checkpoint cannot be written in a foreign layout (bad option, occupied or unusable destination)."""

    def __init__(self, message: str, *, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


class ArchiveError(ManifestCkptError, ValueError):
    """An archive is malformed or hostile (escaping paths, links, duplicate names)."""

    def __init__(self, message: str, *, file: str | None = None, member: str | None = None) -> None:
        super().__init__(message)
        self.file = file
        self.member = member


class StorageError(ManifestCkptError, OSError):
    """A storage back end (object store, fsspec file system) refused or failed a request.

    Attributes:
        url: the checkpoint URL the request was for.
    """

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class UnsupportedOptionError(ManifestCkptError, ValueError):
    """An option of a torch API this library stands in for is not supported; nothing was written.

    Raised rather than ignoring the option, so a setting never silently has no effect.
    """


class PatternError(ManifestCkptError, ValueError):
    """A pattern argument (``allow_missing``, ``allow_unexpected``...) is not a valid regular expression.

    Attributes:
        argument: the argument that held it, such as ``allow_missing``.
        pattern: the offending pattern.
    """

    def __init__(self, message: str, *, argument: str, pattern: str) -> None:
        super().__init__(message)
        self.argument = argument
        self.pattern = pattern


class DeviceUnavailableError(ManifestCkptError, ValueError):
    """A ``device=`` argument names a device this machine does not have (or not a device at all)."""


class DestinationError(ManifestCkptError, FileNotFoundError):
    """An output path cannot be written: its parent directory is missing or is not a directory.

    Attributes:
        file: the output path.
    """

    def __init__(self, message: str, *, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file

    def __str__(self) -> str:
        return str(self.args[0])


class InvalidKeyError(ManifestCkptError, ValueError):
    """A state-dict key cannot be stored: empty, reserved (``__metadata__``), too long, or not text.

    Attributes:
        key: the first offending key.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class RankFailedError(ManifestCkptError, RuntimeError):
    """A distributed save or load failed on some rank for a reason outside this library (a full
    disk, a lost connection, a bug in user code), raised on every rank in place of DCP's
    ``CheckpointException`` (kept as ``__cause__``), which is no ``Exception``.

    Attributes:
        failures: rank -> the exception that rank raised.
    """

    def __init__(self, message: str, *, failures: dict[int, BaseException] | None = None) -> None:
        super().__init__(message)
        self.failures = dict(failures or {})


class SaveInProgressError(ManifestCkptError, RuntimeError):
    """``async_save`` was asked to save to a path whose previous async save has not finished."""
