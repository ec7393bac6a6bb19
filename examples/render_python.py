"""The Python API in a few lines: render in this process, then the same render on Ray workers.

    python examples/render_python.py

Uses the built-in tiny model (random weights, CPU, seconds). The image depends only on the
config and its seed, never on where the UNet runs or how many workers there are, so the two
renders must be identical.
"""

import torch

from apt_dist import RenderConfig, render
from apt_dist.outputs import write_result
from apt_dist.ray_executor import RayExecutor

# On CPUs, float sums depend on the thread count: give this process as many threads as a Ray
# worker has (cpus_per_worker, 1 by default) so the two renders match bit for bit. GPUs: no need.
torch.set_num_threads(1)

config = RenderConfig(prompt="a red lighthouse on a cliff", width=384, height=288, model="tiny", steps=6, seed=7)

# 1. In this process (the default executor): CPU, or one GPU with device="cuda".
local = render(config, progress=False)
write_result(local, "render_in_process.png")
print(f"in-process: {local.seconds:.1f} s, {len(local.phases)} phases, {local.patch_evals} UNet patch evaluations")

# 2. On two Ray workers. No address: a local Ray instance (or the cluster of a Ray job);
#    address="auto" joins a running cluster, e.g. from a script that `ray submit` runs on the head node.
with RayExecutor(num_workers=2) as executor:
    distributed = render(config, executor=executor, progress=False)
write_result(distributed, "render_ray.png")
print(f"ray, 2 workers: {distributed.seconds:.1f} s (including starting Ray and the workers)")
for w in distributed.executor_summary["workers"]:
    print(f"  worker {w['worker']}: {w['patches']} patches in {w['calls']} calls, busy {w['busy_s']:.2f} s")

assert distributed.image.tobytes() == local.image.tobytes(), "Ray and in-process renders differ"
print("identical images: render_in_process.png == render_ray.png")
