"""User-facing errors.

Bad input must end in one clear line (exit code 2 on the CLI), never a traceback, so every check
that rejects input raises :class:`InputError` with a message that names the problem and the file.
"""


class InputError(ValueError):
    """The job's input is unusable; the message is shown to the user as a single line."""


def first_line(exc: BaseException) -> str:
    """An exception as one line for a one-line error: its message's first line, or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
