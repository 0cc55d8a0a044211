"""One exception type for problems a user can fix; the CLI prints its message without a traceback."""


class ImmunizerError(Exception):
    """A problem with the user's input or environment. The message says what is wrong and how to fix it."""
