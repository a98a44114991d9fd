"""The one error type the command line prints as a single line (no traceback) before exiting 2."""


class UserError(Exception):
    """Bad input from a user: a file, key, shard or URL. The message names it in one line."""
