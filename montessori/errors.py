"""Errors a user can act on. The CLI maps them to exit codes (2 for InputError, 1 otherwise)."""


class MontessoriError(Exception):
    """A run-time failure the user should read as one line (exit 1)."""


class InputError(MontessoriError):
    """Bad input or config (exit 2). The message names the file, the record or key, and the problem."""

    def __init__(self, message: str, *, file: str | None = None, record: str | int | None = None,
                 field: str | None = None):
        where = []
        if file is not None:
            where.append(str(file))
        if record is not None:
            label = str(record)
            where.append(label if label.split(" ")[0] in ("line", "row", "item") else f"record {label}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(", ".join(where) + (": " if where else "") + message)
        self.message, self.file, self.record, self.field = message, file, record, field

    def at(self, file=None, record=None) -> "InputError":
        """The same problem, located in a file and record (keeps the field)."""
        return InputError(self.message, file=file if file is not None else self.file,
                          record=record if record is not None else self.record, field=self.field)


# Locals that name the file a frame writes: safetensors' save_file(tensors, filename), torch.save(obj, f),
# transformers' save_pretrained(save_directory), `with open(path) as f` (a file object).
_PATH_LOCALS = ("filename", "f", "file", "path", "save_directory")


def environment_error(err: BaseException, where=None) -> OSError | None:
    """The OS failure under `err` (a full, read-only or forbidden disk) as one OSError naming a path and
    the OS's reason, or None when `err` is something else.

    Libraries lose part of what the OS said on the way up: safetensors raises SafetensorError("... No
    space left on device (os error 28)"), torch.save a RuntimeError without the errno ("unexpected pos
    704 vs 598"), a write() to a full disk an OSError without the file's name. The path is then taken
    from the innermost frame that was writing a file, else `where` (e.g. the stage's folder), and a
    missing reason is read from the file system itself (full, read-only)."""
    import errno
    import os
    import re
    code, reason, path = None, None, None
    if isinstance(err, OSError) and err.filename is not None:
        return err
    if isinstance(err, OSError):
        code, reason, path = err.errno, err.strerror or str(err), err.filename
    elif type(err).__name__ == "SafetensorError":
        found = re.search(r"os error (\d+)", str(err))
        if found is None:  # a damaged file, not the disk
            return None
        code = int(found.group(1))
        reason = os.strerror(code)
    elif isinstance(err, RuntimeError) and ("PytorchStreamWriter" in str(err) or "unexpected pos" in str(err)):
        reason = str(err).strip().splitlines()[0]
    else:
        return None
    path = path or _writing_path(err.__traceback__) or where
    if code is None and path is not None:
        code = _file_system_state(path)
        reason = os.strerror(code) if code else reason
    if path is None:
        return OSError(code, reason)
    return OSError(code if code is not None else errno.EIO, reason, str(path))


def _writing_path(tb) -> str | None:
    import os
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for name in _PATH_LOCALS:
            value = frame.f_locals.get(name)
            if hasattr(value, "write") and isinstance(getattr(value, "name", None), str):
                value = value.name  # an open file
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if isinstance(value, str) and os.sep in value:
                return value
    return None


def _file_system_state(path) -> int | None:
    """ENOSPC if the file system holding `path` is full, EROFS if it is read-only, else None."""
    import errno
    import os
    from pathlib import Path
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stat = os.statvfs(folder)
    except OSError:
        return None
    if stat.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if stat.f_bavail == 0:
        return errno.ENOSPC
    return None
