"""Errors that carry a message meant for a user (the CLI prints them as one line).

Exit codes of the CLI (docs/reliability.md): 2 for ``GastuneError`` (the input or a setting
was refused, before or instead of the work), 3 for ``TrainingFailed`` (training started and
did not produce a usable result).
"""


class GastuneError(ValueError):
    """A problem with the user's input or environment, explained in its message."""

    exit_code = 2


class TrainingFailed(GastuneError):
    """Training ran but failed (it diverged, or trained on no sample); no final adapter was
    written, and earlier checkpoints are left as they were."""

    exit_code = 3
