"""The control socket `STATE_DIR/control.sock`: how `skip`, `retry`, `kill`, `pause`,
`resume` and `reload` reach a running daemon.

One JSON object a connection, one line each way. The server lives in the daemon's select
loop (the daemon forks, so no thread may sit beside it) and never blocks it: the listening
socket and every connection are non-blocking, a request is at most `MAX_REQUEST` bytes, a
connection that has not sent a whole request within `DEADLINE_S` is closed, and at most
`MAX_CLIENTS` are open at once. The socket is 0600 and a peer of another user is refused (its
credentials are read from the kernel), so only its owner can steer the daemon.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Any, Callable

import structlog

log = structlog.get_logger("gpu_compete")

NAME = "control.sock"
MAX_REQUEST = 64 * 1024
DEADLINE_S = 2.0
MAX_CLIENTS = 16
_SUN_PATH_MAX = 100  # sockaddr_un holds 108 bytes; a long state directory goes through /proc


class ControlError(Exception):
    """The client could not reach a daemon (or the socket is not one); exit status 2."""


def socket_path(state_dir: Path) -> Path:
    return Path(state_dir) / NAME


def _peer(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the other end, from the kernel."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


def _with_address(path: Path, action: Callable[[str], None]) -> None:
    """Run `action` (bind or connect) on `path`, through /proc/self/fd when the path is too
    long for a socket address (deep pytest or scratch directories are)."""
    if len(os.fsencode(str(path))) <= _SUN_PATH_MAX:
        action(str(path))
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        action(f"/proc/self/fd/{fd}/{path.name}")
    finally:
        os.close(fd)


class _Conn:
    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline, self.buffer = sock, deadline, b""


class ControlServer:
    def __init__(self, state_dir: Path, handle: Callable[[dict[str, Any]], dict[str, Any]],
                 clock: Callable[[], float] = time.monotonic):
        self.path = socket_path(state_dir)
        self.handle = handle
        self.clock = clock
        self.sock: socket.socket | None = None
        self.conns: dict[int, _Conn] = {}
        self._loop: Any = None

    # --- open and close ---------------------------------------------------------------------

    def open(self, loop: Any) -> str | None:
        """Listen, registered with the daemon's `WakeLoop`; the reason when it cannot (the
        daemon then runs without steering, and says so)."""
        problem = self._clear_stale()
        if problem:
            return problem
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: no moment where another user could connect
        try:
            _with_address(self.path, sock.bind)
        except OSError as exc:
            sock.close()
            return f"cannot create {self.path}: {exc.strerror or exc}"
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
        self.sock, self._loop = sock, loop
        loop.add_reader(sock.fileno(), self._accept)
        return None

    def _clear_stale(self) -> str | None:
        """Remove a socket a dead daemon left; refuse to touch anything that is not ours."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return None
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
            what = "a socket of another user" if stat.S_ISSOCK(st.st_mode) else "not a socket"
            return f"{self.path} exists and is {what}; remove it to steer this daemon"
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _with_address(self.path, probe.connect)
        except ConnectionRefusedError:
            os.unlink(self.path)  # nobody listens: left by a daemon that died
            log.info("removed a control socket left by a daemon that died", path=str(self.path))
            return None
        except OSError as exc:
            return f"cannot check {self.path}: {exc.strerror or exc}"
        finally:
            probe.close()
        return f"{self.path} is in use by another process; remove it to steer this daemon"

    def close(self) -> None:
        for fd in list(self.conns):
            self._drop(fd)
        if self.sock is not None:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
            try:
                os.unlink(self.path)
            except OSError:
                pass

    # --- serving (called from the select loop) --------------------------------------------

    def _accept(self) -> bool:
        self.expire()
        while self.sock is not None:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # EMFILE and the like: refuse this one, keep serving
                log.warning("control socket cannot accept", error=str(exc))
                break
            conn.setblocking(False)
            if len(self.conns) >= MAX_CLIENTS:
                self._answer(conn, {"ok": False, "code": 1, "message": "too many open requests; try again"})
                conn.close()
                continue
            try:
                _pid, uid, _gid = _peer(conn)
            except OSError:
                uid = -1
            if uid != os.getuid():
                self._answer(conn, {"ok": False, "code": 2, "message": "refused: not the daemon's user"})
                conn.close()
                continue
            self.conns[conn.fileno()] = _Conn(conn, self.clock() + DEADLINE_S)
            self._loop.add_reader(conn.fileno(), lambda fd=conn.fileno(): self._read(fd))
        return False

    def _read(self, fd: int) -> bool:
        conn = self.conns.get(fd)
        if conn is None:
            return False
        try:
            data = conn.sock.recv(MAX_REQUEST + 1 - len(conn.buffer))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self._drop(fd)
            return False
        conn.buffer += data
        line, newline, _ = conn.buffer.partition(b"\n")
        if len(line) > MAX_REQUEST:
            return self._reply(fd, {"ok": False, "code": 2, "message": f"request larger than {MAX_REQUEST} bytes"})
        if not newline and data:
            return False  # more to come (within the deadline)
        if not line.strip():
            self._drop(fd)
            return False
        try:
            request = json.loads(line)
        except ValueError:
            return self._reply(fd, {"ok": False, "code": 2, "message": "malformed request: not JSON"})
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return self._reply(fd, {"ok": False, "code": 2, "message": "malformed request: expected {\"op\": ...}"})
        try:
            answer = self.handle(request)
        except Exception as exc:  # a bug in one request must not take the daemon down
            log.exception("control request failed", op=request.get("op"))
            answer = {"ok": False, "code": 1, "message": f"internal error: {exc}"}
        self._reply(fd, answer)
        return True

    def _reply(self, fd: int, answer: dict[str, Any]) -> bool:
        conn = self.conns.get(fd)
        if conn is not None:
            self._answer(conn.sock, answer)
            self._drop(fd)
        return False

    @staticmethod
    def _answer(sock: socket.socket, answer: dict[str, Any]) -> None:
        try:  # small answers fit the socket's buffer; a peer that won't read loses its answer
            sock.send(json.dumps(answer).encode() + b"\n", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError:
            pass

    def _drop(self, fd: int) -> None:
        conn = self.conns.pop(fd, None)
        if conn is not None:
            self._loop.remove_reader(fd)
            conn.sock.close()

    def expire(self) -> None:
        """Close connections that did not send a whole request in time."""
        now = self.clock()
        for fd, conn in list(self.conns.items()):
            if now >= conn.deadline:
                self._reply(fd, {"ok": False, "code": 2, "message": f"no whole request within {DEADLINE_S:g} s"})


# --- the client ----------------------------------------------------------------------------

def request(state_dir: Path, payload: dict[str, Any], daemon_pid: int | None, timeout: float = 15.0) -> dict[str, Any]:
    """Send one request to the daemon on `state_dir` and return its answer; ControlError when
    no daemon answers there, or the socket is not that daemon's."""
    path = socket_path(state_dir)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ControlError(f"no gpu-compete daemon is running on {state_dir} (no {NAME} there)") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} is not a socket; not a gpu-compete daemon's")
    if st.st_uid != os.getuid():
        raise ControlError(f"{path} belongs to uid {st.st_uid}, not you; refusing to talk to it")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            _with_address(path, sock.connect)
        except ConnectionRefusedError:
            raise ControlError(f"no gpu-compete daemon is running on {state_dir} "
                               f"({NAME} was left by a daemon that died)") from None
        except OSError as exc:
            raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        pid, uid, _ = _peer(sock)
        if uid != os.getuid() or (daemon_pid is not None and pid != daemon_pid):
            raise ControlError(f"{path} is not served by the gpu-compete daemon of {state_dir} "
                               f"(pid {pid}, uid {uid}); refusing to talk to it")
        try:
            try:
                sock.sendall(json.dumps(payload).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # it answered (a refusal) before reading all: read the answer
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            raise ControlError(f"the daemon on {state_dir} did not answer within {timeout:g} s") from None
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                raise ControlError(f"the daemon on {state_dir} closed the connection") from None
            raise ControlError(f"cannot talk to the daemon on {state_dir}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        answer = json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        raise ControlError(f"the daemon on {state_dir} gave no readable answer") from None
    if not isinstance(answer, dict):
        raise ControlError(f"the daemon on {state_dir} gave no readable answer")
    return answer
