"""The work dir: artifacts between stages, the manifest that says how each was made, and the lock.

`lite_manifest.json` = `{"model": identity, "artifacts": {name: record}}`. A record holds every
setting the artifact depends on (calibration data by content hash, not by path) and the sha256 of
each of its files. An artifact is reused only when its record matches the settings asked for *and*
its files still have the recorded hashes; a file without a record (copied in, or left by a run that
died between renaming the file and writing the manifest) is never trusted: it is made again, and
the user is told so in one line.

Writes: each file goes to a temporary name, all are renamed, then the manifest is replaced. A crash
at any point leaves either the old consistent state or files whose hashes no record vouches for
(which are then made again).
"""

import fcntl
import json
import os
from contextlib import contextmanager

import torch

from lite import __version__
from lite.errors import LiteError
from lite.folders import check_writable, completed, file_sha256, remove_debris, temporary_name

MANIFEST = "lite_manifest.json"
LOCK = ".lite.lock"


@contextmanager
def locked_work_dir(path: str | None):
    """Create (if needed) and lock the work dir for this run, after checking it can be written; removes
    what dead runs left in it. A second run on the same work dir fails at once naming the first's pid.
    A work dir this run created and left empty is removed again."""
    if path is None:
        raise LiteError("--work-dir is required: the folder where statistics, scales and the checkpoint go")
    path = os.path.abspath(str(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise LiteError(f"work dir {path} is a file, not a folder; pass a folder for --work-dir")
    check_writable(path, "work dir")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, MANIFEST)) and any(
            name == "config.json" or name.endswith(".safetensors") for name in os.listdir(path)):
        raise LiteError(f"work dir {path} holds a model checkpoint not written by lite; "
                        "pass an empty or new --work-dir so that nothing there is overwritten")
    created = not os.path.exists(path)
    os.makedirs(path, exist_ok=True)
    lock = os.path.join(path, LOCK)
    lock_created = not os.path.exists(lock)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise LiteError(f"work dir {path} is in use by pid {holder}; wait for that run to end or pass another "
                            "--work-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        remove_debris(path)
        yield path
    finally:
        # A run that wrote nothing leaves the folder as it found it.
        if lock_created and not os.path.isfile(os.path.join(path, MANIFEST)):
            os.remove(lock)
            if created and not os.listdir(path):
                os.rmdir(path)
        else:
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock


class WorkDir:
    """The work dir's manifest, bound to one model (`identity`: source, config_hash, weights_hash)."""

    def __init__(self, path: str, identity: dict):
        self.path = os.path.abspath(str(path))
        self.identity = identity
        manifest = self.file(MANIFEST)
        if os.path.isfile(manifest):
            try:
                with open(manifest) as f:
                    self.manifest = json.load(f)
                assert isinstance(self.manifest.get("artifacts"), dict) and isinstance(self.manifest.get("model"), dict)
            except (ValueError, AssertionError, AttributeError):
                raise LiteError(f"{manifest} is corrupt (not the JSON lite writes); delete it, and lite will make "
                                "the work dir's artifacts again") from None
            theirs = self.manifest["model"]
            if {k: theirs.get(k) for k in ("config_hash", "weights_hash")} != \
                    {k: self.identity[k] for k in ("config_hash", "weights_hash")}:
                raise LiteError(f"work dir {self.path} holds artifacts of another model ({theirs.get('source')}); "
                                "use another --work-dir or empty this one")
        else:
            self.manifest = {"model": self.identity, "artifacts": {}}

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def settings_of(self, artifact: str) -> dict | None:
        return self.manifest["artifacts"].get(artifact)

    def reusable(self, artifact: str, settings: dict, files: tuple[str, ...], redo: str) -> bool:
        """True when `artifact` was recorded with `settings` and its files are the ones recorded.
        Otherwise False, after one line saying why when files are there (`redo` says what happens next)."""
        present = [f for f in files if os.path.isfile(self.file(f))]
        if not present:
            return False
        recorded = self.settings_of(artifact)
        if recorded is None or set(recorded.get("files", {})) != set(files):
            print(f"{self.file(present[0])} has no record in {MANIFEST} (not made by lite, or by a run that was "
                  f"interrupted); {redo}")
            return False
        changed = sorted(k for k, v in settings.items() if recorded.get(k) != v)
        if changed:
            diff = ", ".join(f"{k} {recorded.get(k)!r} -> {settings[k]!r}" for k in changed)
            print(f"{artifact} in {self.path} were made with other settings ({diff}); {redo}")
            return False
        if len(present) < len(files) or any(file_sha256(self.file(f)) != h for f, h in recorded["files"].items()):
            print(f"{artifact} files in {self.path} changed since lite wrote them; {redo}")
            return False
        return True

    def save(self, artifact: str, settings: dict, objects: dict[str, object]) -> None:
        """Write artifact files (`{filename: obj}`, with `torch.save`) and their record, as the module doc says."""
        staged = {}
        try:
            for filename, obj in objects.items():
                staged[filename] = temporary_name(self.file(filename))
                torch.save(obj, staged[filename])
            hashes = {filename: file_sha256(tmp) for filename, tmp in staged.items()}
            for filename, tmp in staged.items():
                os.replace(tmp, self.file(filename))
        finally:
            for tmp in staged.values():
                if os.path.exists(tmp):
                    os.remove(tmp)
        completed.extend(self.file(f) for f in objects)
        self.record(artifact, {**settings, "files": hashes})

    def record(self, artifact: str, settings: dict) -> None:
        self.manifest["artifacts"][artifact] = {**settings, "lite_version": __version__}
        tmp = temporary_name(self.file(MANIFEST))
        try:
            with open(tmp, "w") as f:
                json.dump(self.manifest, f, indent=2, sort_keys=True)
            os.replace(tmp, self.file(MANIFEST))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load(self, filename: str) -> dict:
        path = self.file(filename)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a corrupt file; report which file it was
            raise LiteError(f"could not read {path} ({type(e).__name__}: {e}); delete it and re-run") from e
