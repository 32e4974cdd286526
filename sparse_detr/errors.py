"""The one exception base the command-line tools treat as the user's mistake rather than a bug.

A `UserError` carries a message that says what is wrong (the file, key or value) and what to do; the tools
(`sparse_detr/engine/cli.py`) print that message alone, without a traceback, and exit with a distinct code.
Every module may import this file: it imports nothing.
"""

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input (a config value, a file, a checkpoint, an output folder): the message names it and the fix."""
