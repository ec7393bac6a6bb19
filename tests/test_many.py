"""Many renders on one pool (apt_dist.many): each image equals its solo render; failures stay alone; batches resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import small_config
from PIL import Image

from apt_dist import render
from apt_dist.many import Job, read_jobs, render_many
from apt_dist.worker import UNetWorker

ROOT = Path(__file__).resolve().parents[1]

# Different sizes (2 and 3 phases, square and not), seeds and prompts.
CONFIGS = [
    dict(width=384, height=288, seed=1),
    dict(width=256, height=256, seed=2, prompt="a cat on a chair", steps=5, shortcut_steps=3),
    dict(width=192, height=256, seed=3, prompt="a tall tower", steps=5, shortcut_steps=3),
]
BROKEN_SIZE = (192, 256)  # (H, W): the render a BrokenForOneWorker fails


class BrokenForOneWorker(UNetWorker):
    """A worker whose model raises for one render (found by its size) and answers the others."""

    def predict_unit(self, timestep, x, rows, crops):
        if tuple(self._ctx["original_size"]) == BROKEN_SIZE:
            raise RuntimeError("simulated model error for this render")
        return super().predict_unit(timestep, x, rows, crops)


def _by_index(results):
    return {r.index: r for r in results}


def test_in_process_pool_equals_solo_renders_and_a_failing_render_fails_alone():
    configs = [small_config(**kw) for kw in CONFIGS[1:]]
    nan = small_config(width=256, height=192, seed=4, steps=5, shortcut_steps=3, guidance_scale=1e38)  # inf, then NaN
    solo = [render(c, progress=False).latent for c in configs]
    results = _by_index(render_many(configs[:1] + [nan] + configs[1:]))
    assert "non-finite latent" in results[1].error and results[1].result is None
    assert results[0].error is None and results[2].error is None
    assert torch.equal(results[0].result.latent, solo[0])
    assert torch.equal(results[2].result.latent, solo[1])


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.usefixtures("ray_local")
def test_three_renders_on_two_ray_workers_equal_their_solo_renders_and_a_model_error_fails_alone():
    from apt_dist.ray_executor import RayExecutor

    configs = [small_config(**kw) for kw in CONFIGS]
    broken = small_config(width=BROKEN_SIZE[1], height=BROKEN_SIZE[0], seed=5)
    with RayExecutor(num_workers=2, cpus_per_worker=1, worker_class=BrokenForOneWorker) as ex:
        solo = [render(c, executor=ex, progress=False).latent for c in configs]
        results = _by_index(render_many(configs[:2] + [broken] + configs[2:], executor=ex))
        assert ex._pool is None  # the pool closed with the batch
        again = render(configs[0], executor=ex, progress=False).latent  # and the executor renders alone again
    assert re.fullmatch(r"worker [01] failed during timestep \d+: RuntimeError: simulated model error for this render",
                        results[2].error), results[2].error
    for i, k in ((0, 0), (1, 1), (3, 2)):
        assert results[i].error is None, results[i].error
        assert torch.equal(results[i].result.latent, solo[k]), f"render {i} differs from its solo render"
    assert torch.equal(again, solo[0])
    workers = results[0].result.executor_summary["workers"]
    assert len(workers) == 2 and all(w["calls"] > 0 for w in workers)  # both workers took units


def _write_jobs(path: Path, lines: list) -> None:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")


SMALL = dict(steps=6, shortcut_steps=4)


def test_bad_lines_are_reported_with_their_line_numbers_and_the_others_render(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    _write_jobs(jobs, [
        dict(prompt="a lighthouse", width=256, height=192, seed=1, out="a.png"),
        "",
        dict(prompt="bad size", width=250),
        "{not json",
        dict(prompt="x", colour="red"),
        dict(prompt="same output", out="a.png"),
        dict(prompt="bad steps", steps=0),
        [1, 2],
        dict(prompt="a dog", width=192, height=192, seed=2, model="sdxl-random", out="d.png"),
    ])
    cmd = [sys.executable, "-m", "apt_dist", "render-many", str(jobs), "--out-dir", str(tmp_path / "out"),
           "--no-progress", "--driver-threads", "1", "--steps", "6", "--shortcut-steps", "4"]
    strict = subprocess.run(cmd + ["--strict"], capture_output=True, text=True, timeout=300)
    assert strict.returncode == 2 and not list((tmp_path / "out").glob("*.png"))
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in run.stderr.splitlines() if "render-many: error" in ln]
    where = [ln.split(": error: ")[1].split(":")[1] for ln in errors]
    assert where == ["3", "4", "5", "6", "7", "8", "9"], run.stderr
    assert "width: must be a positive multiple of 8" in errors[0]
    assert "not JSON" in errors[1] and "unknown key(s) 'colour'" in errors[2] and "also line 1's output" in errors[3]
    assert "steps" in errors[4] and "expected a JSON object" in errors[5]
    assert "model" in errors[6] and "'tiny'" in errors[6]  # the pool holds the first job's model
    assert run.returncode == 1  # some lines were bad; the good one rendered
    assert Image.open(tmp_path / "out" / "a.png").size == (256, 192)


def test_read_jobs_takes_defaults_under_each_line_and_eta_as_text_or_object(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    _write_jobs(jobs, [dict(prompt="a", eta="2:1.5"), dict(prompt="b", eta={"2": 2.5}, steps=8, out="sub.png")])
    ok, problems = read_jobs(str(jobs), str(tmp_path), defaults={"steps": 6, "seed": 9})
    assert problems == []
    assert [j.config.steps for j in ok] == [6, 8] and [j.config.seed for j in ok] == [9, 9]
    assert ok[0].config.eta == {2: 1.5} and ok[1].config.eta == {2: 2.5}
    assert ok[0].out == str(tmp_path / "job-1.png") and ok[1].out == str(tmp_path / "sub.png")
    assert ok[0].key() != ok[1].key()


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.slow
def test_a_killed_driver_resumes_the_batch_bit_identically(tmp_path):
    """Kill the batch after one job is done and another has a checkpoint; the same command finishes it."""
    lines = [dict(prompt="a lighthouse", width=256, height=192, seed=1, out="a.png"),
             dict(prompt="a tall tower", width=192, height=256, seed=2, out="b.png", steps=10, shortcut_steps=6),
             dict(prompt="a cat", width=256, height=256, seed=3, out="c.png", steps=10, shortcut_steps=6)]
    jobs, out, ck = tmp_path / "jobs.jsonl", tmp_path / "out", tmp_path / "ck"
    _write_jobs(jobs, lines)
    cmd = [sys.executable, "-m", "apt_dist", "render-many", str(jobs), "--out-dir", str(out), "--checkpoint-dir", str(ck),
           "--checkpoint-every", "0.01", "--no-progress", "--driver-threads", "1", "--steps", "6", "--shortcut-steps", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if list(ck.glob("*.done.json")) and len(list(ck.glob("*.ckpt"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the batch ended before it could be killed: " + proc.communicate()[1][-500:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name for p in out.glob("*.png")}
    assert 1 <= len(finished) < 3
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-1000:]
    assert sum(ln.startswith("done before") for ln in again.stdout.splitlines()) == len(finished), again.stdout
    # Each image equals the job rendered alone, in one go.
    for line in lines:
        cfg = small_config(**(SMALL | {k: v for k, v in line.items() if k != "out"}))
        solo = render(cfg, progress=False)
        assert np.array_equal(_pixels(out / line["out"]), np.asarray(solo.image.convert("RGB"))), line["out"]


def test_render_many_takes_jobs_and_configs_and_writes_outputs(tmp_path):
    results = list(render_many([Job(small_config(width=256, height=192, **SMALL), out=str(tmp_path / "x.png")),
                                small_config(width=192, height=192, seed=5, **SMALL)], checkpoint_dir=str(tmp_path / "ck")))
    assert sorted(r.index for r in results) == [0, 1] and all(r.error is None for r in results)
    assert Image.open(tmp_path / "x.png").size == (256, 192)
    assert len(list((tmp_path / "ck").glob("*.done.json"))) == 1  # only a job with an output is recorded as done
    again = list(render_many([Job(small_config(width=256, height=192, **SMALL), out=str(tmp_path / "x.png"))],
                             checkpoint_dir=str(tmp_path / "ck")))
    assert again[0].skipped and again[0].result is None
    (tmp_path / "x.png").write_bytes(b"changed")  # an output changed since: rendered again
    third = list(render_many([Job(small_config(width=256, height=192, **SMALL), out=str(tmp_path / "x.png"))],
                             checkpoint_dir=str(tmp_path / "ck")))
    assert not third[0].skipped and third[0].result is not None


def _job(n: int, lane: int):
    from apt_dist.ray_executor import _Job

    return _Job(n, submit=None, receive=None, weights=[1.0] * n, what="timestep 1", lane=lane)


def _per_worker(calls) -> dict:
    """(lane, worker) -> units, over the round's calls (a share may go as two calls: see _shares)."""
    out = {}
    for job, w, idx in calls:
        out[(job.lane, w.index)] = out.get((job.lane, w.index), 0) + len(idx)
    return out


