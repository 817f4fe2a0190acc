"""The one exception type that reaches the user as a one-line message.

Library code raises `DiffcodecError` for anything the user can fix (a missing file, a
non-image, a checkpoint that does not match). The CLI catches it, prints
``diffcodec: error: <message>`` on stderr and exits with status 2. Anything else is a bug.
"""


class DiffcodecError(Exception):
    """A problem with the user's input, stated in one line."""


def one_line(e: BaseException) -> str:
    """One line describing a library exception: its type and the first line of its text."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class DamagedFileError(DiffcodecError):
    """A coded file whose stream fails its integrity checks before any intact stage: nothing
    can be decoded from it. The CLI exits with status 3 (damaged), as for a damaged file whose
    intact stages it could decode, instead of 2."""
