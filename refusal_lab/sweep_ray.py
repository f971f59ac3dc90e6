"""The Ray executor of sweeps (:mod:`refusal_lab.sweep`): each task a Ray task declaring its resources.

``--ray local`` starts a Ray instance on this machine (shut down at the end); ``auto`` joins the cluster
this machine is part of; ``host:port`` / ``ray://host:port`` joins that one (its reachability is checked
first, so a wrong address fails within seconds, not at Ray's own minute-long time-out). A Ray instance
already running in this process (``ray.init`` by the caller) is used as it is and left running.

Resources: ``gpus_per_task`` GPUs (default 1; a model spread with ``--device-map auto`` over N GPUs
needs N) and one CPU per task where the cluster has GPUs, else ``cpus_per_task`` CPUs (capped at the
largest node's). Tasks are retried twice when their worker dies (lost node, out of memory); an
error raised by the task's own code is not retried — it is the task's outcome. What crosses the wire is
plain data: the task's payload (a dict of strings and numbers) and parcels (``bytes``).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from refusal_lab.sweep import SweepError, run_task

MAX_RETRIES = 2  # a task whose worker died is run again this often
CONNECT_TIMEOUT_S = 10.0


def _check_reachable(address: str) -> None:
    """Raise :class:`SweepError` unless ``host:port`` (optionally ``ray://``) accepts a TCP connection."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise SweepError(f"Ray address {address!r}: use local, auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise SweepError(f"Ray cluster at {address} is unreachable ({e.strerror or e}); is it running, "
                         "and is the port open from this machine?") from None


def connect(address: str) -> bool:
    """Make sure this process is connected to Ray at ``address``; True when this call started it (and
    so it must be shut down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline machines: Ray reports nothing home
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                               "logging_level": logging.WARNING}
    if address == "local":
        options["num_cpus"] = os.cpu_count() or 1
    elif address == "auto":
        options["address"] = "auto"
    else:
        _check_reachable(address)
        options["address"] = address
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        raise SweepError(f"could not connect to Ray ({address}): {' '.join(str(e).split())}") from None
    return True


class RayExecutor:
    """Runs sweep tasks as Ray tasks (see the module doc)."""

    def __init__(self, address: str = "local", cpus_per_task: int = 1, gpus_per_task: int = 1) -> None:
        import ray

        self.name = f"ray:{address}"
        self._started = connect(address)
        gpus = float(ray.cluster_resources().get("GPU", 0))
        largest = max((float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1.0)
        if gpus >= 1 and gpus_per_task > gpus:
            self.shutdown()
            raise SweepError(f"--gpus-per-task {gpus_per_task}: the cluster has {gpus:g} GPU(s)")
        self.resources = {"num_gpus": int(gpus_per_task), "num_cpus": 1} if gpus >= 1 else \
            {"num_gpus": 0, "num_cpus": max(1, min(int(cpus_per_task), int(largest)))}
        self._remote = ray.remote(run_task).options(max_retries=MAX_RETRIES, retry_exceptions=False,
                                                    **self.resources)
        self._puts: dict[int, tuple[bytes, Any]] = {}  # id(parcel) → (parcel, its object ref): put once

    def submit(self, payload: dict, parcel: bytes) -> Any:
        import ray

        if id(parcel) not in self._puts:
            self._puts[id(parcel)] = (parcel, ray.put(parcel))
        return self._remote.remote(payload, self._puts[id(parcel)][1])

    def wait(self, pending: list) -> tuple[list, list]:
        import ray

        return ray.wait(pending, num_returns=1)

    def result(self, handle: Any) -> dict:
        import ray
        from ray.exceptions import RayTaskError

        try:
            return ray.get(handle)
        except RayTaskError as e:  # the task's own exception, not Ray's wrapper with a remote traceback
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, BaseException) else RuntimeError(str(e).splitlines()[0])) from None

    def shutdown(self) -> None:
        import ray

        self._puts.clear()
        if self._started and ray.is_initialized():
            ray.shutdown()
            self._started = False
