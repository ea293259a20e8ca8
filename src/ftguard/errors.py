"""User-facing errors: one line that says what is wrong and what to do."""


class FtguardError(Exception):
    """An error caused by the user's input or environment (not a bug).

    The CLI prints only the message (no traceback), so the message must name the offending key, file
    or value and say how to fix it.
    """


class DataNotFound(FtguardError):
    """A data root or file the config names is not on this machine (a dry run can still cost the run)."""
