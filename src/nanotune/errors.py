"""The one exception type for errors a user can cause."""


class NanotuneError(Exception):
    """Bad config, files, data or requests: the message names the thing and the fix.

    The CLI prints it as one line and exits non-zero; anything else is a bug and
    stays a traceback.
    """
