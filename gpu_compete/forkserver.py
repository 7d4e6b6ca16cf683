"""A single-threaded process that forks supervisors for a node agent.

An agent lives in a Ray worker, which has threads of its own: forking there could copy a lock
another thread holds, and spawning a new interpreter per task costs 50-200 ms on a busy
machine. So the agent starts this server once; it imports the launcher and forks each
supervisor as the single-machine daemon does (`launcher.start`), in milliseconds.

It also keeps the supervisors apart from the agent's process: Ray ends a worker's children
when the worker exits, and a supervisor must outlive an agent that dies (a new agent adopts
its task). The supervisors are this server's children, reaped by the kernel (SIGCHLD
ignored here); the agent waits on them with pidfds and learns how they ended from the
registry and the log, as for any task it did not start.

Protocol, over a Unix socket pair: a request is 4 bytes of length and a pickled dict of
`launcher.start`'s arguments; the answer is `ok PID` with the read end of the supervisor's
"task gone" pipe passed along (SCM_RIGHTS), or `error MESSAGE`.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
from typing import Any

from . import launcher


class ForkServer:
    """The agent's side: start the server, ask it for supervisors."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.proc: subprocess.Popen | None = None

    def _ensure(self) -> socket.socket:
        if self.sock is not None and self.proc is not None and self.proc.poll() is None:
            return self.sock
        self.close()
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-m", "gpu_compete.forkserver", str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self.sock = ours
        return ours

    def start(self, **kwargs: Any) -> tuple[int, int]:
        """Fork a supervisor (`launcher.start(**kwargs)`): its pid and its "task gone" fd."""
        sock = self._ensure()
        data = pickle.dumps(kwargs)
        sock.sendall(len(data).to_bytes(4, "big") + data)
        msg, fds, _, _ = socket.recv_fds(sock, 4096, 1)
        text = msg.decode()
        if not text.startswith("ok ") or not fds:
            for fd in fds:
                os.close(fd)
            raise OSError(text.removeprefix("error ") or "the fork server ended")
        return int(text.split()[1]), fds[0]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()  # the server reads EOF and exits
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


def serve(fd: int) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    while True:
        head = _read(sock, 4)
        if head is None:
            return
        body = _read(sock, int.from_bytes(head, "big"))
        if body is None:
            return
        try:
            child = launcher.start(**pickle.loads(body))
        except Exception as exc:  # noqa: BLE001 - said to the agent, which reports it
            sock.sendall(f"error {exc}".encode())
            continue
        try:
            socket.send_fds(sock, [f"ok {child.pid}".encode()], [child.done_fd])
        finally:
            child.close_done()


def _read(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


if __name__ == "__main__":
    serve(int(sys.argv[1]))
