"""The DATA spool file (gateway/smtp/server.py ``_open_spool``): written in buffers; in queue
mode left open, flushed and without its buffer, for the commit to lock and fsync."""

from __future__ import annotations

import io
import os
from pathlib import Path

from gateway.smtp.server import SPOOL_BUFFER_BYTES, _open_spool
from gateway.spares import SpareFiles


def _spool_path(tmp_path: Path) -> Path:
    path = tmp_path / "incoming" / "Q.tmp"
    path.parent.mkdir()
    return path


def _write(tmp_path: Path, keep_open: bool) -> tuple[_open_spool, Path, bytes]:
    path = _spool_path(tmp_path)
    data = b"Subject: x\r\n\r\n" + b"y" * (SPOOL_BUFFER_BYTES // 2)  # fits the buffer
    with _open_spool(path, SpareFiles(tmp_path / "spare"), keep_open=keep_open) as f:
        f.write(data)
    return f, path, data


def test_kept_open_it_is_flushed_unbuffered_and_still_open(tmp_path: Path) -> None:
    f, path, data = _write(tmp_path, keep_open=True)
    try:
        assert path.read_bytes() == data  # on the file, not in a buffer
        assert f.fd is not None and os.fstat(f.fd).st_size == len(data)
        assert not isinstance(f.f, io.BufferedWriter)  # its buffer is freed
        assert f.error is None and f.capture.take().startswith(b"Subject: x\r\n")
    finally:
        f.close()
    assert f.fd is None


def test_otherwise_it_is_closed_at_the_end_of_data(tmp_path: Path) -> None:
    f, path, data = _write(tmp_path, keep_open=False)
    assert f.fd is None and path.read_bytes() == data


def test_the_buffer_is_made_at_the_first_write_not_at_open(tmp_path: Path) -> None:
    path = _spool_path(tmp_path)
    with _open_spool(path, SpareFiles(tmp_path / "spare"), keep_open=True) as f:
        # a session between its 354 and its client's data holds no buffer
        assert not isinstance(f.f, io.BufferedWriter) and path.exists()
        f.write(b"Subject: x\r\n\r\n")
        assert isinstance(f.f, io.BufferedWriter)
        f.write(b"body\r\n")
        assert path.read_bytes() == b""  # both in the one buffer, not yet written
    try:
        assert path.read_bytes() == b"Subject: x\r\n\r\nbody\r\n"
    finally:
        f.close()


def test_a_message_with_no_data_leaves_an_empty_file(tmp_path: Path) -> None:
    path = _spool_path(tmp_path)
    with _open_spool(path, SpareFiles(tmp_path / "spare"), keep_open=True) as f:
        pass
    try:
        assert f.fd is not None and path.read_bytes() == b"" and f.error is None
    finally:
        f.close()
    assert f.fd is None
