"""The one exception type a user can cause."""


class EdgeKDError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do.

    The CLI prints it as one red line and exits non-zero, never with a traceback.
    """
