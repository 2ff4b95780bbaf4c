"""gateway.spares: finished spool files are kept empty and reused as new ones (no inode churn),
without ever handing out old content, truncating a file that has another name, or replacing an
existing file."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from gateway import spares as spares_mod
from gateway.durable import Syncer
from gateway.spares import SpareFiles, rename_noreplace
from gateway.spool import Spool
from tests.unit.test_spool import committed


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def test_create_without_spares_makes_a_new_0600_file_and_never_replaces(tmp_path: Path) -> None:
    spares = SpareFiles(tmp_path / "spare")
    fd = spares.create(tmp_path / "a")
    os.write(fd, b"abc")
    os.close(fd)
    st = os.stat(tmp_path / "a")
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 3
    with pytest.raises(FileExistsError):
        spares.create(tmp_path / "a")
    assert (tmp_path / "a").read_bytes() == b"abc"


def test_discard_keeps_the_inode_empty_and_create_reuses_it(tmp_path: Path) -> None:
    spares = SpareFiles(tmp_path / "spare")
    write(tmp_path / "old", b"secret message body\r\n" * 100)
    ino = os.stat(tmp_path / "old").st_ino
    spares.discard(tmp_path / "old")
    assert not (tmp_path / "old").exists()
    [spare] = list((tmp_path / "spare").iterdir())
    assert spare.stat().st_size == 0 and spare.stat().st_ino == ino  # content gone at once
    fd = spares.create(tmp_path / "new")
    os.write(fd, b"short")
    os.close(fd)
    assert os.stat(tmp_path / "new").st_ino == ino
    assert (tmp_path / "new").read_bytes() == b"short"
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o600
    assert len(spares) == 0 and not list((tmp_path / "spare").iterdir())


def test_a_file_with_another_name_is_unlinked_not_truncated(tmp_path: Path) -> None:
    spares = SpareFiles(tmp_path / "spare")
    write(tmp_path / "incoming", b"queued bytes")
    os.link(tmp_path / "incoming", tmp_path / "data")
    spares.discard(tmp_path / "incoming")
    assert not (tmp_path / "incoming").exists()
    assert (tmp_path / "data").read_bytes() == b"queued bytes"
    assert len(spares) == 0 and not list((tmp_path / "spare").iterdir())


def test_a_spare_with_content_left_by_a_crash_is_truncated_before_use(tmp_path: Path) -> None:
    (tmp_path / "spare").mkdir()
    write(tmp_path / "spare" / "Q1", b"old message, renamed but not yet truncated")
    spares = SpareFiles(tmp_path / "spare")  # a restart finds it
    assert len(spares) == 1
    fd = spares.create(tmp_path / "new")
    os.write(fd, b"new")
    os.close(fd)
    assert (tmp_path / "new").read_bytes() == b"new"


def test_the_limit_bounds_the_spares_and_the_rest_are_unlinked(tmp_path: Path) -> None:
    spares = SpareFiles(tmp_path / "spare", limit=2)
    for name in "abc":
        write(tmp_path / name, b"x")
        spares.discard(tmp_path / name)
    assert len(spares) == 2 and len(list((tmp_path / "spare").iterdir())) == 2
    assert not any((tmp_path / n).exists() for n in "abc")


def test_missing_files(tmp_path: Path) -> None:
    spares = SpareFiles(tmp_path / "spare")
    with pytest.raises(FileNotFoundError):
        spares.discard(tmp_path / "gone")
    spares.discard(tmp_path / "gone", missing_ok=True)
    assert len(spares) == 0


def test_a_spare_taken_by_another_process_is_skipped(tmp_path: Path) -> None:
    spares = SpareFiles(tmp_path / "spare")
    for name in ("a", "b"):
        write(tmp_path / name, b"x")
        spares.discard(tmp_path / name)
    other = SpareFiles(tmp_path / "spare")  # a second worker sees both
    fd = other.create(tmp_path / "theirs")
    os.close(fd)
    fds = [spares.create(tmp_path / "mine1"), spares.create(tmp_path / "mine2")]
    for fd in fds:
        os.close(fd)
    # one came from the spare the other worker left, the other is a new file; no error, no loss
    assert {p.name for p in tmp_path.iterdir()} == {"spare", "theirs", "mine1", "mine2"}
    assert not list((tmp_path / "spare").iterdir())


def test_creating_over_an_existing_file_keeps_the_spare(tmp_path: Path) -> None:
    spares = SpareFiles(tmp_path / "spare")
    write(tmp_path / "a", b"x")
    spares.discard(tmp_path / "a")
    write(tmp_path / "taken", b"keep me")
    with pytest.raises(FileExistsError):
        spares.create(tmp_path / "taken")
    assert (tmp_path / "taken").read_bytes() == b"keep me"
    assert len(spares) == 1
    os.close(spares.create(tmp_path / "free"))
    assert len(spares) == 0


@pytest.mark.parametrize("kernel_call", [True, False], ids=["renameat2", "fallback"])
def test_rename_noreplace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          kernel_call: bool) -> None:
    if not kernel_call:
        monkeypatch.setattr(spares_mod, "_renameat2", None)
    elif spares_mod._renameat2 is None:
        pytest.skip("no renameat2 in this libc")
    write(tmp_path / "a", b"a")
    write(tmp_path / "b", b"b")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == b"b"
    with pytest.raises(FileNotFoundError):
        rename_noreplace(tmp_path / "missing", tmp_path / "c")
    rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").read_bytes() == b"a" and not (tmp_path / "a").exists()


def test_the_spool_reuses_data_and_metadata_inodes(tmp_path: Path) -> None:
    """A removed message's two files become the next message's metadata (and DATA file, via
    the receiving session); what the next message stores is exactly its own."""
    spool = Spool(tmp_path)
    first = committed(spool, 5000)
    with spool.claim(first.qid):
        spool.remove(first.qid)
    assert len(spool.spares) == 2
    assert all(p.stat().st_size == 0 for p in (tmp_path / "spare").iterdir())
    second = committed(spool, 7)
    assert len(spool.spares) == 1  # its metadata took one
    with spool.claim(second.qid):
        assert spool.load(second.qid)[1] == second
        with spool.open_data(second.qid) as f:
            assert len(f.read()) == 7


def test_a_deferred_discard_renames_at_once_and_empties_when_the_chore_runs(
        tmp_path: Path) -> None:
    """``defer`` (the Syncer's thread): the name is gone at once, the file becomes a spare only
    once emptied, and one another process took meanwhile is left alone."""
    spares = SpareFiles(tmp_path / "spare")
    chores: list[Any] = []
    write(tmp_path / "done", b"delivered body\r\n" * 50)
    spares.discard(tmp_path / "done", defer=chores.append)
    assert not (tmp_path / "done").exists() and len(chores) == 1
    assert len(spares) == 0  # not handed out while it still has content
    [pending] = list((tmp_path / "spare").iterdir())
    assert pending.stat().st_size == 800
    chores.pop()()
    assert pending.stat().st_size == 0 and len(spares) == 1
    write(tmp_path / "other", b"x" * 10)
    spares.discard(tmp_path / "other", defer=chores.append)
    os.rename(tmp_path / "spare" / "other", tmp_path / "taken")  # another worker took it
    chores.pop()()
    assert (tmp_path / "taken").read_bytes() == b"x" * 10 and len(spares) == 1
    spares.discard(tmp_path / "gone", missing_ok=True, defer=chores.append)
    assert chores == []


def test_a_deferred_chore_that_fails_logs_and_drops_the_spare(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    spares = SpareFiles(tmp_path / "spare")
    chores: list[Any] = []
    write(tmp_path / "done", b"body")
    spares.discard(tmp_path / "done", defer=chores.append)

    def broken(path: str, size: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(spares_mod.os, "truncate", broken)
    chores.pop()()  # does not raise: nobody waits for it
    assert "I/O error" in caplog.text and "spare" in caplog.text
    assert len(spares) == 0 and not list((tmp_path / "spare").iterdir())


def test_remove_on_the_loop_empties_both_files_in_the_syncer_thread(tmp_path: Path) -> None:
    """The queue manager's removal: both files are out of the queue when it returns and are
    empty spares once the batch that carried their chores has run."""
    spool = Spool(tmp_path)
    entry = committed(spool, 5000)
    loop_thread = threading.get_ident()
    where: list[int] = []
    real = spool.spares._empty_later

    def traced(spare: str) -> None:
        where.append(threading.get_ident())
        real(spare)

    spool.spares._empty_later = traced  # type: ignore[method-assign]

    async def main() -> None:
        syncer = Syncer()
        with spool.claim(entry.qid):
            await spool.remove_async(entry.qid, syncer)
        await syncer.sync(tmp_path)  # a later batch: the chores ran by then

    asyncio.run(main())
    assert len(where) == 2 and loop_thread not in where
    assert len(spool.spares) == 2
    assert all(p.stat().st_size == 0 for p in (tmp_path / "spare").iterdir())
    assert not (tmp_path / "data" / entry.qid).exists()
    assert not list((tmp_path / "active").iterdir())


def test_recovery_empties_spares_a_stop_left_with_content(tmp_path: Path) -> None:
    """A deferred truncation that never ran (the loop stopped first) leaves content in
    ``spare/``; the next start's recovery empties it, and leaves other files alone."""
    spool = Spool(tmp_path)
    chores: list[Any] = []
    entry = committed(spool, 5000)
    with spool.claim(entry.qid):
        steps = spool._remove_steps(entry.qid, chores.append)
        for _ in steps:  # the area fsync point: skipped here
            pass
    assert len(chores) == 2 and all(p.stat().st_size for p in (tmp_path / "spare").iterdir())
    os.symlink(tmp_path / "data", tmp_path / "spare" / "odd")  # not a regular file: untouched
    write(tmp_path / "spare" / "linked", b"kept")
    os.link(tmp_path / "spare" / "linked", tmp_path / "elsewhere")  # another name: untouched
    report = Spool(tmp_path).recover()
    assert report.spares_emptied == 2
    assert (tmp_path / "elsewhere").read_bytes() == b"kept"
    assert all(p.stat().st_size == 0 for p in (tmp_path / "spare").iterdir()
               if not p.is_symlink() and p.name != "linked")
    assert Spool(tmp_path).recover().spares_emptied == 0
