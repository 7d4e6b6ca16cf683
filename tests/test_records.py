"""The node's registry as its agent writes it (`Records`): changes a failing disk refused are
written later, in order, and never on a later attempt's record."""

from __future__ import annotations

import errno

from gpu_compete.records import Records
from gpu_compete.registry import Registry


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def attempt_1_failed_on_a_full_disk(tmp_path, monkeypatch, *more) -> tuple[Registry, Records]:
    """Attempt 1 (supervisor 111) runs; its failure (and `more(records)`) is recorded while the
    disk refuses every write, so it is still pending."""
    registry = Registry(tmp_path / "uni_id.json")
    registry.set("q1-a", state="running", supervisor_pid=111, exec_pid=111, attempt=1)
    records = Records(registry)
    records.known["q1-a"] = registry.read()["q1-a"]  # as the daemon's round saw it
    with monkeypatch.context() as m:
        m.setattr(Registry, "_write", enospc)
        records.failed("q1-a", {"state": "abnormal_exit", "error_type": "oom", "retry_count": 1})
        for change in more:
            change(records)
        assert not records.flush()
    return registry, records


def test_a_late_write_for_an_earlier_attempt_never_lands_on_the_next(tmp_path, monkeypatch):
    """Attempt 1 (supervisor 111) fails and is stopped while the disk refuses writes; the next
    attempt's supervisor (222) writes its own record once the disk works, before our queued
    changes go: they must not turn the running attempt's record into attempt 1's end (its
    supervisor would take that for its wrapper's word and report a failure)."""
    registry, records = attempt_1_failed_on_a_full_disk(
        tmp_path, monkeypatch, lambda r: r.stopped({"q1-a": {"retry_count": 1}}, supervisors={"q1-a": 111}),
        lambda r: r.peaks({"q1-a": {"peak_vram_gb": 9.0}}, supervisors={"q1-a": 111}))
    registry.set("q1-a", state="running", exec_pid=222, pid=333, attempt=2)  # the next attempt, itself
    assert records.flush()
    record = registry.read()["q1-a"]
    assert (record["state"], record["exec_pid"], record["attempt"]) == ("running", 222, 2)
    assert "error_type" not in record and "peak_vram_gb" not in record


def test_a_late_write_for_the_same_attempt_lands(tmp_path, monkeypatch):
    """The same queued failure, with no later attempt in between: written once the disk works,
    over what the attempt's own supervisor wrote."""
    registry, records = attempt_1_failed_on_a_full_disk(tmp_path, monkeypatch)
    registry.set("q1-a", state="abnormal_exit", exit_status=1)  # its supervisor's last word
    assert records.flush()
    record = registry.read()["q1-a"]
    assert (record["state"], record["error_type"], record["retry_count"]) == ("abnormal_exit", "oom", 1)
