"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a missing file, a wrong recipe key, an incompatible checkpoint."""
