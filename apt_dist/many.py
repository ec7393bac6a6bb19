"""Many renders, one pool: several renders share the workers, and one render's step barriers run the others' patches.

One render cannot keep many workers busy: each timestep waits for all of its own work units
(phase 1 has one patch). `render_many` runs several renders at once on one executor. Each
render keeps its own driver state (latents, generator, schedules, checkpoint) in a thread of
its own and reaches the workers through a lane of the executor (`Executor.lane`); the lanes'
work units meet in one queue.

The pool's policy: **one render first, the others backfill in turn**. One render has the workers
first, each of its steps shared out as a lone render's is (at most its units / live workers per
worker); whenever none of its units wait, the other renders fill the workers, a short call from
each in turn (`ray_executor._assign`), so none is starved and no worker waits while any render has
work. Which render is first (`POLICIES`): by default the one with the most UNet work left
("longest": the renders end close together, so no render is left alone at the end with its own
step barriers), or the earliest submitted ("earliest": renders end in submission order).

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

# Which render has the workers first; the others backfill (ray_executor._assign).
POLICIES = {
    "longest": "the render with the most UNet work left: renders end close together, the pool stays busy to the end",
    "earliest": "the earliest submitted still running: renders end in submission order, the first ones sooner",
}


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
    policy: str = "longest",
) -> Iterator[JobResult]:
    """Render every job at once on `executor` (default: in-process, one device); yield each as it finishes.

    jobs: RenderConfigs, or Jobs with an `out` path, where the image is written (atomically) as soon as it is
        rendered. Every job uses the executor's one model (same model, LoRAs, VAE and dtype).
    checkpoint_dir: each job's checkpoint is kept there (see `sampler.render`'s `checkpoint`), named by the job's
        config and output. Run again after the driver died, the same batch resumes every unfinished job from its
        checkpoint, bit-identically, and skips the jobs whose image was written (recorded there, checked).
    restart: ignore existing checkpoints and done-records.
    progress: a progress bar per render.
    policy: which render has the workers first, "longest" or "earliest" (`POLICIES`; in-process: earliest).

    A job that fails (a non-finite latent, a model error on a worker) yields its error and the others go on.
    """
    from .outputs import write_atomic

    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
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
        todo = []
        for i, job in enumerate(jobs):
            if folder is not None and job.out and not restart and _done_before(folder, job):
                now = time.perf_counter() - t0
                results.put(JobResult(i, job, skipped=True, started_s=now, finished_s=now))
            else:
                todo.append(i)
        if todo:
            from .loading import prepare

            first = jobs[todo[0]].config
            spec, _, encode, _ = prepare(first)
            # From this thread, before any render's: diffusers and transformers import their classes lazily, which
            # is not safe from several threads at once; Ray's start wants the main thread.
            encode(first.prompt, first.negative_prompt, first.seed)
            executor.open_lanes(spec, policy)
        for i in todo:
            threads.append(threading.Thread(target=run, args=(i, jobs[i], executor.lane(i + 1)), daemon=True,
                                            name=f"apt-dist-render-{i + 1}"))
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


# ---- a batch file: one JSON object per line ------------------------------------------------------------------
OPTION_KEYS = {"--guidance": "guidance_scale", "--lora": "loras"}


def read_jobs(path: str, out_dir: str, defaults: dict | None = None) -> tuple[list[Job], list[str]]:
    """The valid jobs of a JSON-lines batch file, and one message per bad line ("FILE:LINE: what is wrong").

    Each line holds RenderConfig's fields (JSON names, e.g. "guidance_scale", "eta": {"2": 2.0} or "2:2.0,3:3.0")
    over `defaults`, plus "out": the image's path under `out_dir` (default: job-LINE.png). Every job is checked
    as `apt-dist render` checks its options (the model's files and configs too, loading no weights), and must
    use the same model as the first valid job: the pool's workers hold one. Blank lines are skipped.
    """
    import dataclasses

    from .config import ConfigError, parse_eta
    from .loading import ModelLoadError, prepare
    from .outputs import check_output_path
    from .planning import build_plan

    fields = {f.name for f in dataclasses.fields(RenderConfig)}
    jobs, problems, outs, spec0 = [], [], {}, None
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("JOBS", f"cannot read {path!r}: {getattr(e, 'strerror', None) or e}") from None
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{path}:{n}"
        try:
            item = json.loads(text)
            if not isinstance(item, dict):
                raise ValueError(f"expected a JSON object, got {type(item).__name__}")
            unknown = sorted(set(item) - fields - {"out"})
            if unknown:
                raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))} (allowed: RenderConfig's fields and out)")
            kw = dict(defaults or {}) | {k: v for k, v in item.items() if k != "out"}
            if isinstance(kw.get("eta"), str):
                kw["eta"] = parse_eta(kw["eta"])
            elif isinstance(kw.get("eta"), dict):
                kw["eta"] = {int(k): float(v) for k, v in kw["eta"].items()}
            out = item.get("out", f"job-{n}.png")
            if not isinstance(out, str):
                raise ValueError(f"out: expected a file name, got {out!r}")
            out = str(Path(out_dir) / out)
            problem = check_output_path(out)
            if problem:
                raise ValueError(f"out: {problem}")
            if out in outs:
                raise ValueError(f"out: {out!r} is also line {outs[out]}'s output")
            config = RenderConfig(**kw).validate()
            spec, info, _, _ = prepare(config)  # the model's files and configs, loading no weights
            build_plan(config, info.native_window, info.vae_scale, info.scheduler, info.latent_channels)
            if spec0 is not None and spec != spec0:
                raise ValueError(f"model: the jobs share one pool of workers, which holds the first job's model "
                                 f"({spec0.name!r}, with its LoRAs, VAE and dtype); this job asks for another ({spec.name!r})")
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not JSON ({e.msg} at column {e.colno})")
            continue
        except ConfigError as e:  # named by its JSON key rather than its option
            key = OPTION_KEYS.get(e.option, e.option.lstrip("-").replace("-", "_"))
            problems.append(f"{where}: {key}: {' '.join(str(e)[len(e.option) + 2:].split())}")
            continue
        except (ModelLoadError, ValueError, TypeError) as e:
            problems.append(f"{where}: {' '.join(str(e).split())}")
            continue
        spec0 = spec0 or spec
        outs[out] = n
        jobs.append(Job(config, out=out, name=where))
    return jobs, problems
