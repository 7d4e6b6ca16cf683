"""The Ray glue of a run across several machines (`--ray ADDRESS`): connect, name the nodes,
keep one agent actor on each.

Ray is an optional extra (`pip install 'gpu-compete[ray]'`), so nothing here imports it until
a function is called: the CLI stays fast and works without it.

Each agent is a detached actor named `gpu-compete-agent:<tag>:<node>` in the namespace
`gpu-compete`, pinned to its node (`NodeAffinitySchedulingStrategy`, soft=False) and found
again by name (`get_if_exists`): a coordinator that restarts with the same tag talks to the
agents of the one before it, whose tasks are still running. `gpu-compete` must be installed
on every node: the actor class is this module's `AgentActor`, imported there by name.

The actors ask Ray for no CPU and no GPU. Ray assigns GPUs only to what asks for them and sets
`CUDA_VISIBLE_DEVICES` to match; an agent must see the node's GPUs as the node sees them, since
it hands them out itself. What Ray does to a zero-GPU actor, by version:
- releases before ray-project/ray#62492 (April 2026) set `CUDA_VISIBLE_DEVICES` (and the other
  vendors' variables: `HIP_VISIBLE_DEVICES`, `NEURON_RT_VISIBLE_CORES`, ...) to "" in the actor
  before `__init__`, which hides every GPU from it and from what it starts.
  `RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1` (#17847, 2021) spares the CUDA one only,
  `RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0` (#54928, August 2025) all of them;
- later ones (Ray 2.60 measured) leave them alone unless RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1;
- and (2.60 measured; OMP since long before) `OMP_NUM_THREADS=1` where unset (num_cpus=0
  counts as 1) and `PYTHONBREAKPOINT=ray.util.rpdb.set_trace`, for the actor's lifetime.
These are writes to `os.environ` in the worker, made before `__init__` and never undone for an
actor; the agent's tasks would inherit them. Rather than set flags that differ between versions
(and that the tasks would inherit too), `AgentActor` puts back what its process started with,
read from `/proc/self/environ`: the environment of the node's raylet, i.e. of `ray start`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import socket
from collections.abc import Iterable
from typing import Any

NAMESPACE = "gpu-compete"
NODE_LABEL = "gpu-compete-node"
ACTOR_PREFIX = "gpu-compete-agent"
CONNECT_TIMEOUT_S = 5.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (the GCS) answers with its
# own SETTINGS frame (type 4); anything else (the dashboard, a stray port) does not.
_H2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


class ClusterError(Exception):
    """A one-line problem for the user (the CLI prints it and exits 2)."""


class NodeGone(ClusterError):
    """The node's agent is dead: its actor died, was killed, or its node left the cluster."""


