"""The project's exception classes: what the user can fix, told in one line, versus bugs.

`UserError` is every error whose cause lies outside mtkd_jax's code: a setting that cannot work,
a missing or malformed input file, a workdir that would be overwritten, a diverging run. The
command line (`mtkd_jax.main`) prints such an error as one line that says what was wrong and
what to do. Any other exception escaping a run is an mtkd_jax bug: it keeps its traceback, and
the command line asks for a report.

`InputError` also derives from `ValueError`, so code that caught the `ValueError`s the
library raised before this class existed keeps working.

This module imports nothing heavy.
"""


class UserError(Exception):
    """An error the user can fix (bad setting, bad input file, workdir in use); one-line message."""


class InputError(UserError, ValueError):
    """A setting, file or folder given to mtkd_jax that cannot be used as it is."""


class BadImageError(InputError):
    """An image file of a dataset that cannot be decoded; the message names the file."""

    def __init__(self, path: str, reason: str, what_to_do: str):
        self.path, self.reason = path, reason
        super().__init__(f"Cannot use the image {path!r}: {reason}. {what_to_do}")
