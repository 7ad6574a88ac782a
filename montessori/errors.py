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