class NodeTimeout(ClusterError, TimeoutError):
    """The node's agent did not answer in time (the call may still run later)."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError:  # also when sys.modules["ray"] is None
        raise ClusterError("--ray needs Ray: pip install 'gpu-compete[ray]'") from None
    return ray


# --- connecting ---------------------------------------------------------------------------------


def connect(address: str) -> None:
    """Join the Ray cluster at `address` ("auto" or "HOST:PORT") as a driver.

    Never starts a cluster (that is what `address=None` would do), and never waits long:
    `ray.init` retries an absent GCS for many minutes (measured: over 5 on Ray 2.60), so the
    GCS port is dialled first, for at most CONNECT_TIMEOUT_S. Ray drives a cluster from one of
    its nodes: run this on a machine where `ray start` ran (the head, usually).
    """
    ray = import_ray()  # before anything else: the message when it is missing
    if address.startswith("ray://"):
        raise ClusterError(f"{address}: Ray Client addresses are not supported; run on a node of the "
                           "cluster with --ray auto or --ray HOST:PORT (the GCS port, 6379 by default)")
    shown, target = address, _bootstrap_address(address)
    if target != address:
        shown = f"{address} ({target})"
    host, _, port = target.rpartition(":")
    hint = None
    if target != address and address.rpartition(":")[0] in ("127.0.0.1", "localhost"):
        hint = ("(start one with `ray start --head`; Ray dials this machine's address for a loopback one: "
                "for a cluster started on 127.0.0.1, run gpu-compete with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 too)")
    _check_gcs(host.strip("[]"), int(port), shown, hint=hint)
    _check_local_node(shown)
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
        raise ClusterError(f"cannot join the Ray cluster at {shown}: {_first_line(exc)}") from exc


def _bootstrap_address(address: str) -> str:
    """The HOST:PORT that `ray.init(address=address)` will dial. Ray resolves "auto" (RAY_ADDRESS,
    else the cluster `ray start` last started here) and replaces 127.0.0.1/localhost by the
    machine's own address (unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0): ask it, to check that."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # a private helper; without it check what was given
        canonicalize_bootstrap_address = None
    try:
        target = canonicalize_bootstrap_address(address) if canonicalize_bootstrap_address else address
    except ConnectionError:
        target = None
    except ValueError as exc:
        raise ClusterError(f"bad Ray address {address!r}: give auto or HOST:PORT ({_first_line(exc)})") from exc
    if target in (None, "auto"):
        raise ClusterError("no Ray cluster found for --ray auto: set RAY_ADDRESS or give HOST:PORT "
                           "(start one with `ray start --head`)")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"bad Ray address {address!r}: give auto or HOST:PORT")
    return target


def _check_gcs(host: str, port: int, shown: str, timeout: float = CONNECT_TIMEOUT_S, hint: str | None = None) -> None:
    hint = hint or "(start one with `ray start --head`)"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_H2_HELLO)
            head = _read(sock, 9)
    except TimeoutError:
        raise ClusterError(f"cannot reach the Ray cluster at {shown}: no answer in {timeout:g} s {hint}") from None
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        if isinstance(exc, socket.gaierror):  # a name that does not resolve: no cluster to start
            hint = "(check the host name)"
        raise ClusterError(f"cannot reach the Ray cluster at {shown}: {reason} {hint}") from None
    if len(head) < 9 or head[3] != 0x04:
        raise ClusterError(f"{shown} answers, but not as a Ray cluster: give the GCS port "
                           "(6379 by default; `ray status` on the head prints it), not the dashboard's")


def _check_local_node(shown: str) -> None:
    """A driver attaches to a Ray node of its own machine; with none, `ray.init` waits 60 s
    (RAY_gcs_server_request_timeout_seconds) before it fails. Ray finds that node by the
    raylet's command line (`find_node_ids`, newer Ray only): look first, the same way."""
    try:
        from ray._private.services import find_node_ids
    except ImportError:
        return
    if not find_node_ids():
        raise ClusterError(f"no Ray node runs on this machine: run gpu-compete on a node of the cluster at "
                           f"{shown} (its head, or here after `ray start --address=...`)")


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- naming nodes -------------------------------------------------------------------------------


def alive_nodes() -> dict[str, str]:
    """Node name -> Ray NodeID (hex) of every alive node: see `name_nodes`."""
    ray = import_ray()
    return name_nodes((n["NodeID"], (n.get("Labels") or {}).get(NODE_LABEL) or n.get("NodeManagerHostname") or "")
                      for n in ray.nodes() if n.get("Alive"))


