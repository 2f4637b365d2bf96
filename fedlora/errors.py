"""The one exception type for mistakes a user can make."""


class FedLoraError(Exception):
    """A bad config value, unknown name, missing file or malformed payload.

    The message is one line that names the bad value and, where there is a
    list of them, the valid choices. The CLIs print it without a traceback.
    """
