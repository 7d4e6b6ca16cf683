"""The failure classifier against real failures: real processes for SyntaxError, missing
modules, missing commands and scripts, the kernel-style SIGKILL; recorded PyTorch and NCCL
text for what needs a GPU; and the supervisor's time limit on a real process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpu_compete.classify import PERMANENT, RULES, classify, is_permanent, last_exception
from gpu_compete.launcher import SHELL, build_script
from gpu_compete.registry import Registry
from gpu_compete.supervisor import run as supervise

from .helpers import wait_for

PY = sys.executable


def shell(tmp_path: Path, *commands: str) -> tuple[int, str]:
    """Run commands the way a task runs them (one bash script, stop at the first failure)."""
    done = subprocess.run([SHELL, "-c", build_script(list(commands))], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr


def test_real_syntax_error(tmp_path):
    """A script with a syntax error is syntax_error, and permanent."""
    (tmp_path / "bad.py").write_text("def f(:\n    pass\n")
    rc, out = shell(tmp_path, f"{PY} bad.py")
    assert "SyntaxError" in out
    assert classify(rc, out) == "syntax_error" and is_permanent("syntax_error")


def test_real_indentation_error(tmp_path):
    """An IndentationError (a SyntaxError subclass) is syntax_error too."""
    (tmp_path / "bad.py").write_text("if True:\nprint(1)\n")
    rc, out = shell(tmp_path, f"{PY} bad.py")
    assert classify(rc, out) == "syntax_error"


def test_real_module_not_found(tmp_path):
    """`import` of a module that is not installed is import_error, and permanent."""
    rc, out = shell(tmp_path, f"{PY} -c 'import no_such_module_gc_test'")
    assert "ModuleNotFoundError" in out
    assert classify(rc, out) == "import_error" and is_permanent("import_error")


def test_real_import_error(tmp_path):
    """`from os import missing_name` (ImportError) is import_error."""
    rc, out = shell(tmp_path, f"{PY} -c 'from os import no_such_name_gc'")
    assert classify(rc, out) == "import_error"


def test_real_command_not_found(tmp_path):
    """A command that does not exist exits 127 and is not_found."""
    rc, out = shell(tmp_path, "echo start", "no_such_command_gc_test --flag")
    assert rc == 127 and "not found" in out
    assert classify(rc, out) == "not_found" and is_permanent("not_found")


def test_real_not_executable(tmp_path):
    """A script without the execute bit exits 126 and is not_found."""
    (tmp_path / "run.sh").write_text("#!/bin/sh\necho hi\n")
    rc, out = shell(tmp_path, "./run.sh")
    assert rc == 126
    assert classify(rc, out) == "not_found"


def test_real_missing_script(tmp_path):
    """`python missing.py` (python's own "can't open file") is not_found."""
    rc, out = shell(tmp_path, f"{PY} missing_train.py --lr 1")
    assert rc == 2 and "can't open file" in out
    assert classify(rc, out) == "not_found"


def test_real_sigkill_we_did_not_send_is_host_oom(tmp_path):
    """A worker SIGKILLed by someone else (as the kernel OOM killer does): the shell says
    "Killed", exit 137, and it is host_oom; the same exit after our own signal is killed."""
    rc, out = shell(tmp_path, f"{PY} -c 'import os, signal; os.kill(os.getpid(), signal.SIGKILL)'")
    assert rc == 137 and "Killed" in out
    assert classify(rc, out) == "host_oom"
    assert classify(rc, out, signalled=True) == "killed"
    assert not is_permanent("host_oom")


def test_real_sigterm_is_killed(tmp_path):
    """A worker ended by SIGTERM is killed, whoever sent it."""
    rc, out = shell(tmp_path, f"{PY} -c 'import os, signal; os.kill(os.getpid(), signal.SIGTERM)'")
    assert rc == 143
    assert classify(rc, out) == "killed"


def test_real_runtime_error_and_plain_exit(tmp_path):
    """A RuntimeError traceback is runtime_error; `exit 3` with no traceback is unknown."""
    rc, out = shell(tmp_path, f"{PY} -c 'raise RuntimeError(\"loss is nan\")'")
    assert classify(rc, out) == "runtime_error"
    rc, out = shell(tmp_path, "exit 3")
    assert classify(rc, out) == "unknown"


# Recorded from PyTorch runs (trimmed to the traceback's end): these need a GPU to produce.
TORCH_CUDA_OOM_OLD = """\
Traceback (most recent call last):
  File "train.py", line 88, in <module>
    loss.backward()
RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.69 GiB total capacity; \
20.12 GiB already allocated; 1.06 GiB free; 21.37 GiB reserved in total by PyTorch) If reserved memory is \
>> allocated memory try setting max_split_size_mb to avoid fragmentation.
"""
TORCH_OOM_ERROR = """\
Traceback (most recent call last):
  File "/work/train.py", line 41, in <module>
    x = torch.empty(80 * 2**30, dtype=torch.uint8, device="cuda")
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 80.00 GiB. GPU 0 has a total capacity of \
79.19 GiB of which 78.62 GiB is free. Including non-PyTorch memory, this process has 568.00 MiB memory in use. \
Of the allocated memory 0 bytes is allocated by PyTorch, and 0 bytes is reserved by PyTorch but unallocated.
"""
TORCH_CUDA_OOM_CLASS = "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.50 GiB\n"
NCCL_UNHANDLED = """\
Traceback (most recent call last):
  File "ddp.py", line 30, in <module>
    dist.all_reduce(t)
torch.distributed.DistBackendError: NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970, \
unhandled cuda error (run with NCCL_DEBUG=INFO for details), NCCL version 2.19.3
ncclUnhandledCudaError: Call to CUDA function failed.
Last error:
Cuda failure 'out of memory'
"""
NCCL_WATCHDOG = """\
[rank1]:[E ProcessGroupNCCL.cpp:563] [Rank 1] Watchdog caught collective operation timeout: \
WorkNCCL(SeqNum=9, OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600046 milliseconds \
before timing out.
[rank1]:[E ProcessGroupNCCL.cpp:1537] [PG 0 Rank 1] Timeout at NCCL work: 9, last enqueued NCCL work: 9
"""


@pytest.mark.parametrize("text, expected", [
    (TORCH_CUDA_OOM_OLD, "oom"), (TORCH_OOM_ERROR, "oom"), (TORCH_CUDA_OOM_CLASS, "oom"),
    (NCCL_WATCHDOG, "nccl_error"),
    # NCCL's own failure, even when its cause mentions memory, is first of all a CUDA OOM:
    # the table says oom comes first, so the next attempt asks for more memory.
    (NCCL_UNHANDLED, "oom"),
    (NCCL_UNHANDLED.replace("Cuda failure 'out of memory'", "Cuda failure 'invalid device'"), "nccl_error"),
])
def test_recorded_pytorch_failures(text, expected):
    """PyTorch CUDA OOM (old RuntimeError, torch.OutOfMemoryError, torch.cuda.OutOfMemoryError)
    is oom; NCCL errors and watchdog timeouts are nccl_error."""
    assert classify(1, text) == expected


def test_an_early_import_warning_does_not_decide_a_later_failure():
    """Only the last exception line counts: an ImportError printed early, then a ValueError, is unknown."""
    text = "ImportError: apex not found, falling back\nepoch 1\nTraceback...\nValueError: bad shape\n"
    assert last_exception(text) == "ValueError: bad shape"
    assert classify(1, text) == "unknown"


def test_table_is_the_single_source_of_permanent_types():
    """The permanent types are exactly the table rows marked permanent."""
    assert PERMANENT == {"not_found", "syntax_error", "import_error"}
    assert {r.error_type for r in RULES if r.permanent} == PERMANENT


def test_timeout_wins_over_everything():
    """An attempt ended at its time limit is timeout whatever its status and output."""
    assert classify(137, "CUDA out of memory", timed_out=True) == "timeout"
    assert classify(0, "", timed_out=True) == "timeout"  # it stopped when told, but did not finish


# --- the supervisor's time limit on real processes -------------------------------------------

TERM_LOGGER = r"""
import os, signal, sys, time
out = sys.argv[1]
def on_term(signum, frame):
    with open(out, "a") as fh:
        fh.write(f"TERM {os.getpid()}\n")
    if sys.argv[2] == "exit":
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(out + ".ready", "w").close()
while True:
    time.sleep(0.05)
"""


def test_timeout_terms_the_group_then_kills_it(tmp_path):
    """At the limit the whole group gets SIGTERM; one that ignores it is SIGKILLed after the
    grace period; the task ends as timeout, with both steps in its log."""
    script = tmp_path / "w.py"
    script.write_text(TERM_LOGGER)
    marks = tmp_path / "marks"
    reg = tmp_path / "uni_id.json"
    log = tmp_path / "t.log"
    start = time.monotonic()
    result = supervise([SHELL, "-c", build_script([f"{PY} {script} {marks} ignore"])], "t1", str(reg), str(log),
                       quiet=True, timeout_s=1.0, grace_s=0.5)
    took = time.monotonic() - start
    assert (result.state, result.error_type) == ("abnormal_exit", "timeout")
    assert "TERM" in marks.read_text()  # the python grandchild got SIGTERM, not only the shell
    assert took >= 1.5  # waited the grace period before SIGKILL
    text = log.read_text()
    assert "SIGTERM to the task's process group after 1 s" in text and "SIGKILL" in text
    assert Registry(reg).get("t1")["error_type"] == "timeout"


def test_timeout_obeyed_within_grace_needs_no_sigkill(tmp_path):
    """A task that exits on SIGTERM ends at once (no SIGKILL, no waiting out the grace period)."""
    script = tmp_path / "w.py"
    script.write_text(TERM_LOGGER)
    marks = tmp_path / "marks"
    log = tmp_path / "t.log"
    start = time.monotonic()
    result = supervise([PY, str(script), str(marks), "exit"], "t2", str(tmp_path / "r.json"), str(log),
                       quiet=True, timeout_s=0.5, grace_s=30)
    assert time.monotonic() - start < 10
    assert result.error_type == "timeout"
    assert "SIGKILL" not in log.read_text()


def test_no_timeout_before_the_limit(tmp_path):
    """A task that ends before its limit is not touched."""
    result = supervise([PY, "-c", "pass"], "t3", str(tmp_path / "r.json"), None, quiet=True, timeout_s=30)
    assert (result.returncode, result.error_type) == (0, None)


def test_forwarded_sigkill_is_killed_not_host_oom(tmp_path):
    """SIGTERM forwarded by the supervisor (a `stop`) ends the task as killed."""
    marks = tmp_path / "marks"
    script = tmp_path / "w.py"
    script.write_text(TERM_LOGGER.replace('sys.exit(0)', 'os.kill(os.getpid(), signal.SIGKILL)'))
    child = subprocess.Popen([PY, "-m", "gpu_compete.supervisor", "--uni-id", "t4", "--registry",
                              str(tmp_path / "r.json"), "--quiet", "--", PY, str(script), str(marks), "exit"])
    wait_for(lambda: (tmp_path / "marks.ready").exists(), 20, "worker ready")
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait(timeout=20) == 137
    assert Registry(tmp_path / "r.json").get("t4")["error_type"] == "killed"


def test_exec_timeout_through_the_cli(tmp_path):
    """`gpu-compete exec --timeout 1s` ends a hung CMD and records it as timeout."""
    from .helpers import console_script

    reg = tmp_path / "r.json"
    start = time.monotonic()
    done = subprocess.run([console_script(), "exec", "--uni-id", "hang", "--registry", str(reg), "--timeout", "1s",
                           "--", PY, "-c", "import time; time.sleep(60)"], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 30
    assert done.returncode == 143
    assert Registry(reg).get("hang")["error_type"] == "timeout"
