import os

import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# One intra-op thread in the test process: Ray workers run beside it on 2 cores, and oversubscribed
# torch threads slow everything down many times over. (Bit-identity tests give workers as many.)
torch.set_num_threads(1)
