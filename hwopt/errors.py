"""The one exception type the CLI turns into a single error line."""


class HwoptError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The CLI prints its message on one line and exits non-zero; anything else
    that escapes is a bug and keeps its traceback.
    """
