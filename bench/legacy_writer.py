"""The old unlocked wrapper writer in a loop beside a running daemon: how many of its records
survive? (The trust issue measured 724 of 1,375 lost before the registry learned to wait for
a half-written file and to read back writes into the inode it replaced.)

    python bench/legacy_writer.py [--records 1000] [--writers 1]

The daemon runs 3 queues of short tasks on simulated GPUs, so it writes the registry several
times a second; the legacy loop (tests/legacy/update_uni_id_status.sh, verbatim) adds records
`legacy-<w>-<i>` one by one. Printed: records written, records in the registry at the end,
lost, and how many registry writes the daemon made meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEGACY = ROOT / "tests" / "legacy" / "update_uni_id_status.sh"
GPU_COMPETE = shutil.which("gpu-compete", path=os.path.dirname(sys.executable)) or "gpu-compete"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000, help="records each legacy writer adds")
    parser.add_argument("--writers", type=int, default=1, help="legacy loops at once (they race each other too)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        blocks = [f"sleep 0.1\n{q},1\n" for q in "abc" for _ in range(100_000)]
        (tmp / "command.txt").write_text("\n".join(blocks))
        state = tmp / "state"
        daemon = subprocess.Popen([GPU_COMPETE, "--commands", str(tmp / "command.txt"), "--state-dir", str(state),
                                   "--simulate", "3x24", "--poll", "0.2", "--status-every", "0",
                                   "--log-format", "json"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, cwd=tmp)
        registry = state / "uni_id.json"
        while not registry.exists():
            time.sleep(0.05)
        start = time.monotonic()
        loops = [subprocess.Popen(["bash", str(LEGACY), str(registry), str(args.records), f"legacy-{w}"])
                 for w in range(args.writers)]
        for loop in loops:
            loop.wait()
        elapsed = time.monotonic() - start
        subprocess.run([GPU_COMPETE, "stop", "--state-dir", str(state), "--kill"], capture_output=True)
        _, err = daemon.communicate(timeout=60)
        records = json.loads(registry.read_text())
        written = args.records * args.writers
        kept = sum(1 for k in records if k.startswith("legacy-"))
        started = err.count('"task started"')
    print(f"legacy writers: {args.writers} x {args.records} records in {elapsed:.1f} s, beside a daemon "
          f"that started {started} tasks (each a few registry writes)")
    print(f"records written {written}, in the registry at the end {kept}, lost {written - kept}"
          + ("" if args.writers == 1 else " (with several legacy writers, they also lose each other's)"))


if __name__ == "__main__":
    main()
