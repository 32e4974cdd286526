"""The output folder of a run: one owner at a time, no leftovers of a killed run, logs that continue on resume.

* `lock_output_dir(folder)` takes an exclusive `flock` on `folder/.lock` and writes who holds it (pid, host,
  command, start time). A second run on the same folder (a forgotten torchrun worker, a typo in train.output_dir)
  stops with `OutputFolderBusyError` naming that process. The kernel drops the lock when its process dies, even
  by SIGKILL, so a crashed run never leaves the folder locked. A run that ends removes the file (while it still
  holds the lock; a process that opened the old file meanwhile notices the replaced inode and takes a new one).
* `remove_stale_temp_files(folder)` deletes the temporary files that `save_checkpoint` leaves behind when the
  process is killed in the middle of a write (`.checkpoint_*.pth.<8 random characters>.tmp`, each up to a whole
  checkpoint). Only names of that pattern are touched, and only while the lock is held, so no live write is removed.
* `truncate_jsonl(path, iteration)` keeps the records of `log.jsonl` up to the resumed checkpoint's global step:
  the resumed run then appends the iterations it recomputes once, as if it had never stopped (TensorBoard does the
  same with `SummaryWriter(purge_step=...)`, see logging.py).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import socket
import sys
from typing import Optional

from sparse_detr.engine.atomic import write_atomic
from sparse_detr.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the folder is then not protected
    fcntl = None

__all__ = ["OutputFolderBusyError", "OutputDirLock", "lock_output_dir", "remove_stale_temp_files",
           "truncate_jsonl", "LOCK_FILE"]

LOCK_FILE = ".lock"
STALE_TEMP = re.compile(r"\.checkpoint_\w+\.pth\.\w{8}\.tmp")  # tempfile.mkstemp's names in save_checkpoint
# The records that belong to a global step; others ("warning", "error", "resume") are kept as history.
STEP_RECORDS = ("iter", "epoch", "eval", "checkpoint")


class OutputFolderBusyError(UserError, RuntimeError):
    """Another process holds the output folder's lock."""


class OutputDirLock:
    """The held lock; `release()` removes the lock file and frees it (the process ending frees it too)."""

    def __init__(self, file, path: Optional[str] = None) -> None:
        self.file, self.path = file, path

    def release(self) -> None:
        if self.file is not None:
            if self.path is not None:
                try:
                    os.unlink(self.path)  # before the unlock: nobody can lock this inode between the two
                except OSError:
                    pass  # gone already, or a read-only folder: the flock below is what matters
            if fcntl is not None:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def lock_output_dir(folder: str) -> OutputDirLock:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    for _ in range(5):  # the owner may remove the file between our open and our flock: then open the new one
        file = open(path, "a+", encoding="utf-8")
        if fcntl is None:
            return OutputDirLock(file, path)
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            break
        try:
            same = os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return _claim(file, path)
        file.close()
    else:
        raise OutputFolderBusyError(f"{folder}: could not take the lock {path} (it kept being replaced)")
    # The flock failed: another process holds the folder; its file says who.
    file.seek(0)
    try:
        owner = json.loads(file.read() or "{}")
    except ValueError:
        owner = {}
    file.close()
    who = (f"process {owner.get('pid', '?')} on {owner.get('host', '?')} (started {owner.get('started', '?')}: "
           f"{owner.get('command', '?')})")
    raise OutputFolderBusyError(
        f"{folder} is in use by another run: {who}; wait for it to end or stop it, or choose another "
        f"train.output_dir")


def _claim(file, path: str) -> OutputDirLock:
    """Write who holds the lock into its file."""
    file.seek(0)
    file.truncate()
    json.dump({"pid": os.getpid(), "host": socket.gethostname(),
               "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)},
              file)
    file.flush()
    return OutputDirLock(file, path)


def remove_stale_temp_files(folder: str) -> list[str]:
    """Delete `save_checkpoint`'s leftover temporary files in `folder`; returns their paths. Hold the lock."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if STALE_TEMP.fullmatch(name) and os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed


def truncate_jsonl(path: str, iteration: int, drop_eval_at: Optional[int] = None) -> int:
    """Drop the step records of `path` after global step `iteration` (and the "eval" records at `drop_eval_at`,
    an evaluation the checkpoint says did not finish). Rewritten atomically; returns the number dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill in the middle of a write
        step = rec.get("iteration") if isinstance(rec, dict) else None
        if isinstance(step, int) and rec.get("type") in STEP_RECORDS and (
                step > iteration or (rec.get("type") == "eval" and step == drop_eval_at)):
            continue
        kept.append(line)
    if len(kept) == len(lines):
        return 0
    write_atomic(path, lambda f: f.write("".join(line + "\n" for line in kept)))
    return len(lines) - len(kept)
