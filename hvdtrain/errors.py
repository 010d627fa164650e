"""Errors a user can fix. The CLI turns them into one line and an exit code, never a traceback."""


class UserError(Exception):
    """An expected failure caused by input: printed as one line, exit code `exit_code`."""

    exit_code = 1

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        # quiet: another rank already printed the cause; this one only exits with the code.
        self.quiet = quiet


class ConfigError(UserError):
    """Bad configuration or input data (exit code 2)."""

    exit_code = 2


class DivergenceError(UserError):
    """Training produced a non-finite loss, gradient norm or weight (exit code 3)."""

    exit_code = 3
