"""The one exception type for user mistakes; the CLI turns it into a one-line message and exit code 2."""


class UserError(Exception):
    """A mistake in user input (config, data, arguments, checkpoint) rather than a bug.

    The message must say where (file, line, key) and what was expected, in one line.
    """


class ConfigError(UserError):
    """A run config or DeepSpeed preset that does not validate."""


class DataError(UserError):
    """A data file that cannot be read or parsed."""
