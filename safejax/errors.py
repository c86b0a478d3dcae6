"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class UserError(ValueError):
    """A problem the user can fix (bad config, bad input file, wrong mesh); never a bug."""


class Terminated(BaseException):
    """SIGTERM before a command's own handler took over (the CLI's default: start-up): the
    command stops where it is, keeping what it finished, with one line instead of a bare 143."""
