"""RayExecutor: the sampler's executor interface over Ray actors, one UNet replica each.

The driver keeps everything that decides the image (latents, generators, schedules,
fusion); workers only answer work units. Per timestep:

  1. the units (fixed by `executor.make_units`, never by the worker count) go into a queue;
  2. the queue is shared out by the units' work, longest first (equal units: sizes differing by
     at most one; the shares that finish last hold the units the driver uses last) among the idle
     live workers, one call each (two for a long share, see `_shares`): this meets the plan's
     per-step barrier bound with the fewest calls; one wait loop gathers the replies, of Ray calls
     (`ray.wait`) and of socket calls (`channel.wait`);
  3. a call that fails because its worker died puts its units back in the queue; the worker
     is pinged, and comes back into rotation if Ray restarts it (`max_restarts`);
  4. each reply is handed to the sampler as it arrives (guidance, then the scheduler step of
     its patches, overlap the calls still running); nothing depends on the order of arrival.

What travels: to workers on the driver's node, patches and predictions go through one
reused shared-memory file (`shared_memory.py`) and a call carries only offsets, over a Unix
socket (`channel.py`) instead of a Ray call; to workers on other nodes, the step's whole
tensors that its patches are cuts of (the zero-padded scaled latent, the blurred one; see
`executor.DeferredPatches`) go into the object store once per step, each when a call first
needs it, and every Ray call passes them by reference with only its patches' cuts (slices): Ray
moves each object to a node once, and the workers there read it from the node's store. Only
patches that are no cut of such a tensor (phase 1's) travel in the call, as numpy arrays.
Predictions come back as numpy arrays (zero-copy on the driver).

All workers are reserved up front in a placement group; if the cluster cannot provide
them within `placement_timeout_s`, `start` fails before any work, saying what was
asked and what the cluster has.

Several renders at once (`many.render_many`): each reaches the workers through a lane (`lane`),
with its own context on every worker, and one dispatcher thread (`_Pool`) runs the same loop
(`_serve`) over all lanes' jobs, sharing the workers as `_assign` says.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import queue
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError

import numpy as np
import torch

from . import channel, shared_memory
from .executor import DeferredPatches, Executor, RenderContext, WorkUnit, lpt_shares, patch_shapes
from .worker import ContextMissing, Cuts, UNetWorker

# A call with no reply for this long (at least) counts as hung; see RayExecutor's call_timeout_s.
CALL_TIMEOUT_FLOOR_S = 60.0
CALL_TIMEOUT_FACTOR = 10.0  # x the median seconds per work unit of recent calls
_RECENT_CALLS = 256  # calls the median is taken over, per kind (predict, decode, ...)
_POOL_POLL_S = 0.002  # the pool's thread looks for new jobs at least this often
BACKFILL_CALL_S = 0.05  # UNet seconds a later render's backfill call holds (see _assign)


# Worker losses, restarts and re-queues, as they happen (the CLI shows them on stderr); also in summary()["events"].
log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """The cluster cannot run the render: placement failed, or no worker is left."""


class WorkerError(RuntimeError):
    """A worker's call raised (a model error, out of memory, ...): the render it belongs to fails, in one line."""


def resolve_auto_address(temp_dir: str | None = None) -> tuple[str, str]:
    """(address, where it came from) for `address="auto"`, the way Ray resolves it, or ("", why not).

    RAY_ADDRESS first, then the `ray_current_cluster` file that `ray start` writes in Ray's temp
    dir (`temp_dir`, else Ray's default: $RAY_TMPDIR, $TMPDIR or /tmp, then "ray"), read by Ray's own
    functions. Unlike a bare ray.init("auto"), never falls back to any Ray process found running
    on the machine, and refuses an address file written by another user.
    """
    env = os.environ.get("RAY_ADDRESS", "")
    if env:
        return env, "auto: RAY_ADDRESS"
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(temp_dir)
    try:
        st = os.stat(path)
    except OSError:
        return "", f"auto: no RAY_ADDRESS and no {path} (no `ray start` with this temp dir on this machine)"
    if st.st_uid != os.getuid():
        return "", f"auto: {path} belongs to another user; set RAY_ADDRESS or --address HOST:PORT"
    from ray._private.utils import read_ray_address

    return (read_ray_address(temp_dir) or ""), f"auto: the cluster last started on this machine, {path}"


def address_problem(address: str | None, timeout_s: float = 5.0, temp_dir: str | None = None) -> str | None:
    """Why `address` names no Ray cluster that answers, or None when it may.

    ray.init retries an address that does not answer for minutes; this says so in seconds,
    before any work. None and "local" (a new local instance) are not checked.
    """
    if address in (None, "local"):
        return None
    target, via = address, ""
    if address == "auto":
        target, source = resolve_auto_address(temp_dir)
        if not target:
            return f"found no Ray cluster ({source})"
        via = f" ({source})"
        if target == "local":
            return None
    hostport = target.split("://", 1)[-1].rstrip("/")  # ray://HOST:PORT (Ray Client) too
    host, sep, port = hostport.rpartition(":")
    host = host.strip("[]")  # [IPv6]:PORT
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        return f"must be auto or HOST:PORT, got {target!r}{via}"
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        return f"no Ray cluster answers at {host}:{port}{via}: {e.strerror or e}"
    return None


@dataclass
class WorkerState:
    handle: object
    index: int
    info: dict = field(default_factory=dict)
    alive: bool = True
    dead: bool = False  # gone for good (ray.kill, restarts exhausted)
    in_flight: int = 0
    lost_at: float = 0.0
    next_ping: float = 0.0
    pinging: bool = False
    shared: bool = False  # on the driver's node and attached to its shared-memory file
    channel: channel.Channel | None = None  # direct calls (shared workers only)
    patches: float = 0.0  # patch evaluations served (a guidance half counts 0.5)
    calls: int = 0
    busy_s: float = 0.0
    losses: int = 0
    progress_at: float = 0.0  # when its last reply came (or its first call went out, if it was idle)
    pending_units: int = 0  # work units in its calls in flight


