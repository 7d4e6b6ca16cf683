"""The control socket under hostile input: huge, malformed, idle and unknown requests, a socket
left by a dead daemon, and sockets that are not the daemon's. The daemon keeps running."""

from __future__ import annotations

import json
import os
import socket
import stat

import pytest

from gpu_compete.control import MAX_REQUEST

from .helpers import wait_for
from .living_harness import Live, block


@pytest.fixture
def live(tmp_path):
    made = []

    def make(blocks):
        made.append(Live(tmp_path, blocks))
        return made[-1]

    yield make
    for one in made:
        one.cleanup()


def connect(run: Live) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    os.chdir(run.state)  # a short relative address: pytest's directories are deep
    try:
        sock.connect("control.sock")
    finally:
        os.chdir(run.dir)
    return sock


def ask(run: Live, payload: bytes) -> dict:
    sock = connect(run)
    try:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the daemon answered and closed before taking it all: read its answer
            pass
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return json.loads(data.split(b"\n")[0])


def test_the_socket_is_private_and_removed_on_exit(live):
    """control.sock is a 0600 socket while the daemon runs and is gone after it exits."""
    run = live([block("A", "1", "hold")])
    run.start()
    st = os.lstat(run.state / "control.sock")
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    run.release("A")
    assert run.wait()[0] == 0
    assert not (run.state / "control.sock").exists()


def test_malformed_huge_and_unknown_requests_get_clear_answers(live):
    """Non-JSON, non-objects, unknown ops, bad fields and a request over the size limit are
    answered with an error; the daemon serves the next request and its tasks."""
    run = live([block("A", "1", "hold"), block("B")])
    run.start()
    run.wait_started("A")
    assert ask(run, b"hello\n")["message"] == "malformed request: not JSON"
    assert "malformed" in ask(run, b"[1, 2]\n")["message"]
    assert ask(run, b'{"op": "__class__"}\n')["message"].startswith("unknown request")
    assert ask(run, b'{"op": "skip", "uni_id": 5}\n')["code"] == 2
    assert ask(run, b'{"op": "ping"}\n')["ok"] is True
    huge = ask(run, b"x" * (MAX_REQUEST * 16))
    assert huge["ok"] is False and "larger than" in huge["message"]
    assert run.proc.poll() is None
    run.release("A")
    assert run.wait()[0] == 0
    assert run.order() == ["A", "B"]


def test_idle_connections_never_block_the_loop(live):
    """Connections that send nothing neither stop tasks from starting nor keep the socket busy:
    they are closed after the deadline and requests are answered again."""
    run = live([block("A", "1", "hold"), block("B", "1", "hold")])
    run.start()
    run.wait_started("A")
    idle = []
    for _ in range(40):
        try:
            idle.append(connect(run))
        except BlockingIOError:  # the listen backlog is full: the kernel refuses, not the daemon
            pass
    assert len(idle) >= 16
    try:
        run.release("A")
        run.wait_started("B")  # the loop went on scheduling meanwhile
        wait_for(lambda: run.cli("pause", "1").returncode == 0, 20, "a request answered past the idle ones")
        answered = [s.recv(4096) for s in idle[:16]]
        assert all(b"no whole request" in a or b"too many" in a for a in answered)
    finally:
        for s in idle:
            s.close()
    run.release("B")
    assert run.wait()[0] == 0


def test_a_socket_left_by_a_dead_daemon_is_replaced(live):
    """A control.sock nobody listens on (its daemon died) is removed and served anew."""
    run = live([block("A", "1", "hold")])
    run.state.mkdir()
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    os.chdir(run.state)
    old.bind("control.sock")
    old.close()
    os.chdir(run.dir)
    assert run.cli("pause").returncode == 2  # no daemon: refused before connecting
    run.start()
    assert run.cli("pause").returncode == 0
    run.cli("resume")
    run.release("A")
    assert run.wait()[0] == 0


def test_a_file_that_is_not_a_socket_is_left_alone_and_said(live):
    """A regular file named control.sock is not removed; the daemon runs without steering, says
    so in status, and the CLI refuses with exit 2."""
    run = live([block("A", "1", "hold")])
    run.state.mkdir()
    (run.state / "control.sock").write_text("mine")
    run.start()
    wait_for(lambda: (run.status().get("steering") or {}).get("control"), 15, "status to say there's no steering")
    out = run.cli("pause")
    assert out.returncode == 2 and "not a socket" in out.stderr
    run.release("A")
    code, _, err = run.wait()
    assert code == 0, err
    assert (run.state / "control.sock").read_text() == "mine"


def test_a_socket_not_served_by_the_daemon_is_refused(live):
    """If control.sock is replaced by another process's listener, the CLI refuses to talk to it."""
    run = live([block("A", "1", "hold")])
    run.start()
    os.unlink(run.state / "control.sock")
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    os.chdir(run.state)
    impostor.bind("control.sock")
    os.chdir(run.dir)
    impostor.listen(1)
    try:
        out = run.cli("pause", "--json")
        assert out.returncode == 2
        assert "not served by the gpu-compete daemon" in json.loads(out.stdout)["message"]
    finally:
        impostor.close()
    run.release("A")
    assert run.wait()[0] == 0
