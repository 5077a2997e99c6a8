"""The one exception type `lite` raises for bad input (the CLI prints its message on one line), and the
one way it warns."""

import sys


class LiteError(Exception):
    """Bad input or state a user can fix; the message names the problem and the fix."""


def warn(message: str) -> None:
    """One line on stderr for something the user should know but that does not stop the run."""
    print(f"lite: warning: {message}", file=sys.stderr)
