"""Following the command file: what it costs the daemon each round, and what a reload costs.

- the per-round check of an unchanged file (one stat): target well under 1 ms;
- a reload after one block is appended to a 10,000-task file in 1,000 queues: read, parse,
  diff and rebuild the queues (in-process, no daemon, no GPUs): target < 300 ms (the
  parse is most of it, about 15 µs a task);
- one `gpu-compete add`-style append to that file under its lock (read, validate, write,
  fsync).

    python bench/reload.py              # about 20 s on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_compete.appender import append, block_text  # noqa: E402
from gpu_compete.commandbook import CommandBook  # noqa: E402
from gpu_compete.commandfile import load  # noqa: E402
from gpu_compete.steering import Steering  # noqa: E402
from gpu_compete.tasks import Queue, Task, group_queues  # noqa: E402


def fake_daemon(specs, history: Path):
    queues = {q: Queue(Task(s) for s in ss) for q, ss in group_queues(specs).items()}
    return SimpleNamespace(queues=queues, tasks={t.uni_id: t for q in queues.values() for t in q},
                           history=SimpleNamespace(journaled=set()),
                           config=SimpleNamespace(fresh=False, history=history))


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1e3:.3f} ms, p95 {sorted(values)[int(len(values) * .95)] * 1e3:.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--queues", type=int, default=1_000)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cmd.txt"
        path.write_text("\n".join(f"python train.py --task {i} --run {{uni_id}}\n{i % args.queues},8\n"
                                  for i in range(args.tasks)))
        parsed = load(path)
        book = CommandBook(path, parsed)
        book.check()
        time.sleep(2.1)  # out of the racy window, so an unchanged file is not read
        book.check()
        checks = []
        for _ in range(1000):
            t0 = time.perf_counter()
            book.check()
            checks.append(time.perf_counter() - t0)
        print(f"per-round check, unchanged {args.tasks}-task file: {ms(checks)}")

        steer = Steering(fake_daemon(parsed.tasks, Path(tmp) / "history.jsonl"), book)
        reloads, adds = [], []
        for i in range(args.reps):
            t0 = time.perf_counter()
            append(path, block_text([f"python train.py --extra {i}"], str(i % args.queues), "8"))
            adds.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            specs = book.check()
            assert specs is not None
            steer.apply(specs)
            reloads.append(time.perf_counter() - t0)
        print(f"reload after one appended block ({args.tasks} tasks): {ms(reloads)}")
        print(f"add (lock, read, validate, append, fsync) to that file: {ms(adds)}")


if __name__ == "__main__":
    main()
