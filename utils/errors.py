"""The one error type of the stages' shell: bad input from the user, said in one sentence."""


class UserError(Exception):
    """Bad input from the user (a file, a setting, an entry): the message says which and what to do."""
