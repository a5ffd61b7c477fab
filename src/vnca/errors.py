"""User-facing errors.

Anything a user can cause (a wrong path, a bad config value, a corrupt file) is raised as a
`UserError`; the CLI prints its message as one line on stderr and exits with status 2. Every
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by the user's input; its message is one self-contained line."""


class ConfigError(UserError):
    """A config file or `--set` override is invalid."""


class DataError(UserError):
    """An input data file or artifact is missing, truncated, corrupt or of the wrong format."""