def name_nodes(nodes: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Name -> node id for (node id, wanted name) pairs. The wanted name is the node's
    `gpu-compete-node` label (`ray start --labels`), else its hostname. Names become path
    components and the `node` of `node/index`, so anything outside [A-Za-z0-9._-] becomes '-';
    names that two nodes would share get `-` and the first 6 hex digits of their id (all of
    them: none keeps the bare name by the luck of the order), the whole id if 6 do not tell
    them apart."""
    groups: dict[str, list[str]] = {}
    for node_id, name in sorted(nodes):
        groups.setdefault(_safe(name) or "node", []).append(node_id)
    named: dict[str, str] = {}
    for name, ids in groups.items():
        if len(ids) == 1:
            named[name] = ids[0]
            continue
        width = 6 if len({i[:6] for i in ids}) == len(ids) else None  # else the whole ids
        for node_id in ids:
            suffixed = f"{name}-{node_id[:width]}"
            named[suffixed if suffixed not in groups else f"{name}-{node_id}"] = node_id
    return named


def _safe(name: str) -> str:
    name = _UNSAFE.sub("-", name)
    return "" if name in (".", "..") else name


def actor_name(namespace_tag: str, node: str) -> str:
    return f"{ACTOR_PREFIX}:{namespace_tag}:{node}"


# --- the agents ---------------------------------------------------------------------------------


class AgentActor:
    """What runs in the Ray actor: builds `module:Class(node=node, **kwargs)` and forwards calls."""

    def __init__(self, factory_path: str, node: str, kwargs: dict[str, Any]):
        restore_start_environ()
        module, _, name = factory_path.partition(":")
        self.agent = getattr(importlib.import_module(module), name)(node=node, **kwargs)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method.startswith("_"):
            raise AttributeError(f"not an agent call: {method}")
        return getattr(self.agent, method)(*args, **kwargs)

    def own(self, lease: Any) -> None:
        """The coordinator now driving this agent, by its lease: an actor owned by the
        coordinator's driver, which Ray ends with it. The agent's heartbeat asks it when the
        coordinator has been silent: an actor Ray reports dead is proof that the coordinator
        is gone (keep the tasks for the next one); no answer is no proof (cut off: let the
        fence end them before they run elsewhere)."""
        import ray

        def gone() -> bool:
            try:
                ray.get(lease.ping.remote(), timeout=2)
            except ray.exceptions.RayActorError as exc:
                unavailable = getattr(ray.exceptions, "ActorUnavailableError", ())
                return not (unavailable and isinstance(exc, unavailable))
            except Exception:  # noqa: BLE001 - a timeout, the cluster unreachable: no proof
                return False
            return False

        self.agent.attach_owner(gone)


class Lease:
    """Lives as long as the coordinator's driver (an actor it owns, not detached)."""

    def ping(self) -> bool:
        return True


def restore_start_environ(path: str = "/proc/self/environ") -> None:
    """Undo what Ray wrote into this worker's `os.environ` before `__init__` (see the module
    docstring): every variable goes back to its value at exec, `RAY_*` ones aside (Ray's own).
    Writes to os.environ never reach /proc/self/environ, which keeps the exec-time block."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:  # not Linux: leave it
        return
    start = dict(os.fsdecode(item).partition("=")[::2] for item in raw.split(b"\0") if b"=" in item)
    for key in set(os.environ) | set(start):
        if key.startswith("RAY_") or os.environ.get(key) == start.get(key):
            continue
        if key in start:
            os.environ[key] = start[key]
        else:
            del os.environ[key]


class Agents:
    """One agent actor per alive node, for one run (`namespace_tag`).

    A node keeps its name while it is alive, even if a node that joins later makes
    `alive_nodes` rename it (a task's GPU is `node/index`); a name frees when its node leaves,
    so a node that comes back (a new NodeID, the same label) has it again. An agent found dead
    (NodeGone) is forgotten: the next `refresh()` starts a new one if its node is alive, and
    reports the node as joined.

    `max_concurrency` is how many calls an agent serves at once (Ray threads); 1 keeps it
    single-threaded, 2 lets a waiting call (`observe`) run beside `launch`/`kill`.
    """

    def __init__(self, agent_factory_path: str, agent_kwargs: dict[str, Any], namespace_tag: str, *,
                 max_concurrency: int = 1, own: bool = True):
        """`own=False`: only look (a dry run): the agents are not told that this driver now
        drives them (`AgentActor.own`), so a run in progress keeps its hold on them."""
        module, _, name = agent_factory_path.partition(":")
        if not module or not name:
            raise ClusterError(f"bad agent factory {agent_factory_path!r}: give module:Class")
        self.ray = import_ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._affinity = NodeAffinitySchedulingStrategy
        self.factory_path, self.kwargs, self.tag = agent_factory_path, dict(agent_kwargs), namespace_tag
        self._actor = self.ray.remote(num_cpus=0, num_gpus=0, max_concurrency=max_concurrency,
                                      max_restarts=0)(AgentActor)
        self._names: dict[str, str] = {}  # NodeID hex -> name, for the alive nodes seen
        self._handles: dict[str, Any] = {}  # name -> actor handle, for the agents believed alive
        self._lease: Any = None  # this driver's Lease, given to every agent it drives
        self._own = own

    # --- the nodes ------------------------------------------------------------------------------

    @property
    def nodes(self) -> list[str]:
        """The nodes with an agent (believed alive)."""
        return sorted(self._handles)

    def node_id(self, node: str) -> str:
        return next(i for i, n in self._names.items() if n == node)

    def alive(self) -> set[str]:
        """The names of the nodes alive now, agent or not (asks Ray)."""
        return {self._names.get(node_id, name) for name, node_id in alive_nodes().items()}

    def refresh(self) -> list[str]:
        """Start (or find) an agent on every alive node that has none; forget the nodes that
        left. Returns the nodes that got an agent since the last refresh (first call: all)."""
        alive = alive_nodes()
        alive_ids = set(alive.values())
        for node_id in [i for i in self._names if i not in alive_ids]:
            self._handles.pop(self._names.pop(node_id), None)
        joined = []
        for name, node_id in sorted(alive.items()):
            if node_id not in self._names:
                taken = set(self._names.values())
                if name in taken:  # held by a node named before this one joined
                    name = next(n for n in (f"{name}-{node_id[:6]}", f"{name}-{node_id}") if n not in taken)
                self._names[node_id] = name
            name = self._names[node_id]
            if name not in self._handles:
                self._handles[name] = self._start(name, node_id)
                if self._own:
                    self._handles[name].own.remote(self._own_lease())
                joined.append(name)
        return sorted(joined)

    def _own_lease(self) -> Any:
        """This driver's Lease: on its own node, and started again if only its worker died
        (Ray never restarts an actor whose owner died, which is what the agents ask)."""
        if self._lease is None:
            here = self.ray.get_runtime_context().get_node_id()
            self._lease = self.ray.remote(num_cpus=0, num_gpus=0, max_restarts=-1)(Lease).options(
                scheduling_strategy=self._affinity(node_id=here, soft=False)).remote()
        return self._lease

    def _start(self, node: str, node_id: str) -> Any:
        return self._actor.options(
            name=actor_name(self.tag, node), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            scheduling_strategy=self._affinity(node_id=node_id, soft=False),
        ).remote(self.factory_path, node, self.kwargs)

    def forget(self, node: str) -> None:
        """Drop the node's agent from this object (the actor lives on; `refresh` finds it again)."""
        self._handles.pop(node, None)

    # --- calls ----------------------------------------------------------------------------------

    def submit(self, node: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Start a call and return its Ray ObjectRef at once (for `gather`; or dropped: it still runs)."""
        handle = self._handles.get(node)
        if handle is None:
            raise NodeGone(f"no agent on node {node}")
        return handle.call.remote(method, *args, **kwargs)

    def gather(self, inflight: dict[str, tuple[Any, float]], wait_s: float) -> list[tuple[str, Any]]:
        """Wait up to `wait_s` for the first of the submitted calls (node -> (ref, when asked))
        to end; returns (node, answer) for every one ended by then, an exception instance
        (NodeGone, NodeTimeout, or what the method raised) standing for a failed one."""
        nodes = {ref: node for node, (ref, _) in inflight.items()}
        if not nodes:
            return []
        ready, rest = self.ray.wait(list(nodes), num_returns=1, timeout=wait_s)
        if ready and rest:
            ready += self.ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        return [(nodes[ref], self._answer(nodes[ref], ref, wait_s)) for ref in ready]

    def call(self, node: str, method: str, *args: Any, timeout: float, **kwargs: Any) -> Any:
        """The agent's answer; raises NodeGone, NodeTimeout, or what the agent's method raised."""
        try:
            ref = self.submit(node, method, *args, **kwargs)
            value = self.ray.get(ref, timeout=timeout)
        except NodeGone:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped, or raised again as it was
            raise self._failure(node, exc, timeout) from None
        return value

    def call_all(self, method: str, *args: Any, timeout: float, **kwargs: Any) -> dict[str, Any]:
        """Node -> answer of every agent, asked in parallel and waited for `timeout` seconds in
        all. A node that failed maps to an exception instance (NodeGone, NodeTimeout, or what its
        method raised) instead of an answer; nothing is raised for one bad node."""
        results: dict[str, Any] = {}
        refs = {}
        for node in self.nodes:
            try:
                refs[node] = self.submit(node, method, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a dead handle may refuse at submission
                results[node] = self._failure(node, exc, timeout)
        if refs:
            ready, _ = self.ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
            done = set(ready)
            for node, ref in refs.items():
                if ref in done:
                    results[node] = self._answer(node, ref, timeout)
                else:
                    results[node] = NodeTimeout(f"node {node}: no answer to {method} in {timeout:g} s")
        return results

    def _answer(self, node: str, ref: Any, timeout: float) -> Any:
        try:
            return self.ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a failure is a value here
            return self._failure(node, exc, timeout)

    def _failure(self, node: str, exc: Exception, timeout: float) -> Exception:
        """The exception a failed call stands for; forgets the agent when it is dead."""
        errors = self.ray.exceptions
        if isinstance(exc, ClusterError):
            return exc
        if isinstance(exc, errors.GetTimeoutError):
            return NodeTimeout(f"node {node}: no answer in {timeout:g} s")
        if isinstance(exc, errors.RayTaskError):  # the agent's method raised: give its exception
            return exc.as_instanceof_cause()
        unavailable = getattr(errors, "ActorUnavailableError", ())  # Ray >= 2.32: may come back
        if unavailable and isinstance(exc, unavailable):
            return NodeTimeout(f"node {node}: agent unreachable for now ({_first_line(exc)})")
        if isinstance(exc, errors.RayError):  # actor died, unschedulable (node gone), system error
            self.forget(node)
            return NodeGone(f"node {node}: agent gone ({type(exc).__name__})")
        return exc

    # --- ending ---------------------------------------------------------------------------------

    def kill(self, node: str) -> None:
        """Kill the node's agent (its tasks run on, under their supervisors) and forget it."""
        handle = self._handles.pop(node, None) or self._named(actor_name(self.tag, node))
        if handle is not None:
            self.ray.kill(handle, no_restart=True)

    def named(self) -> set[str]:
        """The nodes that have an agent of this run's tag now, started by this driver or not."""
        prefix = actor_name(self.tag, "")
        return {a["name"][len(prefix):] for a in self.ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == NAMESPACE and a["name"].startswith(prefix)}

    def shutdown_all(self) -> None:
        """Kill every agent of this tag, this object's or not (a run that ended with all done)."""
        prefix = actor_name(self.tag, "")
        handles = list(self._handles.values())
        named = self.ray.util.list_named_actors(all_namespaces=True)
        handles += [h for a in named if a["namespace"] == NAMESPACE and a["name"].startswith(prefix)
                    if (h := self._named(a["name"])) is not None]
        self._handles.clear()
        for handle in handles:
            with contextlib.suppress(self.ray.exceptions.RayError, ValueError):  # already dead
                self.ray.kill(handle, no_restart=True)

    def _named(self, name: str) -> Any:
        try:
            return self.ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:  # none by that name (any more)
            return None
