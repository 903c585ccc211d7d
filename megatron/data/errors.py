"""The one exception type for user-facing data problems (bad input, missing or corrupt files)."""


class DataError(Exception):
    """A data problem the user can fix; the message names the file and what was expected."""
