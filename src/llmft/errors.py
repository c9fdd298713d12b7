"""The one exception type users see.

Anything a user can get wrong (a missing file, a bad column, an unknown model name) raises
`LlmftError` with a one-line message naming the file, line or field and what was expected.
The CLI prints it and exits with code 2; it never shows a traceback for these.
"""


class LlmftError(Exception):
    """A user-facing error: bad input, missing files, unreachable resources."""

    exit_code = 2


ONE_LINE_MAX = 300  # characters of a library's message quoted inside ours


class Interrupted(LlmftError):
    """The user stopped a command (Ctrl-C, SIGTERM); the message says what was kept and how to go on."""

    exit_code = 130


def one_line(e: BaseException) -> str:
    """An exception's message for the parentheses of an `LlmftError`: on one line (library
    messages often span many, the useful part not always the first), cut to `ONE_LINE_MAX`
    characters; the exception's type when the message is empty."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= ONE_LINE_MAX else text[:ONE_LINE_MAX - 3] + "..."
