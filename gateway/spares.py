"""Spare spool files: a finished file's inode is kept, empty, for the next new file.

Every message creates two files in the spool (its DATA and its metadata) and deletes both once it
is delivered; in proxy mode DATA alone. Creating a file allocates an inode, and on ext4 without
a journal the allocator skips every inode freed in the last half minute (``recently_deleted``),
reading its inode table block: at a few hundred messages a second each create walks thousands
of them. perf put 15 % (proxy) to 17 % (queue) of the gateway's CPU there. Instead, ``discard``
truncates a finished file to zero and renames it into ``spare/``, and ``create`` renames a spare
to the new name; the file system then allocates and frees only data blocks, as before.

What stays true:
- a spare is empty: its blocks are freed when it is discarded, as by an unlink, so no message
  content waits in ``spare/``. The queue manager's removals defer the truncation to the next
  fsync batch's worker thread (``discard(defer=)``; on the loop it cost ~10 % of queue mode's
  time): the file is in ``spare/`` with its content for that long, and becomes a spare only
  once empty. A crash (or a stop) between the rename and the truncation can leave one with
  content: ``Spool.recover`` empties those at start (``empty_leftovers``), ``create`` truncates
  one before handing it out, and nothing else ever reads a spare.
- a file with another name (a hard link: the DATA file a queue commit linked into ``data/``)
  is never truncated; discarding one name just unlinks it.
- names and inode numbers mean nothing across uses. ``Spool.claim`` checks that the path still
  names the inode it locked, so a claimer that raced a removal finds the message gone.
- ``create`` never replaces an existing file (``renameat2(RENAME_NOREPLACE)``, or a check first
  where the kernel lacks it), like ``O_CREAT | O_EXCL``.
- at most ``limit`` spares per process (more are unlinked); they cost an inode each and no
  blocks. Worker processes share the directory: one that loses a race for a spare takes the next
  or creates a file.
A reader that opened a file without a claim (``queuecli show``) and is still reading when the
message is removed sees it cut short, where it used to see the unlinked file whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import stat
from pathlib import Path

from gateway.durable import Defer

log = logging.getLogger("mailgate.spool")

SPARE_LIMIT = 512  # spares kept per process
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
_REUSE = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _load_renameat2() -> object | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # libc, already in the process
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def rename_noreplace(src: str | Path, dst: str | Path) -> None:
    """``rename(src, dst)`` that fails with FileExistsError instead of replacing ``dst``."""
    global _renameat2
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),  # type: ignore[operator]
                      _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # not: unsupported here
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
        _renameat2 = None
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


class SpareFiles:
    """The spares of one spool (``<root>/spare``); see the module doc."""

    def __init__(self, directory: Path, limit: int = SPARE_LIMIT) -> None:
        self.directory = directory
        self._prefix = f"{directory}{os.sep}"  # spare names joined as strings: no Path per file
        self.limit = limit
        directory.mkdir(mode=0o700, exist_ok=True)
        # those left by earlier runs or other workers; a name another process takes first is
        # skipped. list.pop/append are atomic, so threads (Spool's blocking calls) may share it.
        self._names = sorted(os.listdir(directory))[:limit]

    def __len__(self) -> int:
        return len(self._names)

    def empty_leftovers(self) -> int:
        """Truncate the files in ``spare/`` that still hold content: a stop or a crash came
        between a discard's rename and its truncation. Recovery calls this at start, so no
        message content waits there past a restart. Safe beside live processes: the truncation
        goes by path, a spare another process takes is renamed away first, and a file with
        another name is left whole. Returns how many were emptied."""
        emptied = 0
        for name in os.listdir(self.directory):
            path = self.directory / name
            try:
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and st.st_size and st.st_nlink == 1:
                    os.truncate(path, 0)
                    emptied += 1
            except FileNotFoundError:  # taken meanwhile
                continue
        return emptied

    def create(self, path: Path | str) -> int:
        """A new empty file at ``path``, mode 0600, open for writing: like ``os.open(path,
        O_WRONLY | O_CREAT | O_EXCL, 0o600)`` (FileExistsError if ``path`` exists), but reusing
        a spare when there is one."""
        while self._names:
            try:
                name = self._names.pop()
            except IndexError:  # another thread took the last one
                break
            try:
                rename_noreplace(self._prefix + name, path)
            except FileNotFoundError:  # taken by another process
                continue
            except BaseException:  # FileExistsError: ``path`` exists; the spare stays one
                self._names.append(name)
                raise
            fd = os.open(path, _REUSE)
            try:
                if os.fstat(fd).st_size:  # a crash came between the rename and the truncation
                    os.ftruncate(fd, 0)
            except BaseException:
                os.close(fd)
                raise
            return fd
        return os.open(path, _CREATE, 0o600)

    def discard(self, path: Path | str, *, missing_ok: bool = False,
                defer: Defer | None = None) -> None:
        """Delete ``path`` (FileNotFoundError if it is missing, unless ``missing_ok``) like an
        unlink, keeping its inode as a spare when it has no other name and there is room.
        ``defer`` (``durable.Syncer.defer``) takes the truncation off the caller's thread: the
        file is renamed into ``spare/`` at once and emptied with the next fsync batch, and
        becomes a spare only then."""
        try:
            st = os.lstat(path)
            if (len(self._names) >= self.limit or st.st_nlink != 1
                    or not stat.S_ISREG(st.st_mode)):
                os.unlink(path)
                return
            spare = self._prefix + os.path.basename(path)
            os.rename(path, spare)
        except FileNotFoundError:
            if missing_ok:
                return
            raise
        if defer is None:
            self._empty(spare)
        else:
            defer(functools.partial(self._empty_later, spare))

    def _empty(self, spare: str) -> None:
        """Truncate a file just renamed into ``spare/`` and make it a spare."""
        try:
            fd = os.open(spare, _REUSE)
            try:
                if os.fstat(fd).st_nlink != 1:  # linked meanwhile: leave that name whole
                    os.unlink(spare)
                    return
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)
        except FileNotFoundError:  # another process took it already
            return
        except OSError:
            os.unlink(spare)
            raise
        self._names.append(os.path.basename(spare))

    def _empty_later(self, spare: str) -> None:
        """The deferred ``_empty``, in the Syncer's thread: one call that releases the GIL (each
        release costs a hand-off while the loop is busy), and nobody to raise to. The link
        count was checked before the rename, and nothing links files in ``spare/``."""
        try:
            os.truncate(spare, 0)
        except FileNotFoundError:  # another process took it already
            return
        except OSError as e:
            log.error("spare file %s: %s", spare, e)
            with contextlib.suppress(OSError):
                os.unlink(spare)
            return
        self._names.append(os.path.basename(spare))
