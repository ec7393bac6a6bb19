"""The Ray executor on real local actors (CPU): same image as in-process, worker loss, placement."""

import logging
import os
import signal
import threading
import time

import numpy as np
import pytest
import ray
import torch
from bench import SimulatedWorker, simulated_executor
from helpers import small_config

from apt_dist import render
from apt_dist.devices import CPU_VIEWS
from apt_dist.executor import InProcessExecutor
from apt_dist.ray_executor import ClusterError, RayExecutor
from apt_dist.worker import UNetWorker

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_local")]

# CPU reductions depend on the intra-op thread count: workers get as many threads as this process has.
THREADS = torch.get_num_threads()


class SlowWorker(UNetWorker):
    """The real UNet, each call kept in flight 0.15 s longer: time for a test to kill its worker mid-call.

    Defined in this test module, which Ray's workers cannot import: RayExecutor sends the class by value.
    """

    def predict(self, timestep, units, *sources, context=0):
        out = super().predict(timestep, units, *sources, context=context)
        time.sleep(0.15)
        return out

    def finds_module(self, name: str) -> bool:
        import importlib.util

        return importlib.util.find_spec(name) is not None


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_bit_identical_to_in_process(workers, in_process):
    """At the defaults: auto units, sized for CPU workers whatever their number."""
    with RayExecutor(num_workers=workers, cpus_per_worker=THREADS) as ex:
        r = render(small_config(), executor=ex, progress=False)
        summary = ex.summary()
    assert r.plan.units.auto and r.plan.units.device.kind == "cpu"
    assert (r.plan.units.view_batch_size, r.plan.units.split_guidance) == (CPU_VIEWS, False)
    assert r.plan.unet_calls == in_process.plan.unet_calls == summary["unet_calls"]
    assert torch.equal(r.latent, in_process.latent)
    assert r.image.tobytes() == in_process.image.tobytes()
    served = [w["patches"] for w in summary["workers"]]
    assert sum(served) == pytest.approx(r.plan.unet_patch_evals)
    if workers > 1:
        assert sum(s > 0 for s in served) >= 2  # the work was really spread
    assert {w["transport"] for w in summary["workers"]} == {"shared memory"}  # all on the driver's node
    assert {w["calls_via"] for w in summary["workers"]} == {"socket"}
    assert not summary["events"]  # undisturbed: no loss, and no call that ran before its worker had the context


@pytest.mark.slow
def test_shared_memory_with_ray_calls_is_bit_identical_too(in_process):
    """direct_calls=False: the patches still go through /dev/shm, but every call is a Ray call."""
    with RayExecutor(num_workers=2, cpus_per_worker=THREADS, direct_calls=False) as ex:
        r = render(small_config(), executor=ex, progress=False)
        summary = ex.summary()
    assert r.image.tobytes() == in_process.image.tobytes()
    assert {(w["transport"], w["calls_via"]) for w in summary["workers"]} == {("shared memory", "ray")}


@pytest.mark.slow
def test_a_worker_that_cannot_serve_a_socket_is_called_through_ray(tmp_path, in_process):
    """An AF_UNIX path over the kernel's limit (a long TMPDIR): that worker's calls go through Ray, same image."""
    long_dir = tmp_path / ("d" * 120)
    long_dir.mkdir()
    with RayExecutor(num_workers=1, cpus_per_worker=THREADS) as ex:
        ex._channel_dir = str(long_dir)
        r = render(small_config(), executor=ex, progress=False)
        summary = ex.summary()
    assert r.image.tobytes() == in_process.image.tobytes()
    assert summary["workers"][0]["calls_via"] == "ray" and summary["workers"][0]["transport"] == "shared memory"
    assert any("no direct channel" in e for e in summary["events"]), summary["events"]


@pytest.mark.slow
def test_object_store_transport_is_bit_identical_too(in_process):
    """shared_memory=False: patches and predictions travel as Ray objects, as to workers on other nodes."""
    with RayExecutor(num_workers=2, cpus_per_worker=THREADS, shared_memory=False) as ex:
        r = render(small_config(), executor=ex, progress=False)
        summary = ex.summary()
    assert r.image.tobytes() == in_process.image.tobytes()
    assert {w["transport"] for w in summary["workers"]} == {"object store"}
    assert {w["calls_via"] for w in summary["workers"]} == {"ray"}


