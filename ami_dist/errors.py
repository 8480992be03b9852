"""The one exception type for user mistakes; the CLI turns it into a one-line message and exit code 2."""


class UserError(Exception):
    """A mistake in user input (config, data, arguments, checkpoint) rather than a bug.

    The message must say where (file, line, key) and what was expected, in one line.
    """


class ConfigError(UserError):
    """A run config or DeepSpeed preset that does not validate."""


class DataError(UserError):
    """A data file that cannot be read or parsed."""


class Terminated(BaseException):
    """SIGTERM reached a single-process run (multi-rank runs hand it to their watchdog): like Ctrl-C, not
    caught by ``except Exception``; the run is marked FAILED with the reason and the command exits 143."""


class RunStopped(Exception):
    """A run that stopped itself for a stated reason after it started (not a user mistake, not a bug).

    The CLI prints the one-line message without a traceback and exits with code 1; the MLflow run is FAILED.
    """
