"""The user-mistake exception, in a module without dependencies so that torch-free parts (tasks,
rewards, tokenizer) can raise it."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, bad file, bad config). The CLI prints the message
    and exits with status 2 instead of a traceback."""
