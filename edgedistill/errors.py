"""The one exception type for mistakes a user can make and fix.

The CLI prints an ``EdgeDistillError`` as a single line (what, where, how to fix) and exits
non-zero; any other exception is a bug and shows its traceback only with ``--debug``.
"""


class EdgeDistillError(Exception):
    """A problem with the user's input or environment, worded so they can fix it."""
