"""finextract-audit on a Ray cluster (``--ray auto`` or ``--ray local --workers N``): one Ray actor per GPU (per
configured worker on a machine without GPUs), each owning a stock ComfyUI server that it starts on 127.0.0.1 with the
pack installed and drives as the single-machine command does: the actor holds the command's own AuditWorker, whose
Server starts (and restarts) ComfyUI through the product's launcher (finextract_core.comfy_client).

The driver (the command) keeps the plan, the grouping by base and the index; the workers take groups of jobs through
``ray.wait`` with one group in flight per worker, so a worker that finishes takes the next group. Faults: a worker's
ComfyUI that dies is started again by its Server and the prompt queued again (its bank resumes); an actor that dies
is restarted by Ray and its group retried on it; an actor Ray gives up on is dropped and its group goes to another
worker. Every job is idempotent (banks resume, finished models are kept in state/), so a retried group generates
only what is missing. A worker whose server cannot start is reported and the others go on.

Ray is imported here only, inside functions: the node pack and the single-machine command never import it.
"""

from __future__ import annotations

import os
import statistics
import time

from ..comfy_client import READY_TIMEOUT
from .command import PACK_ROOT, AuditError, AuditWorker, base_groups

ACTOR_RESTARTS = 2  # Ray starts a dead actor again (and its ComfyUI) this often before its group goes elsewhere
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's processes listen on 127.0.0.1 only
START_SECONDS = 2 * READY_TIMEOUT  # a worker's ComfyUI answers within READY_TIMEOUT once Ray has placed it
SHOW_EVERY_LINE = "RAY_DEDUP_LOGS"  # "0": each worker's progress lines reach the terminal, not "repeated 3x"


class ComfyWorker:
    """A Ray actor: one AuditWorker and the ComfyUI server it started (in OUT/workers/<name>/)."""

    def __init__(self, name: str, opts, roots: list[str], started: float):
        self.name = name
        self.worker = AuditWorker(opts, roots, started, name)

    def __repr__(self) -> str:  # Ray names the actor's log lines and errors by it
        return self.name

    def url(self) -> str:
        return self.worker.server.client.url

    def call(self, method: str, group: list) -> tuple[object, float]:
        """The AuditWorker's ``method`` on the group, and the seconds it took here (the driver's wait less this is
        what Ray adds)."""
        began = time.monotonic()
        result = getattr(self.worker, method)(group)
        return result, time.monotonic() - began

    def stop(self) -> None:
        self.worker.stop()


def connect(mode: str, workers: int):
    """The ray module, connected: to the running cluster (``auto``), or to one started here for the run with
    ``workers`` CPUs, all of the machine's by default (``local``: no dashboard, every process on 127.0.0.1). The workers import the pack from its
    folder (on a cluster of several machines, the pack, the models and --out must be at the same paths on each)."""
    os.environ.setdefault(SHOW_EVERY_LINE, "0")  # both read when ray is first imported
    if mode == "local":
        os.environ.setdefault(LOOPBACK_ONLY, "0")
    try:
        import ray
    except ImportError:
        raise AuditError("--ray needs Ray: pip install 'finextract[cluster]' (or pip install 'ray>=2.40')") from None
    path = os.pathsep.join(p for p in [PACK_ROOT, os.environ.get("PYTHONPATH", "")] if p)
    runtime_env = {"env_vars": {"PYTHONPATH": path}}
    if mode == "local":
        ray.init(num_cpus=workers or None, include_dashboard=False, runtime_env=runtime_env,
                 logging_level="warning")
    else:
        try:
            ray.init(address="auto", runtime_env=runtime_env, logging_level="warning")
        except ConnectionError as error:
            raise AuditError(f"--ray auto found no running Ray cluster ({error}): start one with 'ray start "
                             "--head', or use --ray local") from None
    return ray


