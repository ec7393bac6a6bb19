"""Many renders, one pool: several renders share the workers, and one render's step barriers run the others' patches.

One render cannot keep many workers busy: each timestep waits for all of its own work units
(phase 1 has one patch). `render_many` runs several renders at once on one executor. Each
render keeps its own driver state (latents, generator, schedules, checkpoint) in a thread of
its own and reaches the workers through a lane of the executor (`Executor.lane`); the lanes'
work units meet in one queue.

The pool's policy, **earliest submitted first, work-conserving**: a worker that comes free takes
queued units of the earliest-submitted render that has any; one render's step takes at most its
fair share per worker (its units / live workers, rounded up), so the units it cannot start yet
wait for the next worker to come free, and any worker its step leaves idle takes the next
render's units. Earlier renders therefore finish first, and later ones fill their gaps.

Every image is bit-identical to the same config rendered alone: a render's work units are fixed by
its own config (never by the pool), and its driver arithmetic does not depend on the others.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import RenderConfig
from .executor import Executor, InProcessExecutor


@dataclass
class Job:
    """One render of a batch: its config, where its image goes (optional), and a name for messages."""

    config: RenderConfig
    out: str | None = None
    name: str = ""

    def key(self) -> str:
        """What names the job's checkpoint: its config and output, so that a batch file may be reordered."""
        return hashlib.sha256((self.config.to_json() + "\0" + str(self.out or "")).encode()).hexdigest()[:20]


@dataclass
class JobResult:
    """A finished job: `result` (a sampler.RenderResult) or `error` (one line); times from the batch's start."""

    index: int  # position in the batch
    job: Job
    result: object | None = None
    error: str | None = None
    started_s: float = 0.0
    finished_s: float = 0.0
    skipped: bool = False  # finished by an earlier run (its output and done-record found, checked)

    @property
    def seconds(self) -> float:
        return self.finished_s - self.started_s


def render_many(
    jobs: Iterable[Job | RenderConfig],
    executor: Executor | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every_s: float = 60.0,
    restart: bool = False,
    progress: bool = False,
) -> Iterator[JobResult]:
    """Render every job at once on `executor` (default: in-process, one device); yield each as it finishes.

    jobs: RenderConfigs, or Jobs with an `out` path, where the image is written (atomically) as soon as it is
        rendered. Every job uses the executor's one model (same model, LoRAs, VAE and dtype).
    checkpoint_dir: each job's checkpoint is kept there (see `sampler.render`'s `checkpoint`), named by the job's
        config and output. Run again after the driver died, the same batch resumes every unfinished job from its
        checkpoint, bit-identically, and skips the jobs whose image was written (recorded there, checked).
    restart: ignore existing checkpoints and done-records.
    progress: a progress bar per render.

    A job that fails (a non-finite latent, a model error on a worker) yields its error and the others go on.
    """
    from .outputs import write_atomic

    jobs = [j if isinstance(j, Job) else Job(j, name=f"render {i + 1}") for i, j in enumerate(jobs)]
    folder = Path(checkpoint_dir) if checkpoint_dir else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    own = executor is None
    executor = executor or InProcessExecutor()
    results: queue.Queue = queue.Queue()
    t0 = time.perf_counter()

    def run(index: int, job: Job, lane: Executor) -> None:
        from .outputs import write_result
        from .sampler import render

        out = JobResult(index, job, started_s=time.perf_counter() - t0)
        try:
            ckpt = str(folder / f"{job.key()}.ckpt") if folder is not None else None
            out.result = render(job.config, executor=lane, progress=progress, checkpoint=ckpt,
                                checkpoint_every_s=checkpoint_every_s, restart=restart)
            if job.out:
                write_result(out.result, job.out)
                if folder is not None:  # the job is done: a rerun skips it while its image is unchanged
                    record = {"out": str(job.out), "sha256": _sha256(job.out)}
                    write_atomic(folder / f"{job.key()}.done.json", lambda f: f.write(json.dumps(record).encode()))
        except Exception as e:  # this render fails alone
            out.error = " ".join(str(e).split()) or type(e).__name__
            if not isinstance(e, RuntimeError | ValueError):
                out.error = f"{type(e).__name__}: {out.error}"
        finally:
            lane.close()
            out.finished_s = time.perf_counter() - t0
            results.put(out)

    threads = []
    try:
        for i, job in enumerate(jobs):
            if folder is not None and job.out and not restart and _done_before(folder, job):
                now = time.perf_counter() - t0
                results.put(JobResult(i, job, skipped=True, started_s=now, finished_s=now))
                continue
            threads.append(threading.Thread(target=run, args=(i, job, executor.lane(i + 1)), name=f"apt-dist-render-{i + 1}",
                                            daemon=True))
            threads[-1].start()
        for _ in range(len(jobs)):
            yield results.get()
    finally:
        for t in threads:
            t.join()
        executor.end_lanes()
        if own:
            executor.close()


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _done_before(folder: Path, job: Job) -> bool:
    """Whether an earlier run wrote this job's image, and the image is still the one it wrote."""
    record = folder / f"{job.key()}.done.json"
    try:
        d = json.loads(record.read_text())
        return d.get("out") == str(job.out) and Path(job.out).is_file() and d.get("sha256") == _sha256(job.out)
    except (OSError, ValueError, AttributeError):
        return False
