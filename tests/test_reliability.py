"""Reliability end to end on real local Ray actors: a hung worker, and what a killed driver leaves behind."""

import glob
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import torch
from helpers import small_config

from apt_dist import cli, render
from apt_dist.ray_executor import RayExecutor

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

THREADS = torch.get_num_threads()
ROOT = Path(__file__).resolve().parents[1]


def test_a_stopped_worker_is_given_up_after_the_call_timeout_and_the_image_is_unchanged(in_process, caplog):
    """SIGSTOP a worker mid-phase: past --call-timeout its units go to the other worker, it is killed and
    restarted through Ray, the event is logged at once, and the image is bit-identical."""
    timeout = 3.0
    stopped = []

    def stop_at_phase_2_step_3(phase, step, t):
        if (phase, step) == (2, 3) and not stopped:
            stopped.append(ex.workers[0].info["pid"])
            os.kill(stopped[0], signal.SIGSTOP)

    with RayExecutor(num_workers=2, cpus_per_worker=THREADS, call_timeout_s=timeout, max_restarts=1) as ex:
        try:
            t0 = time.monotonic()
            render(small_config(), executor=ex, progress=False)  # starts the workers, and a wall time to compare
            undisturbed = time.monotonic() - t0
            with caplog.at_level(logging.WARNING, logger="apt_dist"):
                t0 = time.monotonic()
                r = render(small_config(), executor=ex, progress=False, callback=stop_at_phase_2_step_3)
                wall = time.monotonic() - t0
            events = ex.summary()["events"]
        finally:
            for pid in stopped:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert stopped
    assert r.image.tobytes() == in_process.image.tobytes()
    assert torch.equal(r.latent, in_process.latent)
    hung = [rec.getMessage() for rec in caplog.records if "sent no reply" in rec.getMessage()]
    assert len(hung) == 1 and f"pid {stopped[0]}" in hung[0] and "re-queued" in hung[0], hung
    assert any("sent no reply" in e for e in events), events
    assert wall < undisturbed + timeout + 30, (wall, undisturbed)  # the margin: a restart on 2 shared cores
    with pytest.raises(ProcessLookupError):  # killed by the driver, not left stopped
        os.kill(stopped[0], 0)


def _files_of(pid: int) -> list[str]:
    return (glob.glob(f"/dev/shm/apt-dist-{pid}-*") + glob.glob(os.path.join(tempfile.gettempdir(), f"apt-dist-{pid}-*")))


def test_the_next_driver_removes_what_a_killed_driver_left(tmp_path, in_process, capsys):
    """SIGKILL a driver mid-render (its workers on this node): its /dev/shm file and socket folder stay behind,
    as would a checkpoint temporary file if the kill hit a write. The next driver removes them."""
    ck, out = tmp_path / "render.ckpt", tmp_path / "poster.png"
    args = ["render", "--prompt", "a red lighthouse on a cliff", "--width", "384", "--height", "288", "--seed", "7",
            "--steps", "6", "--shortcut-steps", "4", "--no-progress", "--checkpoint", str(ck)]
    gcs = ray.get_runtime_context().gcs_address
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen([sys.executable, "-m", "apt_dist", *args, "--out", str(out), "--workers", "1",
                             "--address", gcs, "--cpus-per-worker", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(_files_of(proc.pid)) < 2:  # its shared memory and socket folder
            assert proc.poll() is None, "the driver ended before it could be killed"
            time.sleep(0.05)
        left = _files_of(proc.pid)
        assert len(left) == 2, left
    finally:
        proc.kill()
        proc.wait()
    # A kill during a checkpoint write leaves its temporary file (0 bytes, named with the writer's pid):
    stale_tmp = tmp_path / f".render.ckpt.{proc.pid}-0123456789ab.tmp"
    stale_tmp.write_bytes(b"")
    live_tmp = tmp_path / f".render.ckpt.{os.getppid()}-0123456789ab.tmp"  # a live writer's: kept
    live_tmp.write_bytes(b"")
    assert all(os.path.exists(p) for p in left)

    assert cli.main(args + ["--out", str(out)]) == 0  # the next driver on this node (in-process)
    assert not _files_of(proc.pid)
    assert not stale_tmp.exists() and live_tmp.exists()
    from PIL import Image

    assert Image.open(out).tobytes() == in_process.image.tobytes()
