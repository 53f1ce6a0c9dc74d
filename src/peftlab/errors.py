"""The one exception type a user can cause.

Library code raises :class:`UserError` for anything the user can fix (a missing file, a bad
option, a folder that already holds a run). The CLI prints its message as one line and exits
with code 2; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix. The message says what is wrong and how to fix it, in one line."""

    exit_code = 2
