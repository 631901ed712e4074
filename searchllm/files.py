"""Files that survive a kill or a full disk: atomic replacement, one-line errors for damaged files.

The lowest layer of the run dir (rundir.py) and of everything else that writes artefacts (the level
database, exports): a half-written file never stands under a real name, and a damaged one is named with
what to do about it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Any


class RunFileError(RuntimeError):
    """A run-dir file that cannot be read back or written: the message is the one line a user sees."""


def damaged(path: Path, err: BaseException, advice: str) -> RunFileError:
    what = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
    return RunFileError(f"{path} is damaged ({what}); {advice}")


@contextlib.contextmanager
def writing(path: Path, tmp: Path):
    """Write `tmp`, then rename it to `path`; on any failure (a full disk: ENOSPC) the temp file goes and
    `path` keeps its previous content."""
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            if tmp.is_dir():
                import shutil

                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        full = " (no space left on device: free some, then resume)" if e.errno == errno.ENOSPC else ""
        raise RunFileError(
            f"cannot write {path}: {e.strerror or e}{full}; the previous {path.name}, if any, is intact"
        ) from None


def existing_ancestor(path: Path) -> Path:
    """`path` itself if it exists, else its nearest ancestor that does (where it would be created)."""
    path = path.expanduser()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, key: str) -> None:
    """Stop with one line, before any weights load, when `path` (a directory the run will write, maybe not
    created yet) cannot be written: a probe directory is made and removed in its nearest existing ancestor."""
    import tempfile

    probe = existing_ancestor(path)
    try:
        if not probe.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{probe} is a file")
        os.rmdir(tempfile.mkdtemp(prefix=".searchllm-probe-", dir=probe))
    except OSError as e:
        raise RunFileError(
            f"{key}={str(path)!r} cannot be written ({e.strerror or e}); choose a writable place"
        ) from None


def export_dir(run: Path, configured: str | None) -> Path:
    """A run's export folder: export.dir, else <run>/export (of that run dir, wherever it was copied or moved)."""
    return Path(configured or run / "export")


def atomic_write(path: Path, data: bytes) -> None:
    with writing(path, path.with_name(path.name + ".tmp")) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def read_json(path: Path, advice: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise damaged(path, e, advice) from None


def alive(pid: Any) -> bool:
    """Whether a process of this host with that pid exists."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