@pytest.mark.slow
def test_a_full_dev_shm_falls_back_to_the_object_store(in_process):
    """If the shared-memory file cannot grow (ENOSPC), the render goes on through Ray objects, same image."""
    with RayExecutor(num_workers=2, cpus_per_worker=THREADS) as ex:

        def fill_dev_shm(phase, step, t):
            def no_space(nbytes):
                raise OSError(28, "No space left on device")

            if (phase, step) == (1, 2):
                ex._buf.ensure = no_space

        r = render(small_config(), executor=ex, progress=False, callback=fill_dev_shm)
        summary = ex.summary()
    assert r.image.tobytes() == in_process.image.tobytes()
    assert any("shared memory failed" in e and "No space" in e for e in summary["events"]), summary["events"]
    assert {w["transport"] for w in summary["workers"]} == {"object store"}
    assert {w["calls_via"] for w in summary["workers"]} == {"ray"}


def test_shared_memory_file_is_removed_on_close():
    with RayExecutor(num_workers=1, cpus_per_worker=THREADS) as ex:
        render(small_config(steps=2, shortcut_steps=1), executor=ex, progress=False)
        path = ex._buf.path
        assert os.path.exists(path)
    assert not os.path.exists(path)


def _kill_later(action, delay=0.1):
    def cb(phase, step, t):
        if (phase, step) == (2, 3) and not cb.done:
            cb.done = True
            threading.Thread(target=lambda: (time.sleep(delay), action()), daemon=True).start()

    cb.done = False
    return cb


def test_ray_kill_of_a_worker_mid_phase(in_process, caplog):
    caplog.set_level(logging.INFO, logger="apt_dist")
    with RayExecutor(num_workers=2, worker_class=SlowWorker, cpus_per_worker=THREADS) as ex:
        r = render(small_config(), executor=ex, progress=False, callback=_kill_later(lambda: ray.kill(ex.workers[0].handle)))
        events = ex.summary()["events"]
    assert r.image.tobytes() == in_process.image.tobytes()
    lost = [e for e in events if "lost during timestep" in e]
    assert lost and "re-queued" in lost[0], events
    # ...and logged as it happened, a warning, each event once
    logged = [(rec.levelno, rec.getMessage()) for rec in caplog.records if rec.name.startswith("apt_dist")]
    assert (logging.WARNING, lost[0]) in logged
    assert sorted(m for _, m in logged) == sorted(events)


def test_sigkill_of_the_only_worker_restarts_it_and_reruns_its_batch(in_process, caplog):
    caplog.set_level(logging.INFO, logger="apt_dist")
    with RayExecutor(num_workers=1, worker_class=SlowWorker, max_restarts=1, cpus_per_worker=THREADS) as ex:
        killed = []

        def sigkill():
            killed.append(ex.workers[0].info["pid"])
            os.kill(killed[0], signal.SIGKILL)

        r = render(small_config(), executor=ex, progress=False, callback=_kill_later(sigkill))
        summary = ex.summary()
    assert r.image.tobytes() == in_process.image.tobytes()
    assert any("lost during timestep" in e for e in summary["events"]), summary
    assert any("is back" in e for e in summary["events"]), summary
    assert killed and summary["workers"][0]["pid"] != killed[0]
    logged = [(rec.levelname, rec.getMessage()) for rec in caplog.records if rec.name.startswith("apt_dist")]
    assert any(level == "WARNING" and "lost during timestep" in m for level, m in logged), logged
    assert any(level == "INFO" and "is back" in m for level, m in logged), logged


