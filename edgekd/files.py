"""Ground floor: atomic writes, JSON, hashes, and the one naming scheme for temporary files.

Every temporary file or folder edgekd makes is named ``.edgekd-tmp-<name>-<random>`` beside its
destination. A write that fails (full disk, Ctrl-C) removes its own temporary; one orphaned by a
killed process is removed by ``clean_stale_temps`` the next time edgekd writes into that folder.
Nothing else is ever removed, so a user's own files are never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

TEMP_PREFIX = ".edgekd-tmp-"


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp makes 0600 files, finished files get the user's usual mode


def temp_name(dest: Path) -> str:
    """The prefix of a temporary for ``dest``: it names the writing process, so a cleanup can tell an
    orphan of a dead process from the work of a live one (``mkstemp``/``mkdtemp`` add a random tail)."""
    return f"{TEMP_PREFIX}{Path(dest).name}-pid{os.getpid()}-"


def _owner_alive(name: str) -> bool:
    pid = name.rsplit("-pid", 1)[-1].split("-", 1)[0] if "-pid" in name else ""
    if not pid.isdigit():
        return False  # no owner recorded: an orphan
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temps(folder: Path) -> list[Path]:
    """Remove temporaries that killed edgekd processes left in ``folder``; returns what was removed.

    Only names with edgekd's prefix whose writing process is gone are touched: another edgekd
    command writing into the same folder at the same time keeps its work.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX) and not _owner_alive(p.name)]
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def atomic_write_bytes(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; the temporary is removed on any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_name(path), dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None or str(exc.filename) == tmp:  # name the file the user knows, not our temporary
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_copy(src: Path, dest: Path) -> None:
    atomic_write_bytes(Path(dest), lambda tmp: shutil.copyfile(src, tmp))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def temp_dir(dest: Path) -> Iterator[Path]:
    """A temporary folder beside ``dest`` (same file system, so it can be renamed into place),
    removed on exit unless it was renamed away."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_name(dest), dir=dest.parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path) -> dict:
    """A JSON file's object, or {} when it is missing or unreadable (sidecars, result files)."""
    try:
        return json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    except (OSError, ValueError):
        return {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Journal:
    """Files put into place by one command, so that a failure later in it can undo them all.

    A file that existed is kept as a hard link (no extra space) until the command succeeds;
    ``undo`` removes the new files and puts the old ones back.
    """

    def __init__(self, backup_dir: Path) -> None:
        self.backup_dir = backup_dir
        self.placed: list[tuple[Path, Path | None]] = []  # (destination, the file it replaced)

    def put(self, dest: Path, write: Callable[[Path], object]) -> None:
        """``write(tmp)`` then rename onto ``dest`` (``files.atomic_write_bytes``), remembering what was there."""
        saved = None
        if dest.is_file():
            self.backup_dir.mkdir(parents=True, exist_ok=True)
            saved = self.backup_dir / f"{len(self.placed)}-{dest.name}"
            _link_or_copy(dest, saved)
        self.placed.append((dest, saved))
        atomic_write_bytes(dest, write)

    def remove(self, dest: Path) -> None:
        """Take ``dest`` away (an output of an earlier run that this one does not make), restorable by ``undo``."""
        if not dest.is_file():
            return
        self.backup_dir.mkdir(parents=True, exist_ok=True)
        saved = self.backup_dir / f"{len(self.placed)}-{dest.name}"
        _link_or_copy(dest, saved)
        self.placed.append((dest, saved))
        dest.unlink()

    def undo(self) -> None:
        for dest, saved in reversed(self.placed):
            if saved is not None:
                os.replace(saved, dest)
            else:
                dest.unlink(missing_ok=True)
        self.placed.clear()


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # file systems without hard links
        shutil.copy2(src, dest)


@contextlib.contextmanager
def staged_output(out: Path, name: str):
    """``out`` made if needed, a temporary work folder inside it and a ``Journal``.

    When the block fails, every file the journal put is undone, the work folder removed, and
    ``out`` itself removed again when this call made it: the disk holds what it held before.
    """
    made = _missing_folders(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    try:
        with temp_dir(out / name) as tmp:
            journal = Journal(tmp / "replaced")
            try:
                yield tmp, journal
            except BaseException:
                journal.undo()
                raise
    except BaseException:
        for folder in made:  # innermost first; only if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, innermost first."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing
