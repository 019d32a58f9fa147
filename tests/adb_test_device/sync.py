"""The ``sync:`` service of the test device: STAT/STA2/LST2, LIST/LIS2, RECV and SEND, as adbd answers them
(including its cleanup of a failed push).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import TYPE_CHECKING

from . import protocol as P
from .sandbox import Sandbox, mode_for_send, strtoul_mode
from .transport import StreamClosed

if TYPE_CHECKING:
    from .transport import _Connection, _Stream

log = logging.getLogger("adb_test_device")


def _sync_service(conn: _Connection, stream: _Stream, destination: str) -> None:
    sandbox = conn.device.sandbox
    out = bytearray()

    def put(data: bytes) -> None:
        out.extend(data)
        if len(out) >= conn.out_maxdata:
            flush()

    def flush() -> None:
        if out:
            data = bytes(out)
            out.clear()
            stream.write(data)

    def fail(reason: str) -> None:
        msg = reason.encode()
        put(P.SYNC_REQUEST.pack(P.ID_FAIL, len(msg)) + msg)
        flush()

    try:
        while True:
            flush()
            request = stream.read(P.SYNC_REQUEST.size)
            if not request:
                break  # host closed the stream
            if len(request) < P.SYNC_REQUEST.size:
                request += stream.read_exact(P.SYNC_REQUEST.size - len(request))
            ident, length = P.SYNC_REQUEST.unpack(request)
            if length > P.SYNC_PATH_MAX:
                fail("path too long")
                break
            path = stream.read_exact(length).decode("utf-8", "surrogateescape") if length else ""
            if ident == P.ID_STAT:
                put(_stat_v1(sandbox.to_host(path)))
            elif ident in (P.ID_STA2, P.ID_LST2):
                put(_stat_v2(ident, sandbox.to_host(path)))
            elif ident in (P.ID_LIST, P.ID_LIS2):
                _list(sandbox.to_host(path), ident == P.ID_LIS2, put)
            elif ident == P.ID_RECV:
                if not _recv(sandbox.to_host(path), put, fail):
                    break
            elif ident == P.ID_SEND:
                if not _send(conn, stream, sandbox, path, put, fail):
                    break
            elif ident == P.ID_QUIT:
                break
            else:
                fail(f"unknown command {ident:08x}")
                break
        flush()
        stream.close()
    except StreamClosed:
        pass


def _stat_v1(host_path: str) -> bytes:
    try:
        st = os.lstat(host_path)
        return P.SYNC_STAT_V1.pack(P.ID_STAT, st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime) & 0xFFFFFFFF)
    except OSError:
        return P.SYNC_STAT_V1.pack(P.ID_STAT, 0, 0, 0)


def _v2_fields(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_mode, st.st_nlink, 2000, 2000, st.st_size,
            int(st.st_atime), int(st.st_mtime), int(st.st_ctime))


def _stat_v2(ident: int, host_path: str) -> bytes:
    try:
        st = os.stat(host_path) if ident == P.ID_STA2 else os.lstat(host_path)
    except OSError as exc:
        return P.SYNC_STAT_V2.pack(ident, exc.errno or errno.EIO, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    return P.SYNC_STAT_V2.pack(ident, 0, *_v2_fields(st))


def _list(host_path: str, v2: bool, put) -> None:
    try:
        names = [".", ".."] + sorted(os.listdir(host_path))
    except OSError:
        names = []
    for name in names:
        encoded = name.encode("utf-8", "surrogateescape")
        try:
            st = os.lstat(os.path.join(host_path, name))
        except OSError as exc:
            if v2:
                put(P.SYNC_DENT_V2.pack(P.ID_DNT2, exc.errno or errno.EIO, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                        len(encoded)) + encoded)
            continue
        if v2:
            put(P.SYNC_DENT_V2.pack(P.ID_DNT2, 0, *_v2_fields(st), len(encoded)) + encoded)
        else:
            put(P.SYNC_DENT_V1.pack(P.ID_DENT, st.st_mode, st.st_size & 0xFFFFFFFF,
                                    int(st.st_mtime) & 0xFFFFFFFF, len(encoded)) + encoded)
    if v2:
        put(P.SYNC_DENT_V2.pack(P.ID_DONE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    else:
        put(P.SYNC_DENT_V1.pack(P.ID_DONE, 0, 0, 0, 0))


def _recv(host_path: str, put, fail) -> bool:
    try:
        fh = open(host_path, "rb")
    except OSError as exc:
        fail(f"open failed: {os.strerror(exc.errno or errno.EIO)}")
        return False
    with fh:
        if stat.S_ISDIR(os.fstat(fh.fileno()).st_mode):
            fail("read failed: Is a directory")
            return False
        while True:
            data = fh.read(P.SYNC_DATA_MAX - P.SYNC_REQUEST.size)
            if not data:
                break
            put(P.SYNC_REQUEST.pack(P.ID_DATA, len(data)) + data)
    put(P.SYNC_REQUEST.pack(P.ID_DONE, 0))
    return True


def _send(conn: _Connection, stream: _Stream, sandbox: Sandbox, spec: str, put, fail) -> bool:
    path, comma, mode_text = spec.rpartition(",")
    if not comma:
        fail("missing , in ID_SEND")
        return False
    try:
        mode = strtoul_mode(mode_text)
    except ValueError:
        fail("bad mode")
        return False
    host_path = sandbox.to_host(path)
    drop_at = conn.device.fault_state.take_push()

    def drain() -> None:  # after a failure, swallow DATA until DONE, as adbd does
        while True:
            ident, size = P.SYNC_REQUEST.unpack(stream.read_exact(P.SYNC_REQUEST.size))
            if ident == P.ID_DONE:
                return
            if ident != P.ID_DATA or size > P.SYNC_DATA_MAX:
                return
            stream.read_exact(size)

    try:
        st = os.lstat(host_path)
        if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
            os.unlink(host_path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        fail(f"couldn't create file: {os.strerror(exc.errno or errno.EIO)}")
        drain()
        return False

    if stat.S_ISLNK(mode):
        ident, size = P.SYNC_REQUEST.unpack(stream.read_exact(P.SYNC_REQUEST.size))
        if ident != P.ID_DATA or size > P.SYNC_DATA_MAX:
            fail("invalid data message: expected ID_DATA")
            return False
        target = stream.read_exact(size).split(b"\0", 1)[0]
        try:
            os.makedirs(os.path.dirname(host_path), exist_ok=True)
            os.symlink(target, host_path)
        except OSError as exc:
            fail(f"symlink failed: {os.strerror(exc.errno or errno.EIO)}")
            return False
        ident, mtime = P.SYNC_REQUEST.unpack(stream.read_exact(P.SYNC_REQUEST.size))
        if ident != P.ID_DONE:
            fail("invalid data message: expected ID_DONE")
            return False
        put(P.SYNC_REQUEST.pack(P.ID_OKAY, 0))
        return True

    perms = mode_for_send(mode)
    try:
        try:
            fd = os.open(host_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, perms)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(host_path), mode=0o775, exist_ok=True)
            fd = os.open(host_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, perms)
    except OSError as exc:
        fail(f"couldn't create file: {os.strerror(exc.errno or errno.EIO)}")
        drain()
        return False
    os.fchmod(fd, perms)  # not subject to the umask, like adbd's fchmod
    received = 0
    ok = False
    try:
        while True:
            ident, size = P.SYNC_REQUEST.unpack(stream.read_exact(P.SYNC_REQUEST.size))
            if ident == P.ID_DONE:
                mtime = size
                break
            if ident != P.ID_DATA:
                fail("invalid data message")
                return False
            if size > P.SYNC_DATA_MAX:
                fail("oversize data message")
                return False
            data = stream.read_exact(size)
            if drop_at is not None and received + len(data) >= drop_at:
                os.write(fd, data[: max(0, drop_at - received)])
                log.info("[%d] fault: dropping the connection after %d bytes of %s", conn.number, drop_at, path)
                os.close(fd)  # clean up first, so the host never sees the partial file after its error
                fd = -1
                os.unlink(host_path)
                conn.close(graceful=False)
                raise StreamClosed("fault: connection dropped mid-push")
            os.write(fd, data)
            received += len(data)
        ok = True
    finally:
        if fd >= 0:
            os.close(fd)
        if not ok:
            try:
                os.unlink(host_path)
            except OSError:
                pass
    os.utime(host_path, (mtime, mtime), follow_symlinks=False)
    put(P.SYNC_REQUEST.pack(P.ID_OKAY, 0))
    return True
