"""`ray job submit ... -- python -m apt_dist render` against a real `ray start --head` cluster."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """A head node in its own process group (`ray start --block`), so teardown stops only this cluster."""
    # The job's `python` must be this environment's, as it is for a user whose venv is active.
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    port, dash = _free_port(), _free_port()
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=3", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 180
    while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode != 0:
        if time.time() > deadline or proc.poll() is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the Ray head node did not come up; see {log.name}")
        time.sleep(2)
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=3)  # then the process group is killed: the test is over, nothing to save
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_job_submit_renders_on_two_workers(head_node, tmp_path):
    address, env = head_node
    out = tmp_path / "job-poster.png"
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
         "python", "-m", "apt_dist", "render", "--prompt", "a poster from a ray job", "--width", "256", "--height", "192",
         "--steps", "4", "--shortcut-steps", "3", "--workers", "2", "--no-progress", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "succeeded" in log, log
    assert "UNet patch evaluations" in log and "worker" in log
    img = Image.open(out)
    assert img.size == (256, 192)
    assert json.loads(img.text["apt_dist_config"])["prompt"] == "a poster from a ray job"
