"""Errors that no retry can fix. The command line prints them as a single line (no traceback); raised
inside a Ray Train worker they end the run at once (spatialnet_dist.train.failures).
A full disk is one of them (`DiskFull`): every writer names it through `disk_full`."""

import contextlib
import errno
import os
import shutil
import tempfile


class UserError(Exception):
    """Bad input from a user: a file, key, shard or URL. The message names it in one line."""


class ConfigError(UserError):
    """A bad config key or value (spatialnet_dist.config); the message is one line that names it."""


class NonFiniteLoss(FloatingPointError):
    """A NaN or infinite training loss: the same weights and data meet it again after a restart."""


class DiskFull(UserError):
    """No space left on the device a file was being written to (ENOSPC, or a quota: EDQUOT). A full disk does not
    free itself, so a restart meets it again: the run ends at once (a UserError). The message is `disk_full`'s one
    line: the path being written and the free bytes of its filesystem. `path`: that path."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path

    def __reduce__(self):  # Ray pickles a worker's exception: keep the path, and the attributes set on it
        return type(self), (str(self), self.path), self.__dict__


_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is an OSError saying the device (or the user's quota) has no space left."""
    return isinstance(error, DiskFull) or (isinstance(error, OSError) and error.errno in _FULL)


def free_bytes(path: str | os.PathLike) -> tuple[int, int] | None:
    """(free, total) bytes of the filesystem holding `path`, from its nearest existing parent; None when unknown."""
    p = os.path.abspath(os.fspath(path))
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return None
    return usage.free, usage.total


def disk_full(path: str | os.PathLike, what: str = "") -> DiskFull:
    """The one-line error for a write to `path` (what it is: `what`, e.g. "checkpoint") that found no space left."""
    usage = free_bytes(path)
    room = (f"{usage[0]} bytes free of {usage[1]} on its filesystem" if usage else "free space unknown")
    where = f"{what} {os.fspath(path)}" if what else os.fspath(path)
    return DiskFull(f"disk full: no space left writing {where} ({room})", os.fspath(path))


def has_no_room(directory: str | os.PathLike, probe_bytes: int = 2**16) -> bool:
    """Whether writing `probe_bytes` into `directory` fails for want of space: how a writer that hides the errno
    (torch.save raises a RuntimeError) is told apart from one that failed for another reason."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".spatialnet-space-", dir=directory)
    except OSError as e:
        return is_disk_full(e)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * probe_bytes)
            f.flush()
            os.fsync(f.fileno())
        return False
    except OSError as e:
        return is_disk_full(e)
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
