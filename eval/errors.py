"""One error type for bad input, so every CLI can print it as one clear line."""


class InputError(Exception):
    """Bad user input (a file, a line, a field). The message names where the problem is."""