@pytest.mark.parametrize("direct_calls", [True, False])
def test_a_worker_restarted_between_two_calls_gets_the_context_again(direct_calls, in_process):
    """SIGKILL while idle: Ray restarts the actor before the next call.

    Over a channel the next call finds the socket closed: the worker counts as lost, is found
    back, and gets the context, the shared memory and a new channel. Through Ray the call
    reaches the new process, which has no context: the driver re-sends it.
    """
    with RayExecutor(num_workers=1, max_restarts=1, cpus_per_worker=THREADS, direct_calls=direct_calls) as ex:

        def kill_and_wait_for_restart(phase, step, t):
            if (phase, step) != (2, 3):
                return
            pid = ex.workers[0].info["pid"]
            os.kill(pid, signal.SIGKILL)
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    if ray.get(ex.workers[0].handle.info.remote(), timeout=5)["pid"] != pid:
                        return
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass
                time.sleep(0.2)
            raise AssertionError("Ray did not restart the worker")

        r = render(small_config(), executor=ex, progress=False, callback=kill_and_wait_for_restart)
        summary = ex.summary()
    events = summary["events"]
    assert r.image.tobytes() == in_process.image.tobytes()
    if direct_calls:
        assert any("lost during timestep" in e and "ChannelClosed" in e for e in events), events
        assert any("is back" in e for e in events), events
        assert summary["workers"][0]["calls_via"] == "socket"  # the restarted worker got a new channel
        assert summary["workers"][0]["transport"] == "shared memory"
        assert not any("context re-sent" in e for e in events), events
    else:
        assert any("restarted by Ray between calls; context re-sent" in e for e in events), events


def test_no_worker_left_stops_with_a_clear_error():
    with RayExecutor(num_workers=1, worker_class=SlowWorker, max_restarts=0, worker_timeout_s=10) as ex:
        with pytest.raises(ClusterError, match="no live worker left"):
            render(small_config(), executor=ex, progress=False, callback=_kill_later(lambda: ray.kill(ex.workers[0].handle)))


def test_placement_failure_says_what_was_asked_and_what_the_cluster_has():
    calls = []

    class Spy(RayExecutor):
        def _run_units(self, *a):
            calls.append(a)
            return super()._run_units(*a)

    ex = Spy(num_workers=2, gpus_per_worker=1, placement_timeout_s=2)
    with pytest.raises(ClusterError, match=r"could not reserve 2 workers.*GPU.*cluster has CPU=8"):
        render(small_config(), executor=ex, progress=False)
    ex.close()
    assert not calls  # no work was done


def test_a_worker_class_from_a_module_the_workers_cannot_import_runs_there():
    """The seam for stand-in workers: a UNetWorker subclass defined in a test (or a benchmark script)."""
    with RayExecutor(num_workers=1, worker_class=SlowWorker, cpus_per_worker=THREADS) as ex:
        r = render(small_config(width=256, height=192, steps=2, shortcut_steps=1), executor=ex, progress=False)
        worker = ex.workers[0].handle
        assert ray.get(worker.finds_module.remote("apt_dist"))
        assert not ray.get(worker.finds_module.remote(__name__))  # so the class travelled by value
    assert r.image.size == (256, 192)


def test_worker_class_must_be_a_unet_worker():
    with pytest.raises(TypeError, match="worker_class"):
        RayExecutor(worker_class=object)


def test_simulated_workers_render_the_plan():
    """Simulated workers (sleep + zeros) still make the driver run every step; counts match the plan."""
    cfg = small_config(model="sdxl-random", width=2048, height=2048, steps=4, shortcut_steps=2)
    with simulated_executor(2, 0.0) as ex:
        r = render(cfg, executor=ex, progress=False)
        served = sum(w["patches"] for w in ex.summary()["workers"])
    assert r.patch_evals == r.plan.unet_patch_evals == 4 + 2 * 13
    assert served == pytest.approx(r.patch_evals)


def test_the_driver_blurs_the_dilated_views_while_the_first_calls_run(monkeypatch):
    """The dilated views' inputs (the blur) are made once per step, with the local windows' calls already out."""
    import apt_dist.fusion

    made = []
    source = apt_dist.fusion.DilatedViews.source

    def spy_source(self):
        if self._source is None:  # the blur runs now
            made.append(sum(w.in_flight > 0 for w in ex.workers))  # workers with calls out
        return source(self)

    monkeypatch.setattr(apt_dist.fusion.DilatedViews, "source", spy_source)
    # One patch a call, halves apart: a step of many units (auto units on CPU put a step in two calls).
    cfg = small_config(model="sdxl-random", width=2048, height=2048, steps=4, shortcut_steps=2, view_batch_size=1,
                       split_guidance=True)
    with RayExecutor(num_workers=2, worker_class=SimulatedWorker, gpus_per_worker=0) as ex:
        render(cfg, executor=ex, progress=False)
    # One per upscaling step, with the first worker's window call already out: the second worker's share holds
    # the dilated views, so its call waits for the blur.
    assert made == [1, 1]


