"""The one exception type for errors a user can cause."""


class NanotuneError(Exception):
    """Bad config, files, data or requests: the message names the thing and the fix.

    The CLI prints it as one line and exits non-zero; anything else is a bug and
    stays a traceback.
    """


class OfflineError(NanotuneError):
    """A hub model or dataset is needed and neither the hub nor its cache has it.

    `reason` says what is missing without the fix, so each entry point can add the fix in its
    own syntax (`--model ./folder` on the command line, `model=./folder` for a run).
    """

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(f"{reason}; {fix}")
        self.reason = reason
