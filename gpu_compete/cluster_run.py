"""`gpu-compete run --ray ADDRESS`: connect, start the agents, run the coordinator."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, NoReturn

from . import pidfile
from .daemon import EXIT_OK, Config
from .registry import private_dirs
from .tasks import TaskSpec


def run_tag(state_dir: Path) -> str:
    """Agents are named after the state directory: a coordinator restarted on the same one
    finds the agents (and through them the tasks) of the one before."""
    return hashlib.sha1(str(state_dir).encode()).hexdigest()[:12]


def fetch_log(address: str, state_dir: Path, uni_id: str, *, fail: Callable[..., NoReturn]) -> str:
    """A task's log from the agent of the node it ran on (the agents of this state directory's
    run; every node is asked, since the log may hold attempts from several)."""
    from . import cluster

    try:
        cluster.connect(address)
        ray = cluster.import_ray()
        prefix = cluster.actor_name(run_tag(state_dir), "")
        texts = []
        for name in sorted(ray.util.list_named_actors()):
            if name.startswith(prefix):
                handle = ray.get_actor(name, namespace=cluster.NAMESPACE)
                text = ray.get(handle.call.remote("log", uni_id), timeout=30)
                if text:
                    texts.append(text)
    except cluster.ClusterError as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - a node that went away: say so in one line
        fail(f"cannot fetch the log of {uni_id}: {exc}", 1)
    if not texts:
        fail(f"no node of the run in {state_dir} has a log for {uni_id} (its agents have ended, or it has "
             "not started)", 1)
    return "".join(texts)


def run_on_cluster(address: str, config: Config, specs: list[TaskSpec], *, simulate: str | None, gpu_scope: str,
                   node_timeout: float, fail: Callable[[str], NoReturn],
                   serve_metrics: Callable[[], Any] = lambda: None, dry_run: bool = False,
                   book: Any = None, follow: bool = False) -> int:
    """`serve_metrics()`: starts the metrics server (--metrics-port) once the state directory
    is ours, and returns it (or None); it serves what the coordinator writes there."""
    from . import cluster
    from .coordinator import Coordinator
    from .node_contact import contact_s

    try:
        cluster.connect(address)
    except cluster.ClusterError as exc:
        fail(str(exc))
    agent_kwargs = {"state_dir": str(config.state_dir), "work_dir": str(config.work_dir), "simulate": simulate,
                    "gpus": gpu_scope, "kill_grace": config.kill_grace, "fence_s": node_timeout,
                    "contact_s": contact_s(config.poll), "min_free_ram": config.guard.min_free_ram_gb,
                    "min_free_disk": config.guard.min_free_disk_gb}
    if dry_run:
        return _dry_run(cluster, config, specs, agent_kwargs, node_timeout)
    try:
        private_dirs(config.state_dir)
        lock = pidfile.acquire(config.state_dir)
    except pidfile.PidFileBusy as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot use state directory {config.state_dir}: {exc.strerror or exc}")
    agents = cluster.Agents("gpu_compete.agent:Agent", agent_kwargs, run_tag(config.state_dir), max_concurrency=2)
    server = None
    try:
        server = serve_metrics()
        coordinator = Coordinator(config, specs, agents, node_timeout=node_timeout, book=book, follow=follow)
        coordinator.resume()
        code = coordinator.run()
        if coordinator.nothing_running():
            agents.shutdown_all()  # nothing of ours runs any more (a restart starts new agents)
        return code
    finally:
        if server is not None:
            server.stop()
        pidfile.release(lock)


def _dry_run(cluster: Any, config: Config, specs: list[TaskSpec], agent_kwargs: dict[str, Any],
             node_timeout: float) -> int:
    """`--dry-run --ray`: every node's GPUs and where each queue's head would start. Agents a
    run in progress has are only asked; those started for this are ended after."""
    from .coordinator import Coordinator

    agents = cluster.Agents("gpu_compete.agent:Agent", agent_kwargs, run_tag(config.state_dir), max_concurrency=2,
                            own=False)
    before = agents.named()
    try:
        print(Coordinator(config, specs, agents, node_timeout=node_timeout).dry_run())
    finally:
        for node in set(agents.nodes) - before:
            agents.kill(node)
    return EXIT_OK
