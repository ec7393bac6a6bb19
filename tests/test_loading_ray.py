"""ModelSource on Ray workers: LoRA and VAE built on every worker (again after a restart); load failures in one line."""

import os
import signal
import threading
import time

import pytest
import torch
from helpers import small_config
from test_loading import make_tiny_lora
from test_ray import SlowWorker

from apt_dist import render
from apt_dist.executor import InProcessExecutor
from apt_dist.models import build_tiny_pipeline
from apt_dist.ray_executor import RayExecutor

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

THREADS = torch.get_num_threads()


def test_a_restarted_worker_loads_the_lora_and_vae_again(tmp_path):
    from diffusers import AutoencoderKL

    from apt_dist.models import _tiny_vae_config

    lora = make_tiny_lora(tmp_path)
    AutoencoderKL(**_tiny_vae_config()).save_pretrained(tmp_path / "vae")
    cfg = small_config(loras=[f"{lora}:0.7"], vae=str(tmp_path / "vae"))
    reference = render(cfg, executor=InProcessExecutor(), progress=False)
    assert reference.image.tobytes() != render(small_config(), progress=False).image.tobytes()
    with RayExecutor(num_workers=1, worker_class=SlowWorker, max_restarts=1, cpus_per_worker=THREADS) as ex:
        killed = []

        def sigkill(phase, step, t):
            if (phase, step) == (2, 3) and not killed:
                killed.append(ex.workers[0].info["pid"])
                threading.Thread(target=lambda: (time.sleep(0.1), os.kill(killed[0], signal.SIGKILL)), daemon=True).start()

        r = render(cfg, executor=ex, progress=False, callback=sigkill)
        summary = ex.summary()
    assert killed and summary["workers"][0]["pid"] != killed[0]  # Ray restarted it; it rebuilt the model
    assert r.image.tobytes() == reference.image.tobytes()


def test_a_worker_that_cannot_load_the_model_stops_the_render_with_its_reason(tmp_path, capsys):
    from apt_dist.cli import main

    folder = tmp_path / "tiny"
    build_tiny_pipeline().save_pretrained(folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    n = int.from_bytes(data[:8], "little")
    data[8 : 8 + n] = data[8 : 8 + n].replace(b'"F32"', b'"F64"', 1)  # complete, but its header lies: found on load
    weights.write_bytes(bytes(data))
    rc = main(["render", "--model", str(folder), "--width", "128", "--height", "128", "--steps", "2", "--no-progress",
               "--workers", "1", "--out", str(tmp_path / "o.png")])
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("apt-dist")]
    assert rc == 1 and len(ours) == 1, ours
    assert "worker 0 could not load the model: cannot load the UNet/VAE of" in ours[0] and "ActorDiedError" not in ours[0]
    assert not (tmp_path / "o.png").exists()
