"""The one exception type that reaches the user as a one-line message.

Library code raises `DiffcodecError` for anything the user can fix (a missing file, a
non-image, a checkpoint that does not match). The CLI catches it, prints
``diffcodec: error: <message>`` on stderr and exits with status 2. Anything else is a bug.
"""


class DiffcodecError(Exception):
    """A problem with the user's input, stated in one line."""
