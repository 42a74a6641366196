"""Atomic file and folder writes: a crash at any moment leaves either the old content or the new, never half."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class NoSpaceError(OSError):
    """The disk (or the quota) filled up while writing a file; the message names it."""

    def __str__(self) -> str:
        return str(self.strerror)


_NO_SPACE_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122", "unexpected pos")


def is_no_space(e: BaseException) -> bool:
    """Whether ``e`` is a full disk: ENOSPC/EDQUOT, or how torch.save ("unexpected pos") and safetensors say it."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(e, Exception) and any(t in str(e) for t in _NO_SPACE_TEXT)


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a full disk met inside the block into :class:`NoSpaceError` "no space left on device while writing
    PATH"; other errors pass unchanged."""
    try:
        yield
    except NoSpaceError:
        raise
    except Exception as e:
        if not is_no_space(e):
            raise
        raise NoSpaceError(errno.ENOSPC, f"no space left on device while writing {path}") from e


def _umask() -> int:
    """The process's umask: from /proc on Linux, else by setting it and putting it back at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_default(path: Path, mode: int) -> None:
    """Give a mkstemp/mkdtemp result (0600/0700) the mode open()/mkdir() would have given it: ``mode`` & ~umask."""
    os.chmod(path, mode & ~_umask())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        _chmod_default(tmp_path, 0o666)
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_dir(path: str | Path, fill: Callable[[Path], None]) -> None:
    """Build a folder aside with ``fill(tmp_dir)``, then swap it in place of ``path``.

    The old folder (if any) is renamed away first and removed only after the new one is in place, so a
    crash leaves at least one complete copy (the old one under ``.<name>.old`` at worst).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _chmod_default(tmp, 0o777)
        fill(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
        old = path.parent / f".{path.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
