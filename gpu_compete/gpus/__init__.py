"""GPU probes: frozen snapshots of what each GPU holds, from NVML or a simulation."""

from .base import (GpuProbe, GpuProcess, GpuSnapshot, NoDriverError, ScopeError, current_user, gpu_env,
                   owner_of, resolve_scope)

__all__ = ["GpuProbe", "GpuProcess", "GpuSnapshot", "NoDriverError", "ScopeError", "current_user", "gpu_env",
           "owner_of", "resolve_scope", "open_probe"]


def open_probe(simulate: str | None = None, gpus: str = "all", pynvml_module=None,
               namespace: str | None = None) -> GpuProbe:
    """The probe the CLI and daemon use: the simulation when asked, else NVML.
    `namespace` (the daemon's state directory) keeps simulations of two daemons apart."""
    if simulate:
        from .simulated import SimulatedProbe

        return SimulatedProbe.from_spec(simulate, scope=gpus, namespace=namespace)
    from .nvml import NvmlProbe

    return NvmlProbe(scope=gpus, pynvml_module=pynvml_module)