class RayWorkers:
    """The workers of a Ray cluster, as LocalWorkers is one server: ``groups`` and ``map`` for Audit.extract_all."""

    def __init__(self, opts, roots: list[str], started: float, log):
        self.log = log
        self.ray = ray = connect(opts.ray, opts.workers)
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        wanted = opts.workers or gpus or 1
        if gpus and wanted > gpus:
            raise AuditError(f"--workers {wanted}, but the Ray cluster has {gpus} GPUs: one worker per GPU")
        if not gpus and wanted > cpus:
            raise AuditError(f"--workers {wanted}, but the Ray cluster has {cpus} CPUs: one worker per CPU")
        options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        actor = ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=-1)(ComfyWorker)
        self.log(f"Ray cluster: {cpus} CPUs, {gpus} GPUs; starting {wanted} ComfyUI workers "
                 f"({'one GPU' if gpus else 'one CPU'} each)")
        starting = {}
        for number in range(1, wanted + 1):
            name = f"worker-{number}"
            handle = actor.options(**options).remote(name, opts, roots, started)
            starting[handle.url.remote()] = (name, handle)
        self.handles: dict[str, object] = {}
        deadline = time.monotonic() + START_SECONDS
        while starting:
            answered, _ = ray.wait(list(starting), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not answered:
                for name, handle in starting.values():
                    self.log(f"{name}: not started within {START_SECONDS:.0f} s (are the cluster's "
                             f"{'GPUs' if gpus else 'CPUs'} taken by another job?), going on without it")
                    ray.kill(handle)
                break
            name, handle = starting.pop(answered[0])
            try:
                self.log(f"{name}: ComfyUI ready at {ray.get(answered[0])}")
                self.handles[name] = handle
            except ray.exceptions.RayActorError as error:
                self.log(f"{name}: its ComfyUI could not start, going on without it: {first_error_line(error)} "
                         f"(log: {os.path.join(os.path.abspath(opts.out), 'workers', name, 'comfyui.log')})")
        if not self.handles:
            raise AuditError("no worker's ComfyUI could start: see the logs in OUT/workers/")
        self.count = len(self.handles)
        self.jobs: dict[str, int] = dict.fromkeys(self.handles, 0)
        self.busy: dict[str, float] = dict.fromkeys(self.handles, 0.0)
        self.overheads: list[float] = []

    def groups(self, items: list, base_of, weight_of) -> list[list]:
        return base_groups(items, base_of, weight_of, self.count)

    def map(self, method: str, groups: list[list]):
        """Each group's result as a worker finishes it, one group in flight per worker (ray.wait): a worker that
        finishes takes the next group. A group whose worker Ray gave up on goes to another worker."""
        ray = self.ray
        pending = list(groups)
        idle = list(self.handles)
        in_flight: dict = {}
        while pending or in_flight:
            while idle and pending:
                name = idle.pop(0)
                group = pending.pop(0)
                in_flight[self.handles[name].call.remote(method, group)] = (name, group, time.monotonic())
            [done], _ = ray.wait(list(in_flight), num_returns=1)
            name, group, sent = in_flight.pop(done)
            try:
                result, seconds = ray.get(done)
            except ray.exceptions.RayActorError as error:
                del self.handles[name]
                if not self.handles:
                    raise AuditError(f"every worker is gone; the last, {name}: {first_error_line(error)}") from None
                self.log(f"{name} is gone ({first_error_line(error)}): its {len(group)} jobs go to another worker")
                pending.insert(0, group)
                continue
            idle.append(name)
            self.jobs[name] += len(group)
            self.busy[name] += seconds
            self.overheads.append(max(0.0, time.monotonic() - sent - seconds))
            yield result

    def close(self) -> None:
        ray = self.ray
        try:
            for name in sorted(self.jobs):
                self.log(f"{name}: {self.jobs[name]} jobs, {self.busy[name]:.1f} s busy")
            if self.overheads:
                self.log(f"Ray: {len(self.overheads)} groups, {statistics.mean(self.overheads):.3f} s added per "
                         f"group on average (at most {max(self.overheads):.3f} s)")
            stopping = [handle.stop.remote() for handle in self.handles.values()]
            ray.wait(stopping, num_returns=len(stopping), timeout=60)
            for handle in self.handles.values():
                ray.kill(handle)
        finally:
            ray.shutdown()


def first_error_line(error: Exception) -> str:
    """The cause of a Ray error in one line: the last line of the actor's traceback that names an error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line.split(":")[0] or "Exited" in line.split(":")[0]]
    return (named or lines or [type(error).__name__])[-1][:400]
