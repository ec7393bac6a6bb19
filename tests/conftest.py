import os
import sys
from pathlib import Path

import torch

# The benchmark harness (benchmarks/bench.py: ZeroExecutor, SimulatedWorker) is no part of the package;
# tests import it as the benchmark scripts do, as `bench`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# One intra-op thread in the test process: Ray workers run beside it on 2 cores, and oversubscribed
# torch threads slow everything down many times over. (Bit-identity tests give workers as many.)
torch.set_num_threads(1)
