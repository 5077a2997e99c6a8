"""The one exception type `lite` raises for bad input; the CLI prints its message on one line."""


class LiteError(Exception):
    """Bad input or state a user can fix; the message names the problem and the fix."""