class RayExecutor(Executor):
    """Executor over `num_workers` Ray actors.

    address: None starts a local Ray instance (or uses the one this process already
    initialised); "auto" or "HOST:PORT" joins a running cluster.
    gpus_per_worker: None means 1 when the cluster has GPUs, else 0 (CPU workers).
    shared_memory: exchange patches with workers on the driver's node through /dev/shm
    (False: Ray objects for every worker).
    direct_calls: call those workers over a Unix socket rather than through Ray
    (False: every call is a Ray call).
    worker_resources: custom Ray resources each worker's bundle asks for too ({"gpu_node": 1}: only on
    nodes started with that resource), to keep workers on (or off) chosen nodes.
    worker_class, worker_kwargs: the actor class, a `UNetWorker` subclass, built as
    `worker_class(spec, cpu_threads=..., **worker_kwargs)` on each worker: the one seam for
    stand-in workers (the benchmarks' simulated UNet, fault-injection tests). A class defined
    outside `apt_dist` (a script, a test module) is sent to the workers by value, so they need
    not import its module.
    """

    def __init__(
        self,
        num_workers: int = 1,
        address: str | None = None,
        gpus_per_worker: float | None = None,
        cpus_per_worker: float = 1.0,
        placement_strategy: str = "PACK",
        placement_timeout_s: float = 120.0,
        worker_timeout_s: float = 300.0,
        max_restarts: int = 2,
        call_timeout_s: float | None = None,
        shared_memory: bool = True,
        direct_calls: bool = True,
        worker_resources: dict | None = None,
        worker_class: type[UNetWorker] = UNetWorker,
        worker_kwargs: dict | None = None,
        ray_init_kwargs: dict | None = None,
    ):
        super().__init__()
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"unknown placement_strategy {placement_strategy!r}")
        self.num_workers = num_workers
        self.address = address
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = cpus_per_worker
        self.placement_strategy = placement_strategy
        self.placement_timeout_s = placement_timeout_s
        self.worker_timeout_s = worker_timeout_s  # how long a lost worker may take to come back
        self.call_timeout_s = call_timeout_s  # None: CALL_TIMEOUT_FACTOR x recent median, at least the floor
        self._unit_s: dict[str, deque] = {}  # recent seconds per work unit, per kind of call
        self.max_restarts = max_restarts
        self.shared_memory = shared_memory
        self.direct_calls = direct_calls
        if not (isinstance(worker_class, type) and issubclass(worker_class, UNetWorker)):
            raise TypeError(f"worker_class must be UNetWorker or a subclass, got {worker_class!r}")
        self.worker_resources = dict(worker_resources or {})
        self.worker_class = worker_class
        self.worker_kwargs = dict(worker_kwargs or {})
        self.ray_init_kwargs = ray_init_kwargs or {}
        self.workers: list[WorkerState] = []
        self._pg = None
        self._spec = None
        self._owns_ray = False
        self._local_instance = False  # a Ray instance this executor started: its resources never grow
        self._contexts: dict[int, object] = {}  # render key -> its context in the object store (0: a lone render)
        self._pool: _Pool | None = None  # the dispatcher thread of several renders at once (`lane`)
        self._lanes: dict[int, Executor] = {}  # the lanes whose render is running
        self._policy = "longest"
        self._start_lock = threading.Lock()
        self._pings: dict = {}
        self._render_t0 = 0.0
        self._wire_dtype = np.float32
        self._buf: shared_memory.SharedBuffer | None = None
        self._channel_dir: str | None = None
        self._channel_key = os.urandom(32)

    # ---- lifecycle -----------------------------------------------------------------
    def start(self, context: RenderContext) -> None:
        super().start(context)
        self._start_workers(context.model)
        self._reset_worker_counts()
        self._send_context(0, context)  # runs before any later Ray call of this driver...
        # ...and so before the attach calls here return, hence before any call over a channel.
        self._connect_local([w for w in self.workers if w.alive])
        self._render_t0 = time.perf_counter()

    def _start_workers(self, model) -> None:
        """Join or start Ray, and the workers for `model` (the running ones, if they hold it)."""
        import ray

        from .cleanup import remove_stale_files

        remove_stale_files()  # what drivers killed on this node left (shared memory, socket folders)
        if not ray.is_initialized():
            # No address: join the cluster of a Ray job (RAY_ADDRESS is set there), else start a local instance.
            address = self.address or (None if os.environ.get("RAY_ADDRESS") else "local")
            target = address
            if address == "auto":  # checked here, so ray.init never falls back to another user's cluster
                target, source = resolve_auto_address(self.ray_init_kwargs.get("_temp_dir"))
                if not target:
                    raise ClusterError(f"address 'auto': found no Ray cluster ({source})")
            problem = address_problem(target)
            if problem:
                raise ClusterError(f"address {target!r}: {problem}")
            # "auto" itself goes to ray.init, which reads the same address file: given the resolved HOST:PORT
            # instead, a driver started by `ray submit` on a token-auth head was refused (tests/test_launcher.py).
            kw = {"log_to_driver": False} | ({"include_dashboard": False} if address == "local" else {})
            try:
                ray.init(address=address, **(kw | self.ray_init_kwargs))
            except ConnectionError as e:  # "auto" with no running instance, say
                raise ClusterError(f"cannot join the Ray cluster at {address!r}: {e}") from None
            self._owns_ray = True
            self._local_instance = address == "local"
        worker_spec = self._worker_spec(model)
        # A float16 UNet casts its input to float16 and its output is float16: sending both ways in
        # float16 changes no value and halves the bytes. Other dtypes travel as float32.
        self._wire_dtype = np.float16 if worker_spec.torch_dtype() == torch.float16 else np.float32
        if self.workers and worker_spec != self._spec:
            self._shutdown_workers()
        if not self.workers:
            self._spec = worker_spec
            self._launch()

    def _reset_worker_counts(self) -> None:
        """What summary() reports per worker counts from here: a render's start, or a pool's."""
        for w in self.workers:
            w.patches = w.busy_s = 0.0
            w.calls = w.losses = 0

    def _send_context(self, key: int, context: RenderContext) -> list:
        """Render `key`'s prompt embeddings and size: one copy in the object store, fetched once by each worker."""
        import ray

        self._contexts[key] = ray.put({"embeds": context.embeds, "original_size": tuple(context.original_size)})
        return [w.handle.set_context.remote(self._contexts[key], key) for w in self.workers if w.alive]

    # ---- lanes: several renders at once on these workers (render_many) ------------------------------------
    def open_lanes(self, model, policy: str = "longest") -> None:
        from .many import POLICIES

        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self._policy = policy
        with self._start_lock:
            self._start_workers(model)

    def lane(self, key: int) -> Executor:
        """An executor for render `key` (1, 2, ...: the order of submission) of several that share these workers
        (`many.render_many`). The first lane opens the pool: a dispatcher thread that runs every lane's calls,
        one render first as the policy says, the others backfilling (`_assign`). Lanes use plain Ray calls and objects (no
        shared-memory file or socket of their own). `end_lanes` closes the pool."""
        if key < 1:
            raise ValueError(f"lane keys start at 1 (0 is the lone render's), got {key}")
        if self._pool is None:
            self._pool = _Pool(self)
            self._render_t0 = time.perf_counter()
            self._reset_worker_counts()
        return _RayLane(self, key)

    def end_lanes(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def pool_status(self) -> dict:
        """Live workers, those with calls out, and the units queued (read from another thread: approximate)."""
        live = [w for w in self.workers if w.alive]
        jobs = list(self._pool.jobs) if self._pool is not None else []
        return {"workers": len(live), "busy": sum(1 for w in live if w.in_flight), "queued": sum(len(j.queue) for j in jobs)}

    def _first_lane(self, jobs: list[_Job]) -> int:
        """The render that has the workers first (`_assign`): a lone render's, else as the policy says, of the
        running lanes: the one with the most patch evaluations left ("longest"), or the earliest ("earliest")."""
        lanes = dict(self._lanes)  # lanes start and end in their own threads
        if any(j.lane == 0 for j in jobs) or not lanes:
            return min((j.lane for j in jobs), default=0)
        if self._policy == "earliest":
            return min(lanes)

        def left(key: int) -> int:
            ex = lanes[key]
            return ex.context.patch_evals - ex.stats.patch_evals

        return min(lanes, key=lambda k: (-left(k), k))

    def _start_lane(self, key: int, context: RenderContext, lane: Executor) -> None:
        import ray

        with self._start_lock:  # lanes start from their own threads; the first one starts the workers
            if self.workers and self._worker_spec(context.model) != self._spec:
                raise ValueError(f"the renders of one pool share its workers' model: {self._spec.name!r} runs, "
                                 f"render {key} asks for {context.model.name!r} (or other LoRAs, VAE or dtype)")
            self._start_workers(context.model)
            ray.get(self._send_context(key, context))  # on every worker before the pool's thread calls for it
            self._lanes[key] = lane

    def _end_lane(self, key: int) -> None:
        self._lanes.pop(key, None)
        ref = self._contexts.pop(key, None)
        if ref is not None:
            for w in self.workers:
                if w.alive:
                    w.handle.drop_context.remote(key)

    def _resend_contexts(self, w: WorkerState) -> None:
        """A restarted actor has lost every render's context."""
        for key, ref in self._contexts.items():
            w.handle.set_context.remote(ref, key)

    def device_profile(self, gpu_memory: float | None = None):
        """CPU workers, or CUDA with the smallest worker GPU's memory times the GPU share of a worker."""
        from .devices import GIB, DeviceProfile

        gpus = self._gpus()
        if gpus <= 0:
            return DeviceProfile("cpu")
        if gpu_memory is not None:
            return DeviceProfile("cuda", float(gpu_memory), "--gpu-memory")
        infos = [w.info for w in self.workers if getattr(w, "info", None) and "gpu_total_bytes" in w.info]
        if not infos:
            return DeviceProfile("cuda", None, "unknown")
        low = min(infos, key=lambda i: i["gpu_total_bytes"])
        return DeviceProfile("cuda", low["gpu_total_bytes"] * min(1.0, gpus) / GIB, low.get("gpu_name", ""))

    def _gpus(self) -> float:
        import ray

        if self.gpus_per_worker is not None:
            return self.gpus_per_worker
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0

    def _worker_spec(self, spec):
        return dataclasses.replace(spec, device="cuda" if self._gpus() > 0 else "cpu")

    def _launch(self) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpus = self._gpus()
        bundle = {"CPU": self.cpus_per_worker} | ({"GPU": gpus} if gpus > 0 else {}) | self.worker_resources
        if self._local_instance:  # no autoscaler will add what is missing: say so now, not after the timeout
            total = ray.cluster_resources()
            fixes = {"CPU": "fewer CPUs per worker (fractions are allowed)",
                     "GPU": "a fraction of a GPU per worker (or 0: CPU workers)"}
            short, hints = [], ["fewer workers"]
            for k, v in bundle.items():
                if self.num_workers * v > total.get(k, 0) + 1e-9:
                    short.append(f"{self.num_workers} x {v:g} = {self.num_workers * v:g} {k} (this machine has {total.get(k, 0):g})")
                    hints.append(fixes.get(k, f"no {k} per worker (worker_resources)"))
            if self.placement_strategy == "STRICT_SPREAD" and self.num_workers > 1:
                short.append("a node per worker (STRICT_SPREAD), and a local Ray instance is one node")
                hints.append("another placement strategy")
            if short:
                raise ClusterError(
                    f"could not reserve {self.num_workers} workers x {bundle} on the local Ray instance: they need "
                    f"{'; '.join(short)}. Use {', '.join(hints)}, or a cluster"
                )
        pg = placement_group([dict(bundle) for _ in range(self.num_workers)], strategy=self.placement_strategy)
        try:
            ray.get(pg.ready(), timeout=self.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            total, free = ray.cluster_resources(), ray.available_resources()
            have = ", ".join(f"{k}={total.get(k, 0):g} (free {free.get(k, 0):g})" for k in ("CPU", "GPU"))
            raise ClusterError(
                f"could not reserve {self.num_workers} workers x {bundle} ({self.placement_strategy}) within "
                f"{self.placement_timeout_s:g} s; the cluster has {have} on {len(ray.nodes())} node(s)"
            ) from None
        self._pg = pg
        module = self.worker_class.__module__
        if module != "__main__" and module.split(".")[0] != __name__.split(".")[0] and module in sys.modules:
            ray.cloudpickle.register_pickle_by_value(sys.modules[module])  # workers may not find its module
        actor_cls = ray.remote(self.worker_class)
        for i in range(self.num_workers):
            h = actor_cls.options(
                num_cpus=self.cpus_per_worker,
                num_gpus=gpus,
                max_restarts=self.max_restarts,
                max_task_retries=0,  # the driver re-queues lost units itself, onto any live worker
                enable_task_events=False,  # thousands of short calls: no per-call event reports to the GCS
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            ).remote(self._spec, cpu_threads=max(1, int(self.cpus_per_worker)), **self.worker_kwargs)
            self.workers.append(WorkerState(h, i))
        infos = ray.get([w.handle.info.remote() for w in self.workers])  # waits for every model to load
        for w, info in zip(self.workers, infos):
            w.info = info
        failed = [(w.index, info["load_error"]) for w, info in zip(self.workers, infos) if info.get("load_error")]
        if failed:
            self._shutdown_workers()
            index, reason = failed[0]
            raise ClusterError(f"worker {index} could not load the model: {reason}")

    def _connect_local(self, workers: list[WorkerState]) -> None:
        """Workers on the driver's node that can map its /dev/shm file use it from now on, called over a socket."""
        import ray

        here = ray.get_runtime_context().get_node_id()
        for w in workers:
            w.shared = False
        local = [w for w in workers if w.info.get("node_id") == here]
        if not (self.shared_memory and local and shared_memory.available()):
            return
        if self._buf is None:
            self._buf = shared_memory.SharedBuffer()
        try:
            self._buf.ensure(1 << 20)
        except OSError as e:
            self._event(logging.WARNING, f"shared memory unavailable ({e}); patches travel as Ray objects")
            return
        for w, ok in zip(local, ray.get([w.handle.attach.remote(self._buf.path) for w in local])):
            w.shared = ok
        if not self.direct_calls:
            return
        if self._channel_dir is None:
            from .cleanup import socket_dir_prefix

            # 0700: only this user reaches the sockets; the pid in the name lets a later driver remove it (cleanup.py)
            self._channel_dir = tempfile.mkdtemp(prefix=socket_dir_prefix())
        todo = [w for w in local if w.shared and (w.channel is None or w.channel.closed)]
        addresses = [os.path.join(self._channel_dir, f"w{w.index}.{w.info.get('pid')}") for w in todo]
        opened = ray.get([w.handle.open_channel.remote(a, self._channel_key) for w, a in zip(todo, addresses)])
        for w, a, err in zip(todo, addresses, opened):
            try:
                if err:
                    raise OSError(err)
                w.channel = channel.Channel(a, self._channel_key, name=f"worker {w.index}")
            except (OSError, AuthenticationError) as e:
                w.channel = None
                self._event(logging.WARNING, f"worker {w.index}: no direct channel ({e}); its calls go through Ray")

    def close(self) -> None:
        import ray

        self.end_lanes()
        if self._buf is not None:
            self._buf.close()
            self._buf = None
        self._shutdown_workers()
        if self._channel_dir is not None:
            shutil.rmtree(self._channel_dir, ignore_errors=True)
            self._channel_dir = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    def _shutdown_workers(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for w in self.workers:
            if w.channel is not None:
                w.channel.close()
            try:
                ray.kill(w.handle)
            except Exception:
                pass
        self.workers = []
        self._pings = {}
        if self._pg is not None:
            try:
                remove_placement_group(self._pg)
            except Exception:
                pass
            self._pg = None

    # ---- the per-timestep loop -----------------------------------------------------------
    def _run_units(self, timestep, units: list[WorkUnit], patches, crops, deliver, lane: int = 0):
        # A lane (one of several renders at once) has no shared-memory file and no socket of its own: plain Ray.
        staging = self._staging(units, patches) if not lane else _Staging(units, patches, self._wire_dtype, None)

        def submit(w, idx):
            messages, sources = staging.call(idx, crops, w.shared and not lane)
            if self._direct(w) and not lane:
                return w.channel.call(timestep, messages)
            return w.handle.predict.remote(timestep, messages, *sources, context=lane)

        def receive(idx, outs):
            deliver(idx, [staging.output(k) if o is None else _as_tensor(o) for k, o in zip(idx, outs)])

        made = len(patches.head) if isinstance(patches, DeferredPatches) else len(patches)  # patches that exist now
        self._dispatch(_Job(len(units), submit, receive, weights=[len(u.rows) / 2 for u in units],
                            what=f"timestep {timestep}", ready=lambda k: units[k].patches[-1] < made, lane=lane))

    def _direct(self, w: WorkerState) -> bool:
        """Whether w's predict calls go over its socket (else through Ray)."""
        return self.direct_calls and w.shared and w.channel is not None

    def _staging(self, units, patches) -> _Staging:
        buf = self._buf if any(w.shared and w.alive for w in self.workers) else None
        try:
            return _Staging(units, patches, self._wire_dtype, buf)
        except OSError as e:  # /dev/shm full: this and later steps go through Ray's object store
            self._event(logging.WARNING, f"shared memory failed ({e}); patches travel as Ray objects from now on")
            for w in self.workers:
                w.shared = False
            return _Staging(units, patches, self._wire_dtype, None)

    def _decode(self, tiles, norm_stats, lane: int = 0):
        return self._tiles_on_workers("decode", tiles, norm_stats, lane)

    def _norm_stats(self, latent, max_side, lane: int = 0):
        return self._stats_on_workers("group_norm_stats", latent, max_side, "decode statistics", lane)

    def _encode(self, tiles, norm_stats, lane: int = 0):
        return self._tiles_on_workers("encode", tiles, norm_stats, lane)

    def _encoder_norm_stats(self, image, max_side, lane: int = 0):
        return self._stats_on_workers("encoder_group_norm_stats", image, max_side, "encode statistics", lane)

    def _tiles_on_workers(self, method: str, tiles, norm_stats, lane: int = 0) -> list[torch.Tensor]:
        """VAE tiles (`method`: the worker's decode or encode), shared out over the workers."""
        import ray

        arrays = [t.numpy() for t in tiles]
        results: list = [None] * len(arrays)
        stats_ref = ray.put(norm_stats)  # one copy in the object store, shared by every call
        self._dispatch(_Job(len(arrays), lambda w, idx: getattr(w.handle, method).remote([arrays[i] for i in idx], stats_ref),
                            _store(results), weights=[0] * len(arrays), what=method, lane=lane))
        return [_as_tensor(o) for o in results]

    def _stats_on_workers(self, method: str, whole: torch.Tensor, max_side: int, what: str, lane: int = 0) -> dict:
        """The VAE's GroupNorm statistics of a whole image (`method` on one worker)."""
        results: list = [None]
        self._dispatch(_Job(1, lambda w, idx: getattr(w.handle, method).remote([whole.numpy()], max_side),
                            _store(results), weights=[0], what=what, lane=lane))
        return results[0]

    # ---- the dispatcher: one loop for one render's calls, or (a thread) for several renders' ----------------
    def _dispatch(self, job: _Job) -> None:
        """Run the job's items on live workers; raises what made it fail. With lanes open (several renders at
        once), the pool's thread runs it among the other renders' jobs; else this thread, alone."""
        if self._pool is not None:
            self._pool.run(job)
        else:
            self._serve([job])
        if job.error is not None:
            raise job.error

    def _serve(self, jobs: list[_Job], incoming: queue.Queue | None = None) -> None:
        """The dispatch loop: share queued items out to idle workers, gather replies, re-queue lost work.

        Alone (`incoming` None) it runs `jobs` to the end. As the pool's thread it also takes new jobs from
        `incoming` until it finds None there, and shares the workers out among several renders' jobs (`_assign`).
        """
        import ray

        in_flight: dict = {}  # ref -> (worker, job, [item indices])
        pooled, closing = incoming is not None, False
        while True:
            if pooled:
                closing = self._take_jobs(jobs, incoming, idle=not in_flight) or closing
            jobs[:] = [j for j in jobs if not j.done.is_set()]
            if not jobs and (not pooled or closing):
                return
            live = [w for w in self.workers if w.alive]
            first = self._first_lane(jobs) if pooled else 0
            for job, w, idx in _assign(jobs, live, pooled, first, self._backfill_units() if pooled else 1):
                if job.error is not None:  # failed while this round's calls went out
                    continue
                try:
                    ref = job.submit(w, idx)
                except Exception as e:  # making the call's inputs failed (the driver's own work)
                    job.fail(e)
                    continue
                in_flight[ref] = (w, job, idx)
                if w.in_flight == 0:
                    w.progress_at = time.perf_counter()
                w.in_flight += 1
                w.pending_units += len(idx)
                job.in_flight += 1
            self._ping_lost_workers()
            self._expire_hung_calls(in_flight)
            if not live and not in_flight and all(w.dead for w in self.workers):
                for job in jobs:
                    job.fail(ClusterError(
                        f"no live worker left during {job.what}: all {len(self.workers)} workers are gone "
                        f"(restarts exhausted, or not back within {self.worker_timeout_s:g} s)"))
            for ref in self._wait(list(in_flight), timeout=_POOL_POLL_S if pooled else 0.5):
                if ref in self._pings:
                    self._settle_ping(ref)
                    continue
                if ref not in in_flight:  # a call of a worker already given up as hung
                    continue
                w, job, idx = in_flight.pop(ref)
                w.in_flight -= 1
                w.pending_units -= len(idx)
                w.progress_at = time.perf_counter()
                job.in_flight -= 1
                try:
                    outs, busy = ref.result() if isinstance(ref, channel.Call) else ray.get(ref)
                except Exception as e:
                    if not self._requeue(e, w, job, idx):
                        job.fail(_worker_error(e, w, job.what))
                    elif job.error is None:
                        job.queue.extendleft(reversed(idx))
                    job.settle()
                    continue
                w.calls += 1
                w.busy_s += busy
                if job.error is None:  # a failed job's late replies are dropped
                    try:
                        job.receive(idx, outs)
                    except Exception as e:  # the render's own work on its predictions (its sampler step)
                        job.fail(e)
                    self._unit_s.setdefault(job.kind, deque(maxlen=_RECENT_CALLS)).append(busy / max(1, len(idx)))
                    w.patches += sum(job.weights[i] for i in idx)
                job.settle()

    def _backfill_units(self) -> int:
        """Work units a backfill call holds: enough for BACKFILL_CALL_S of UNet time by recent calls (a call's
        own cost, a millisecond or so, stays small beside it), at least one."""
        recent = self._unit_s.get("timestep")
        unit_s = statistics.median(recent) if recent else 0.0
        return max(1, math.ceil(BACKFILL_CALL_S / unit_s)) if unit_s > 0 else 1 << 30

    def _requeue(self, e: Exception, w: WorkerState, job: _Job, idx: list[int]) -> bool:
        """Whether a failed call's units go back to the queue (its worker was lost or restarted), or its job fails."""
        import ray

        if isinstance(e, (ray.exceptions.RayActorError, channel.ChannelClosed)):
            self._lost(w, e, job.what, len(idx))
            return True
        if isinstance(e, ContextMissing) or isinstance(getattr(e, "cause", None), ContextMissing):
            # Ray restarted this worker between two calls: send the contexts, run the units again.
            self._resend_contexts(w)
            self._event(logging.INFO, f"worker {w.index} was restarted by Ray between calls; context re-sent, "
                                      f"{len(idx)} work unit(s) re-queued")
            return True
        return False

    @staticmethod
    def _take_jobs(jobs: list[_Job], incoming: queue.Queue, idle: bool) -> bool:
        """Move new jobs from `incoming` into `jobs` (waiting a little for one when nothing is in flight);
        True once the pool is told to close (None)."""
        closing = False
        try:
            item = incoming.get(timeout=_POOL_POLL_S) if idle and not any(j.queue for j in jobs) else incoming.get_nowait()
            while True:
                if item is None:
                    closing = True
                else:
                    jobs.append(item)
                item = incoming.get_nowait()
        except queue.Empty:
            return closing

    def call_deadline_s(self, kind: str, units: int) -> float:
        """Seconds a worker may go without a reply while `units` work units of `kind` are in its calls."""
        if self.call_timeout_s is not None:
            return self.call_timeout_s
        recent = self._unit_s.get(kind)
        if not recent:  # nothing measured yet: the floor for each unit
            return CALL_TIMEOUT_FLOOR_S * max(1, units)
        return max(CALL_TIMEOUT_FLOOR_S, CALL_TIMEOUT_FACTOR * statistics.median(recent) * max(1, units))

    def _expire_hung_calls(self, in_flight: dict) -> None:
        """A worker with no reply within its deadline is hung (stopped, deadlocked, a stuck GPU): like a lost
        worker, its calls' units go back to their queues, and it is killed through Ray, which restarts it."""
        now = time.perf_counter()
        floor = self.call_timeout_s if self.call_timeout_s is not None else CALL_TIMEOUT_FLOOR_S  # no deadline is shorter
        for w in self.workers:
            if not (w.alive and w.in_flight) or now - w.progress_at <= floor:
                continue
            mine = [ref for ref, (v, _, _) in in_flight.items() if v is w]
            kind = in_flight[mine[0]][1].kind if mine else "timestep"
            if now - w.progress_at <= self.call_deadline_s(kind, w.pending_units):
                continue
            waited, units = now - w.progress_at, w.pending_units
            what = in_flight[mine[0]][1].what if mine else "a call"
            for ref in mine:
                _, job, idx = in_flight.pop(ref)
                if job.error is None:
                    job.queue.extendleft(reversed(idx))
                job.in_flight -= 1
                job.settle()
            w.in_flight, w.pending_units = 0, 0
            message = (f"worker {w.index} (pid {w.info.get('pid')}, node {str(w.info.get('node_id'))[:8]}) sent no reply "
                       f"for {waited:.1f} s during {what} (deadline {self.call_deadline_s(kind, units):.1f} s): "
                       f"treated as lost, {units} work unit(s) re-queued, worker killed for Ray to restart")
            self._lost(w, TimeoutError(message), what, units, quiet=True)
            self._event(logging.WARNING, message)
            self._kill_hung(w)

    def _kill_hung(self, w: WorkerState) -> None:
        import ray

        try:
            ray.kill(w.handle, no_restart=False)  # Ray restarts it (within max_restarts); the ping finds it back
        except Exception as e:
            self._event(logging.WARNING, f"ray.kill of hung worker {w.index} failed: {e}")
        # A worker on this node writes its replies into the shared file: one stopped mid-call must never wake up
        # and write a stale reply over a later step's, and Ray's kill goes through the (hung) process itself.
        pid = w.info.get("pid")
        if w.shared and isinstance(pid, int) and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _wait(self, keys: list, timeout: float = 0.5) -> list:
        """Those of `keys` (Ray refs, channel calls) and of the pings that are done; the first within `timeout`."""
        import ray

        calls = [k for k in keys if isinstance(k, channel.Call)]
        refs = [k for k in keys if not isinstance(k, channel.Call)] + list(self._pings)
        if not calls and not refs:  # waiting for a lost worker's next ping: ray.wait([]) would return at once
            time.sleep(min(timeout, 0.05))
            return []
        if not calls:
            return ray.wait(refs, num_returns=1, timeout=timeout)[0]
        if not refs:
            return channel.wait(calls, timeout=timeout)
        # Both kinds in flight (workers on other nodes too, or a ping): poll both, 2 ms apart at most.
        return channel.wait(calls, timeout=0.002) + ray.wait(refs, num_returns=len(refs), timeout=0)[0]

    def _lost(self, w: WorkerState, err: Exception, what: str, n: int, quiet: bool = False) -> None:
        if not w.alive:  # a second in-flight call of an already lost worker
            self._event(logging.WARNING, f"worker {w.index}: {n} more work unit(s) re-queued")
            return
        w.alive = False
        if w.channel is not None:
            w.channel.close()
        w.losses += 1
        w.lost_at = w.next_ping = time.perf_counter()
        if not quiet:  # quiet: the caller reports it
            self._event(
                logging.WARNING,
                f"worker {w.index} (pid {w.info.get('pid')}, node {str(w.info.get('node_id'))[:8]}) lost during {what}: "
                f"{type(err).__name__}; {n} work unit(s) re-queued"
            )
        if w.losses > self.max_restarts:
            w.dead = True
            self._event(logging.WARNING, f"worker {w.index} is gone for good: it died {w.losses} time(s), max_restarts={self.max_restarts}")

    def _ping_lost_workers(self) -> None:
        """Ask each lost worker whether Ray has restarted it (a call to a restarting actor fails fast, so retry)."""
        now = time.perf_counter()
        for w in self.workers:
            if w.alive or w.dead or w.pinging or now < w.next_ping:
                continue
            if now - w.lost_at > self.worker_timeout_s:
                w.dead = True
                self._event(logging.WARNING, f"worker {w.index} is gone for good: not back within {self.worker_timeout_s:g} s")
                continue
            w.pinging = True
            self._pings[w.handle.info.remote()] = w

    def _settle_ping(self, ref) -> None:
        import ray

        w = self._pings.pop(ref)
        w.pinging = False
        try:
            w.info = ray.get(ref)
            self._resend_contexts(w)
            self._connect_local([w])  # and its shared-memory mapping and channel
        except ray.exceptions.RayActorError:  # not back yet, or gone again
            w.next_ping = time.perf_counter() + 0.5
            return
        w.alive = True
        self._event(logging.INFO, f"worker {w.index} is back (restarted by Ray, pid {w.info['pid']})")

    # ---- reporting ----------------------------------------------------------------------------
    def _event(self, level: int, message: str) -> None:
        """An event of the render: kept for summary() and logged now (WARNING: a loss; INFO: a worker back)."""
        self.stats.events.append(message)
        log.log(level, message)

    def summary(self) -> dict:
        wall = time.perf_counter() - self._render_t0
        s = super().summary()
        s["workers"] = [
            {
                "worker": w.index,
                "node": str(w.info.get("node_id", ""))[:8],
                "pid": w.info.get("pid"),
                "patches": round(w.patches, 1),
                "calls": w.calls,
                "busy_s": round(w.busy_s, 3),
                "idle_s": round(max(0.0, wall - w.busy_s), 3),
                "state": "dead" if w.dead else ("live" if w.alive else "lost"),
                "transport": "shared memory" if w.shared else "object store",
                "calls_via": "socket" if self._direct(w) and not w.channel.closed else "ray",
            }
            for w in self.workers
        ]
        return s


def _worker_error(e: Exception, w: WorkerState, what: str) -> Exception:
    """What the worker's own exception was, in one line (a RayTaskError's text holds the whole remote traceback)."""
    cause = getattr(e, "cause", None)
    if not isinstance(cause, BaseException):
        return e
    err = WorkerError(f"worker {w.index} failed during {what}: {type(cause).__name__}: {' '.join(str(cause).split())[:500]}")
    err.__cause__ = e
    return err


def _assign(jobs: list[_Job], live: list[WorkerState], pooled: bool, first_lane: int = 0,
            backfill: int = 1) -> list[tuple[_Job, WorkerState, list[int]]]:
    """This round's calls, (job, worker, items).

    A lone render's job takes every idle worker (`_shares`). Pooled (several renders at once), one render has
    the workers first (`first_lane`, chosen by the pool's policy): its step takes at most its fair share per
    worker, ceil(its items / live workers), on the idle workers, as a lone render's would. Only when none of
    its items wait do the other renders backfill, a call from each in turn, of `backfill` items (at most a
    fair share), on every worker with fewer than two calls out: a worker runs them back to back, and is free
    again for the first render's next step within about two such calls.
    """
    idle = [w for w in live if w.in_flight == 0]
    calls = []
    if not pooled:
        for job in jobs:
            if job.queue and idle:
                calls += [(job, w, idx) for w, idx in _shares(job.queue, idle, job.ready, job.weights)]
                idle = []
        return calls
    first = [j for j in jobs if j.lane == first_lane]
    for job in first:
        if not (job.queue and idle):
            continue
        cap = -(-job.n // len(live))
        k = min(len(idle), -(-len(job.queue) // cap))
        todo = deque(job.queue.popleft() for _ in range(min(len(job.queue), cap * k)))
        calls += [(job, w, idx) for w, idx in _shares(todo, idle[:k], job.ready, job.weights)]
        idle = idle[k:]
    if any(j.queue for j in first):
        return calls
    out = {id(w): w.in_flight for w in live}
    for _, w, _ in calls:
        out[id(w)] += 1
    slots = deque(sorted((w for w in live if out[id(w)] < 2), key=lambda w: out[id(w)]))  # idle workers first
    others = deque(sorted((j for j in jobs if j.lane != first_lane and j.queue), key=lambda j: j.lane))
    while others and slots:  # a call from each other render in turn: they progress together, none starved
        job = others.popleft()
        take = min(backfill, -(-job.n // len(live)), len(job.queue))
        calls.append((job, slots.popleft(), [job.queue.popleft() for _ in range(take)]))
        if job.queue:
            others.append(job)
    return calls


# A share of at least this many units goes as two calls: the bulk, then its last eighth.
STREAM_SHARE_UNITS = 32
# One of the shares that finish last (the larger ones; all, when equal) with at least this many units sends its last
# unit as a call of its own: the replies of the last wave then hold one unit each (half a patch's guidance, at
# 2048x2048 on 16 workers), not two, and the driver, which takes them up one after another, ends the step sooner.
LAST_TAIL_MIN_UNITS = 2


def _shares(queue: deque, idle: list[WorkerState], ready=None, weights=None) -> list[tuple[WorkerState, list[int]]]:
    """Share the queue out to the idle workers, longest first (`executor.lpt_shares` of `weights[unit]`, the units'
    work; None: equal): equal units give shares that differ by at most one, the larger first, in submission order.

    The step ends when the most loaded share does, and this meets the plan's per-step barrier
    (`PhasePlan.step_barrier`) with the fewest calls. The shares only fix how many units of each
    weight a call holds; which of the units of one weight it gets follows the rules below.

    A long share (few workers) is sent as two calls that the actor runs back to back, the bulk
    and then its last eighth (its lightest units): the driver guides and steps the bulk's reply
    while the worker computes the tail, instead of all of it after the worker's last unit. The
    shares that finish last (the most work, then the most units) send their lightest unit so, from
    2 units up: the step then waits after its last reply for one unit's patches, not for the
    4-5 patches of a whole share (9 units, at 4096x4096 on 16 workers).

    Which units go where: the driver uses the predictions in unit order (the sampler sums its
    windows in window order and fuses the rows above the next window as soon as they are
    final), so the replies that come last should hold the units it uses last. The tails,
    which come last, take the last of the units that are ready to send (`ready(unit)`: no
    deferred patch to make first); the bulks of the shares that finish last, next to come, take
    the ready units just before; the other shares the rest in queue order, deferred ones last.
    """
    items = list(queue)
    queue.clear()
    weight = [0.0 if weights is None else weights[u] for u in items]
    shares = [[weight[i] for i in share] for share in lpt_shares(weight, len(idle))]  # each worker's units' weights
    ends = [(sum(s), len(s)) for s in shares]  # which finishes last: the most work, then the most units
    tails = [len(s) // 8 if len(s) >= STREAM_SHARE_UNITS else int(e == max(ends) and len(s) >= LAST_TAIL_MIN_UNITS)
             for s, e in zip(shares, ends)]
    larger = min(ends) < max(ends)
    bulks = [(w, s[: len(s) - t], larger and e == max(ends)) for w, s, t, e in zip(idle, shares, tails, ends) if s]
    calls = bulks + [(w, s[len(s) - t :], True) for w, s, t in zip(idle, shares, tails) if t]  # (worker, weights, late)
    # The order in which the calls take units: the bulks, then the tails from the last (the first share's tail, which
    # finishes last, takes the very last units). Units of one weight at a time, in queue order.
    order = list(range(len(bulks))) + list(range(len(calls) - 1, len(bulks) - 1, -1))
    units: list[list[int]] = [[] for _ in calls]
    for c in sorted(set(weight), reverse=True):
        todo = [u for u, x in zip(items, weight) if x == c]
        slots = [k for k in order for x in calls[k][1] if x == c]
        late = [k for k in slots if calls[k][2]]
        ready_c = [u for u in todo if ready is None or ready(u)] if late else []
        if late and len(late) <= len(ready_c):  # the late slots take the last ready units
            last = ready_c[len(ready_c) - len(late) :]
            taken = set(last)
            todo = [u for u in todo if u not in taken] + last
            slots = [k for k in slots if not calls[k][2]] + late
        for k, u in zip(slots, todo):
            units[k].append(u)
    return [(w, idx) for (w, _, _), idx in zip(calls, units)]


@dataclass(eq=False)
class _Job:
    """Items for the workers: a timestep's work units, or a render's VAE tiles. `submit(worker, indices)` sends
    a call; `receive(indices, outputs)` takes its reply; `ready(item)`: whether it can go without first making
    its input (see `_shares`); `lane`: the render it belongs to (0: a lone render), the earliest first."""

    n: int
    submit: Callable
    receive: Callable
    weights: list[float]
    what: str
    ready: Callable | None = None
    lane: int = 0
    queue: deque = field(init=False)
    in_flight: int = 0  # its calls out
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.queue = deque(range(self.n))
        self.settle()

    @property
    def kind(self) -> str:  # "timestep", "decode": calls of one kind take alike per unit
        return self.what.split()[0]

    def fail(self, e: BaseException) -> None:
        """The job fails (its first error counts); it is done once its calls out have come back."""
        self.error = self.error or e
        self.queue.clear()
        self.settle()

    def settle(self) -> None:
        if self.in_flight == 0 and not self.queue:
            self.done.set()


class _Pool:
    """The dispatcher thread of several renders at once: lanes hand it jobs, it runs them all in one loop."""

    def __init__(self, ex: RayExecutor):
        self.ex, self.incoming, self.error = ex, queue.Queue(), None
        self.jobs: list[_Job] = []
        self.thread = threading.Thread(target=self._loop, name="apt-dist-pool", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            self.ex._serve(self.jobs, self.incoming)
        except BaseException as e:  # the dispatcher itself failed: no job may wait for it forever
            self.error = e
            for job in self.jobs + self._drain():
                job.fail(e)
                job.done.set()

    def _drain(self) -> list[_Job]:
        out = []
        while not self.incoming.empty():
            item = self.incoming.get_nowait()
            if item is not None:
                out.append(item)
        return out

    def run(self, job: _Job) -> None:
        if self.error is not None or not self.thread.is_alive():
            job.fail(self.error or ClusterError("the worker pool is closed"))
            return
        self.incoming.put(job)
        while not job.done.wait(timeout=1.0):
            if not self.thread.is_alive():  # died after taking it
                job.fail(self.error or ClusterError("the worker pool stopped"))
                job.done.set()

    def close(self) -> None:
        self.incoming.put(None)
        self.thread.join()


class _RayLane(Executor):
    """One render of several on a RayExecutor's workers (`RayExecutor.lane`): its own context and statistics;
    its calls go through the executor's pool."""

    def __init__(self, ex: RayExecutor, key: int):
        super().__init__()
        self.ex, self.key = ex, key

    def start(self, context: RenderContext) -> None:
        super().start(context)
        self.ex._start_lane(self.key, context, self)

    def device_profile(self, gpu_memory: float | None = None):
        return self.ex.device_profile(gpu_memory)

    def _run_units(self, timestep, units, patches, crops, deliver):
        self.ex._run_units(timestep, units, patches, crops, deliver, lane=self.key)

    def _decode(self, tiles, norm_stats):
        return self.ex._decode(tiles, norm_stats, lane=self.key)

    def _norm_stats(self, latent, max_side):
        return self.ex._norm_stats(latent, max_side, lane=self.key)

    def _encode(self, tiles, norm_stats):
        return self.ex._encode(tiles, norm_stats, lane=self.key)

    def _encoder_norm_stats(self, image, max_side):
        return self.ex._encoder_norm_stats(image, max_side, lane=self.key)

    def summary(self) -> dict:
        """This render's counts, and the pool's workers and events so far (shared by every lane)."""
        pool = self.ex.summary()
        return super().summary() | {"workers": pool["workers"], "events": pool["events"]}

    def close(self) -> None:
        self.ex._end_lane(self.key)


def _store(results: list):
    def receive(idx, outs):
        for i, o in zip(idx, outs):
            results[i] = o

    return receive


class _Staging:
    """One timestep's patches, laid out for the workers.

    In the shared buffer: every patch in patch order (a unit's patches are consecutive and of
    one shape, so each unit reads one contiguous block), then every unit's output rows. A
    patch is written just before the first call that needs it, so the first worker starts
    before the other patches are converted. Workers without the buffer get numpy arrays.
    """

    def __init__(self, units: list[WorkUnit], patches, dtype, buf: shared_memory.SharedBuffer | None):
        self.units, self.patches, self.dtype, self.buf = units, patches, np.dtype(dtype), buf
        self.shapes = patch_shapes(patches)  # known before deferred patches are made
        self.torch_dtype = torch.float16 if self.dtype == np.float16 else torch.float32
        self.written = [False] * len(self.shapes)
        self.cuts = getattr(patches, "cuts", None)  # patch i = source(j)[:, rows, cols]: send each source once
        self.source_refs: dict[int, object] = {}
        if buf is None:
            return
        self.in_off, self.out_off, size = _layout(tuple(self.shapes), tuple(units), self.dtype.str)
        buf.ensure(size)

    def message(self, k: int, crops, shared: bool):
        """(inputs, rows re-indexed to the unit's own patches, their crops, where the output goes)."""
        unit = self.units[k]
        uniq = unit.patches
        rows = [(p - uniq[0], b) for p, b in unit.rows]
        unit_crops = [crops[p] for p in uniq]
        shape = (len(uniq),) + self.shapes[uniq[0]]
        if not (shared and self.buf is not None):
            if self.cuts is not None:
                return Cuts(tuple(self.cuts[p] for p in uniq)), rows, unit_crops, None
            x = torch.stack([self.patches[p] for p in uniq]).to(self.torch_dtype).numpy()
            return x, rows, unit_crops, None
        for p in uniq:
            if not self.written[p]:
                dst = self.buf.array(self.in_off[p], self.shapes[p], self.dtype)
                torch.from_numpy(dst).copy_(self.patches[p])
                self.written[p] = True
        path = self.buf.path
        return (path, self.in_off[uniq[0]], shape, self.dtype.str), rows, unit_crops, (path, self.out_off[k])

    def call(self, idx: list[int], crops, shared: bool) -> tuple[list, list]:
        """A call's messages and the Ray objects it passes (its units' sources, each put once per step)."""
        messages, refs, arg = [], [], {}
        for k in idx:
            x, rows, unit_crops, out = self.message(k, crops, shared)
            if isinstance(x, Cuts):  # source index of the step -> position among the call's arguments
                for j, _, _ in x.cuts:
                    if j not in arg:
                        arg[j] = len(refs)
                        refs.append(self.source_ref(j))
                x = Cuts(tuple((arg[j], rows_, cols) for j, rows_, cols in x.cuts))
            messages.append((x, rows, unit_crops, out))
        return messages, refs

    def source_ref(self, j: int):
        """Whole tensor j of the step in the object store, put on first use: every worker's node fetches it once."""
        import ray

        if j not in self.source_refs:
            src = self.patches.source(j).to(self.torch_dtype)
            self.source_refs[j] = ray.put(np.ascontiguousarray(src.numpy()))
        return self.source_refs[j]

    def output(self, k: int) -> torch.Tensor:
        unit = self.units[k]
        shape = (len(unit.rows),) + self.shapes[unit.rows[0][0]]
        return torch.from_numpy(self.buf.array(self.out_off[k], shape, self.dtype))


@functools.lru_cache(maxsize=16)
def _layout(shapes: tuple, units: tuple[WorkUnit, ...], dtype: str) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Byte offsets of each patch and of each unit's output rows in the shared buffer, and the size. Every step of
    a phase has the same shapes and units: laid out once (0.2 ms at 4096x4096, before each step's first call)."""
    in_off, off = [], 0
    for shape in shapes:
        in_off.append(off)
        off += shared_memory.nbytes(shape, dtype)
    out_off = []
    for u in units:
        out_off.append(off)
        off += len(u.rows) * shared_memory.nbytes(shapes[u.rows[0][0]], dtype)
    return tuple(in_off), tuple(out_off), off


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    """Wrap a (read-only, zero-copy) reply without copying; the driver never writes into it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)
