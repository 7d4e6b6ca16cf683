"""`gpu-compete gpus`, the no-driver path, and the environment a task is launched with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from gpu_compete.cli import main
from gpu_compete.gpus import current_user
from gpu_compete.launcher import LaunchPaths, build_script, task_environment
from gpu_compete.tasks import TaskSpec

from .helpers import console_script
from .nvml_fake import fakes

__all__ = ["fakes"]


def test_gpus_table_shows_memory_processes_and_exclusive_availability(tmp_path):
    """The table names each GPU's free/total memory, its processes with owner, and if it is free for you."""
    sim = tmp_path / "sim.json"
    sim.write_text(json.dumps({"gpus": [{"memory_gb": 24, "processes": [{"pid": os.getpid(), "memory_gb": 3}]},
                                        {"memory_gb": 80, "processes": [{"pid": 999_999_997, "memory_gb": 8}]}]}))
    result = CliRunner().invoke(main, ["gpus", "--simulate", str(sim), "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "FREE FOR" in lines[0]
    assert f"{os.getpid()}:{current_user()}:3.0GB" in lines[1] and lines[1].rstrip().endswith("no")
    assert "999999997:unknown:8.0GB" in lines[2] and lines[2].rstrip().endswith("yes")
    assert "21.0/24.0" in lines[1] and "72.0/80.0" in lines[2]


def test_gpus_json_is_the_snapshot(tmp_path):
    """`--json` prints every GPU's snapshot and exclusive availability as JSON on stdout."""
    result = CliRunner().invoke(main, ["gpus", "--simulate", "3x16", "--gpus", "0,2", "--json",
                                       "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [g["index"] for g in data["gpus"]] == [0, 2]
    assert all(g["free_for_me_exclusive"] and g["total_bytes"] == 16 * 2**30 for g in data["gpus"])


def test_a_gpu_that_does_not_exist_is_exit_2():
    """--gpus naming a missing index is a clear error with exit status 2."""
    result = CliRunner().invoke(main, ["gpus", "--simulate", "2x24", "--gpus", "5"])
    assert result.exit_code == 2 and "no GPU 5" in result.output


def test_no_driver_is_one_sentence_and_exit_2():
    """Without an NVIDIA driver (as on this machine), the real path says so plainly: no traceback."""
    done = subprocess.run([console_script(), "gpus"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "no NVIDIA driver was found" in done.stderr and "--simulate" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_task_environment_pins_the_gpu_in_pci_order(tmp_path):
    """A task gets PCI bus order and CUDA_VISIBLE_DEVICES = the NVML index, plus its own ids."""
    spec = TaskSpec("1", 1, ("echo",), 7.5, 1)
    paths = LaunchPaths(tmp_path, tmp_path / "state", tmp_path / "state/uni_id.json", tmp_path / "h")
    env = task_environment(spec, 3, paths, base={"PATH": "/bin"})
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and env["CUDA_VISIBLE_DEVICES"] == "3"
    assert env["GPU_COMPETE_UNI_ID"] == spec.uni_id and env["GPU_COMPETE_VRAM_GB"] == "7.5"
    assert env["GPU_COMPETE_REGISTRY"] == str(paths.registry)


def test_the_task_script_stops_at_the_first_failing_command(tmp_path):
    """Commands share one shell (cd carries over) and the first failure ends the task with its status."""
    marker = tmp_path / "ran"
    script = build_script([f"cd {tmp_path}", "true  # a comment ends with its line",
                           "(exit 7)", f"touch {marker}"])
    done = subprocess.run(["bash", "-c", script], cwd="/")
    assert done.returncode == 7 and not marker.exists()
    script = build_script([f"cd {tmp_path}", "touch here"])
    assert subprocess.run(["bash", "-c", script], cwd="/").returncode == 0 and Path(tmp_path / "here").exists()


def test_python_dash_m_runs_the_same_cli():
    """`python -m gpu_compete` is the same program as the console script."""
    import sys

    done = subprocess.run([sys.executable, "-m", "gpu_compete", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("gpu-compete, version")


def test_gpus_lists_mig_devices_and_an_unreadable_process_list(fakes, monkeypatch):
    """Over NVML (the fake driver under the real bindings): a MIG GPU shows one row per MIG device
    with its UUID, and a GPU whose process list can't be read says so and is not free for you."""
    from .nvml_fake import NO_PERMISSION, FakeGpu
    from .test_nvml_mig import SLICE_UUIDS, mig_a100

    fake = fakes([mig_a100(), FakeGpu("GPU-h100h100-0000-4000-8000-000000000000")])
    fake.gpus[1].fail["processes:compute"] = NO_PERMISSION
    monkeypatch.setitem(sys.modules, "pynvml", fake.module)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("GPU_COMPETE_GPUS", raising=False)
    result = CliRunner().invoke(main, ["gpus"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line[:1].isdigit()]
    assert [r.split()[0] for r in rows] == ["0:0", "0:1", "0:2", "1"]
    assert SLICE_UUIDS[0] in rows[0] and "20.0/20.0" in rows[0] and rows[0].rstrip().endswith("yes")
    assert "(unreadable: Insufficient Permissions)" in rows[3]
    assert rows[3].rstrip().endswith("no")

    result = CliRunner().invoke(main, ["gpus", "--json", "--gpus", SLICE_UUIDS[1] + ",1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    assert [(g["key"], g["cuda_visible"], g["processes_known"], g["free_for_me_exclusive"]) for g in data["gpus"]] == [
        ("0:1", SLICE_UUIDS[1], True, True), ("1", "1", False, False)]
