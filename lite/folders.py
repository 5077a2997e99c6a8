"""Files and folders lite writes: staged under temporary names, renamed into place when complete,
marked as lite's, and cleaned up after runs that died.

Promises (README, "Safety"):
- An output folder appears only when complete: it is written as `OUT.tmp-<pid>` and renamed.
- lite replaces a folder only when it is empty or holds lite's marker (`lite_output.json`) naming
  the same work dir; anything else is refused before any work starts.
- Temporary names carry the writer's pid (`OUT.tmp-<pid>`, `.name.tmp-<pid>`, `OUT.old-<pid>`);
  a later run removes those whose process is gone (restoring `OUT.old-<pid>` when its rename back
  never happened).
"""

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager

from lite import __version__
from lite.errors import LiteError

MARKER = "lite_output.json"
_TEMPORARY = re.compile(r"^(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")

# Paths this process completed (renamed into place), for the message printed on an interrupt.
completed: list[str] = []


def temporary_name(path: str) -> str:
    """A pid-tagged temporary sibling of `path` (hidden for a file, beside it for a folder)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f"{name}.tmp-{os.getpid()}")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_debris(folder: str, name: str | None = None) -> list[str]:
    """Remove temporary files and folders in `folder` left by lite processes that are gone; returns them.
    With `name`, only the temporaries of that entry (in a folder lite does not own, such as --out-dir's parent).

    `X.old-<pid>` is the previous `X` moved aside while a new one was renamed in: when `X` is
    missing, the rename of the new one never happened, so the old one is moved back.
    """
    removed = []
    if not os.path.isdir(folder):
        return removed
    for entry in sorted(os.listdir(folder)):
        match = _TEMPORARY.match(entry)
        if match is None or (name is not None and match["name"] != name) or _alive(int(match["pid"])):
            continue
        path = os.path.join(folder, entry)
        original = os.path.join(folder, match["name"])
        if match["kind"] == "old" and not os.path.exists(original):
            os.replace(path, original)
            continue
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        removed.append(path)
    if removed:
        print(f"removed {len(removed)} leftover(s) of interrupted lite runs in {folder}")
    return removed


def read_marker(folder: str) -> dict | None:
    """The marker of a folder lite wrote, or None (no marker, or not readable as one)."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _within(path: str, folder: str) -> bool:
    """`path` is `folder` or lies inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_out_dir(out_dir: str, work_dir: str, model_folder: str | None) -> str:
    """The absolute output folder, after refusing any that lite may not replace (see the module doc)."""
    out = os.path.realpath(out_dir)
    work = os.path.realpath(work_dir)
    for other, what in ((work, "the work dir"), (os.path.realpath(model_folder) if model_folder else None,
                                                 "the model folder")):
        if other is not None and _within(other, out):
            raise LiteError(f"--out-dir {out_dir} is {what} or contains it ({other}); writing there would replace "
                            "it: pass a new folder, e.g. --out-dir WORK_DIR/quantized")
    if os.path.lexists(out):
        if not os.path.isdir(out) or os.path.islink(out):
            raise LiteError(f"--out-dir {out} exists and is not a folder; pass another --out-dir")
        if os.listdir(out):
            marker = read_marker(out)
            if marker is None or marker.get("work_dir") != work:
                owner = "" if marker is None else f" (it was written for work dir {marker.get('work_dir')})"
                raise LiteError(f"output folder {out} exists and was not written by lite for work dir {work}{owner}; "
                                "lite replaces only its own output: pass another --out-dir or remove it yourself")
    parent = os.path.dirname(out)
    check_writable(parent, "--out-dir's parent folder")
    return out


def check_writable(folder: str, what: str) -> None:
    """Refuse a folder that lite could not create files in (checked before any work)."""
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise LiteError(f"{what} {folder} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LiteError(f"{what} {folder} is not writable ({existing} is read-only); pass a folder you can write to")


def write_marker(folder: str, work_dir: str, settings: dict) -> None:
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump({"work_dir": os.path.realpath(work_dir), "lite_version": __version__, "export": settings}, f,
                  indent=2, sort_keys=True)


@contextmanager
def staged_folder(out_dir: str):
    """A temporary sibling of `out_dir` to write into, moved into place when the `with` body completes
    and removed when it raises (an interrupt included)."""
    out_dir = os.path.abspath(out_dir)
    tmp = temporary_name(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(new: str, target: str) -> None:
    """Move a finished folder to `target`, replacing an earlier one only after the new one is complete."""
    old = f"{target}.old-{os.getpid()}"
    if os.path.exists(target):
        os.replace(target, old)
    os.replace(new, target)
    completed.append(target)
    shutil.rmtree(old, ignore_errors=True)
