"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class UserError(ValueError):
    """A problem the user can fix (bad config, bad input file, wrong mesh); never a bug."""
