"""User-facing errors.

Bad input must end in one clear line (exit code 2 on the CLI), never a traceback, so every check
that rejects input raises :class:`InputError` with a message that names the problem and the file.
"""


class InputError(ValueError):
    """The job's input is unusable; the message is shown to the user as a single line."""
