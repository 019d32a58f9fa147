"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class AmcError(Exception):
    """A problem the user can fix: bad input, missing file, unreachable device.

    The message is shown as-is on one line, so it should say what is wrong and
    what to do about it.
    """

    exit_code = 2
