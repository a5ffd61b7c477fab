"""User-facing errors.

Anything a user can cause (a wrong path, a bad config value, a corrupt file) is raised as a
`UserError`; the CLI prints its message as one line on stderr and exits with status 2. Every
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by the user's input; its message is one self-contained line."""


class ConfigError(UserError):
    """A config file or `--set` override is invalid."""


class DataError(UserError):
    """An input data file or artifact is missing, truncated, corrupt or of the wrong format."""


# Faults of the machine rather than of the program: a full disk or quota, a read-only or
# vanished mount, a permission. The CLI reports them in one line like a UserError.
_ENVIRONMENT_ERRNOS = {"ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EIO", "ENOTDIR", "EISDIR",
                       "ENAMETOOLONG", "EMFILE", "ENFILE"}
_ENVIRONMENT_TEXTS = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                      "Permission denied")


def environment_problem(exc: BaseException) -> str | None:
    """One line for an OS fault somewhere in `exc`'s chain (libraries such as orbax and
    tensorstore wrap the OSError or only keep its text), or None if there is none."""
    import errno
    import re

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and errno.errorcode.get(exc.errno) in _ENVIRONMENT_ERRNOS:
            where = f"{exc.filename}: " if exc.filename else ""
            return f"{where}{exc.strerror or exc}"
        text = str(exc)
        for needle in _ENVIRONMENT_TEXTS:
            if needle in text:
                paths = re.findall(r'"(/[^"]+)"', text)
                return f"{paths[-1]}: {needle}" if paths else needle
        exc = exc.__cause__ or exc.__context__
    return None


def quiet_closed_event_loops(hook=None):
    """A `sys.unraisablehook` that drops the "Event loop is closed" RuntimeErrors which
    tensorstore's callbacks raise after orbax gave up on a failed write (one per pending
    write, hundreds on a full disk) and passes everything else to `hook`."""
    import sys

    hook = hook or sys.__unraisablehook__

    def unraisable(u) -> None:
        if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value):
            return
        hook(u)

    return unraisable


class QuietFailedWrites:
    """A `logging` filter for the "asyncio" logger that drops "Task exception was never
    retrieved" records whose exception is a machine fault: orbax's writer tasks of a failed
    save (one per array on a full disk), which `Checkpointer.save` already reports in one
    line. When the tasks are collected is up to the garbage collector, so the filter stays
    for the whole process; every other record passes."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or environment_problem(exc) is None
