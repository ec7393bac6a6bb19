import os
import sys
from pathlib import Path

import pytest
import torch

# The benchmark harness (benchmarks/bench.py: ZeroExecutor, SimulatedWorker) is no part of the package;
# tests import it as the benchmark scripts do, as `bench`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# One intra-op thread in the test process: Ray workers run beside it on 2 cores, and oversubscribed
# torch threads slow everything down many times over. (Bit-identity tests give workers as many.)
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for the module's tests (logical CPUs: the workers' reservations, not cores)."""
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def in_process():
    """small_config() rendered in this process: what every executor must reproduce bit for bit."""
    from helpers import small_config

    from apt_dist import render
    from apt_dist.executor import InProcessExecutor

    return render(small_config(), executor=InProcessExecutor(), progress=False)


@pytest.fixture
def no_models(monkeypatch):
    """Fail loudly if anything tries to build a model, encode a prompt or start a render."""
    from apt_dist import models, sampler

    def boom(*a, **k):
        raise AssertionError("a model was loaded (or a render started) before the input was checked")

    for mod, name in ((models, "Denoiser"), (models, "encode_prompt"), (models, "build_tiny_pipeline"), (sampler, "render")):
        monkeypatch.setattr(mod, name, boom)
