"""The one exception type a user can cause."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """An exception's first line (at most ``limit`` characters) for a one-line message; its type name when empty."""
    return (str(exc).splitlines() or [""])[0][:limit] or type(exc).__name__


class EdgeKDError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do.

    The CLI prints it as one red line and exits non-zero, never with a traceback.
    """