def test_the_earliest_render_takes_its_fair_share_and_later_ones_backfill_one_unit_at_a_time():
    from apt_dist.ray_executor import WorkerState, _assign

    workers = [WorkerState(handle=None, index=i) for i in range(4)]
    first, second = _job(10, lane=1), _job(6, lane=2)
    calls = _assign([second, first], workers, pooled=True, first_lane=1)
    # The earliest render takes every idle worker it can fill with its fair share, ceil(10 / 4) = 3 each; with
    # all of it out, the later one queues one unit behind it on each worker with one call out (a share that goes
    # as two calls, see _shares, takes none).
    shares = _per_worker(calls)
    assert sorted(n for (lane, _), n in shares.items() if lane == 1) == [2, 2, 3, 3]
    calls_out = {w.index: sum(1 for _, v, _ in calls if v is w) for w in workers}
    assert {i for (lane, i) in shares if lane == 2} == {i for i, n in calls_out.items() if n == 2 and (2, i) in shares}
    assert all(n <= 2 for n in calls_out.values()) and all(n == 1 for (lane, _), n in shares.items() if lane == 2)
    # While units of the earliest render wait for a worker, the later one gets none.
    pair = [WorkerState(handle=None, index=i) for i in range(2)]
    pair[1].in_flight = 2
    third = _job(12, lane=1)
    calls = _assign([second, third], pair, pooled=True, first_lane=1)
    assert {job.lane for job, _, _ in calls} == {1} and len(third.queue) == 6  # its fair share, 6, on the idle worker
    # Its step all out, workers 0-2 busy with it, worker 3 idle: the later render backfills one unit a call,
    # the idle worker first, and never more than two calls out on a worker.
    second.queue.clear()
    second.queue.extend(range(6))
    for w in workers[:3]:
        w.in_flight = 1
    workers[2].in_flight = 2
    calls = _assign([first, second], workers, pooled=True, first_lane=1)
    assert [(job.lane, w.index, len(idx)) for job, w, idx in calls] == [(2, 3, 1), (2, 0, 1), (2, 1, 1)]
    assert len(second.queue) == 3


def test_a_later_render_does_not_take_the_earliest_renders_workers_between_its_steps():
    from apt_dist.ray_executor import WorkerState, _assign

    workers = [WorkerState(handle=None, index=i) for i in range(2)]
    later = _job(8, lane=3)  # render 1 is still running (first_lane=1), making its next step: no job of its own
    calls = _assign([later], workers, pooled=True, first_lane=1)
    assert [len(idx) for _, _, idx in calls] == [1, 1]  # one unit a call, not a share of 4
    calls = _assign([later], workers, pooled=True, first_lane=1, backfill=3)  # short units: 3 a call
    assert [len(idx) for _, _, idx in calls] == [3, 3] and len(later.queue) == 0


def test_a_lone_render_takes_every_idle_worker():
    from apt_dist.ray_executor import WorkerState, _assign

    workers = [WorkerState(handle=None, index=i) for i in range(4)]
    workers[3].in_flight = 1
    job = _job(6, lane=0)
    calls = _assign([job], workers, pooled=False)
    assert _per_worker(calls) == {(0, 0): 2, (0, 1): 2, (0, 2): 2} and not job.queue