@pytest.mark.slow
def test_float16_model_travels_in_float16_and_stays_bit_identical():
    """A float16 UNet's inputs and outputs are float16 values: sending them as float16 changes nothing."""
    cfg = small_config(dtype="float16", width=256, height=192)
    expected = render(cfg, executor=InProcessExecutor(), progress=False)
    with RayExecutor(num_workers=2, cpus_per_worker=THREADS) as ex:
        r = render(cfg, executor=ex, progress=False)
        assert ex._wire_dtype == np.float16
    assert torch.equal(r.latent, expected.latent)


@pytest.mark.slow
def test_upscale_of_a_picture_on_two_workers_is_bit_identical_to_in_process(tmp_path):
    """The picture's encode tiles and the upscaling phases run on the workers: same bits as in-process."""
    from PIL import Image

    y, x = np.mgrid[0:96, 0:128]
    rgb = np.stack([128 + 100 * np.sin(x / 13), 128 + 100 * np.cos(y / 9), 60 + 0 * x], -1).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "in.png")
    cfg = small_config(width=256, height=192, init_image=str(tmp_path / "in.png"), init_strength=0.0,
                       decode_tile=8, decode_overlap=2)
    here = render(cfg, executor=InProcessExecutor(), progress=False)
    with RayExecutor(num_workers=2, cpus_per_worker=THREADS) as ex:
        r = render(cfg, executor=ex, progress=False)
        encoded_tiles = ex.stats.encode_tiles
    assert encoded_tiles == 6  # 3 x 2 tiles of 8 latents over 16 x 12
    assert torch.equal(r.phase_latents[0], here.phase_latents[0])  # the encoded picture
    assert torch.equal(r.latent, here.latent)
    assert r.image.tobytes() == here.image.tobytes()


def test_a_step_puts_each_whole_latent_once_and_calls_carry_only_cuts(monkeypatch):
    """Every Ray call of a step passes the same object per source (one ray.put each); the worker's cuts of it are
    exactly the patches, converted to the wire dtype."""
    from apt_dist import schedules as S
    from apt_dist.executor import DeferredPatches, make_units
    from apt_dist.fusion import DilatedViews, LocalViews
    from apt_dist.geometry import local_windows
    from apt_dist.ray_executor import _Staging
    from apt_dist.worker import Cuts

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 24, 20, generator=g)
    sched = S.make_schedule("euler", 10)
    sets = [LocalViews(x, local_windows(24, 20, 16, 8, generator=g), 2, sched, 4, 8), DilatedViews(x, 2, 1.0, sched, 4)]
    patches = DeferredPatches(sets[0].inputs(), [sh for sh in sets[1].shapes], lambda: sets[1].inputs(),
                              sources=[vs.source for vs in sets],
                              cuts=[(j, ys, xs) for j, vs in enumerate(sets) for ys, xs in vs.cuts])
    units = make_units(patches.shapes, 2, False)
    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value: puts.append(value.shape) or real_put(value))
    staging = _Staging(units, patches, np.float16, None)
    crops = [(0, 0)] * len(patches)
    worker = UNetWorker.__new__(UNetWorker)  # only its _array: no model
    calls = [staging.call([k], crops, shared=False) for k in range(len(units))]
    assert puts == [(4, 28, 24), (4, 24, 20)]  # the padded scaled latent, the blurred one: once each
    for k, (messages, refs) in enumerate(calls):
        (x_ref, _, _, out), = messages
        assert isinstance(x_ref, Cuts) and out is None
        got = worker._array(x_ref, tuple(ray.get(refs)))
        want = torch.stack([patches[p] for p in units[k].patches]).to(torch.float16).numpy()
        assert got.dtype == np.float16 and np.array_equal(got, want)
    assert all(r in staging.source_refs.values() for _, refs in calls for r in refs)
