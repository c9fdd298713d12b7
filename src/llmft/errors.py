"""The one exception type users see.

Anything a user can get wrong (a missing file, a bad column, an unknown model name) raises
`LlmftError` with a one-line message naming the file, line or field and what was expected.
The CLI prints it and exits with code 2; it never shows a traceback for these.
"""


class LlmftError(Exception):
    """A user-facing error: bad input, missing files, unreachable resources."""

    exit_code = 2
