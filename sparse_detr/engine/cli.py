"""Running a command-line tool: a user's mistake is one message, Ctrl-C one line, a bug a full traceback.

Every `tools/*.py` ends with `sys.exit(run_tool(main))`. `run_tool` calls `main(argv)` and

* prints a `UserError` (a misspelled config key, a missing or foreign checkpoint, a busy output folder, bad data,
  a non-finite loss; see sparse_detr/errors.py) or a missing file as `tool: error: message`, without the traceback
  that would bury it, and exits with EXIT_USER_ERROR;
* prints Ctrl-C as one line (for a training: where it stopped and the command that resumes it) and exits with
  EXIT_INTERRUPTED;
* lets anything else (a bug) raise with its traceback (exit 1). argparse's own errors exit 2.

`--debug` anywhere on the command line (it is removed before `main` sees it) or SPARSE_DETR_DEBUG=1 shows the
traceback of every error. This module imports nothing heavy: a tool's `--help` stays instant.
"""
from __future__ import annotations

import errno
import os
import re
import shlex
import sys
from typing import Callable, Optional, Sequence

from sparse_detr.errors import UserError

__all__ = ["EXIT_USER_ERROR", "EXIT_INTERRUPTED", "DEBUG_ENV", "run_tool", "is_user_error", "resume_command"]

EXIT_USER_ERROR = 3
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT
DEBUG_ENV = "SPARSE_DETR_DEBUG"
# A DataLoader worker's exception comes back with the worker's traceback inside its message; keep the message.
_WORKER_TRACEBACK = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback "
                               r"\(most recent call last\):\n(?:.*\n)*?(?:[\w.]+\.)?\1: ")


# A full disk or quota, or a read-only file system: the machine's state, which the user fixes, not a bug.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def is_user_error(error: BaseException) -> bool:
    return (isinstance(error, (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError))
            or (isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS))


def resume_command(script: str, argv: Sequence[str]) -> str:
    """The command line that continues this training: the same arguments with `--resume auto`."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            args.append(a)
    launcher = "torchrun [the same options] " if os.environ.get("TORCHELASTIC_RUN_ID") else "python "
    return launcher + shlex.join([script, *args, "--resume", "auto"])


def _message(error: BaseException) -> str:
    return _WORKER_TRACEBACK.sub("", str(error)).strip() or type(error).__name__


def run_tool(main: Callable[[list[str]], object], argv: Optional[Sequence[str]] = None) -> int:
    """Run `main(argv)` (default: sys.argv[1:]) as described in the module docstring; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    script = sys.argv[0] if sys.argv and sys.argv[0] else "tool"
    prog = os.path.basename(script)
    try:
        main(argv)
    except KeyboardInterrupt as e:
        if debug:
            raise
        line = _message(e) if str(e) else "interrupted"
        if getattr(e, "resumable", False):
            line += f"; resume with: {resume_command(script, argv)}"
        print(f"{prog}: {line}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", EXIT_INTERRUPTED)
    except Exception as e:
        if debug or not is_user_error(e):
            raise
        print(f"{prog}: error: {_message(e)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return 0
