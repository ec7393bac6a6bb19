"""Render a batch of posters on a Ray cluster at once: one pool of GPU workers, one render's barrier gaps run the others'.

`apt-dist render-many` with two defaults for a cluster: join it (`--address auto`) and one GPU per worker.
Every other option is render-many's (`apt-dist render-many --help`); the job file has one JSON object per
line (RenderConfig's fields, plus "out"), e.g. examples/posters.jsonl. On a cluster started with
`ray up cluster/aws-gpu.yaml` (which uploads this checkout to ~/apt-dist on every node):

    ray submit cluster/aws-gpu.yaml examples/posters.py -- ~/apt-dist/examples/posters.jsonl \
        --model stabilityai/stable-diffusion-xl-base-1.0 --workers 16 --out-dir ~/posters --checkpoint-dir ~/posters/ckpt

Run the same command again after the driver died: finished posters are skipped, the others resume. On this
machine, with a local Ray instance and the built-in tiny model (a job file of small images):

    printf '%s\n' '{"prompt": "a lighthouse", "width": 256, "height": 256, "out": "a.png"}' \
        '{"prompt": "a harbour", "width": 384, "height": 256, "seed": 2, "out": "b.png"}' > small.jsonl
    python examples/posters.py small.jsonl --address local --gpus-per-worker 0 --workers 2 --model tiny --out-dir posters
"""

import sys

from apt_dist.cli import main


def cluster_defaults(argv: list[str]) -> list[str]:
    """render-many's arguments with --address auto and --gpus-per-worker 1 unless given."""
    args = list(argv)
    for option, value in (("--address", "auto"), ("--gpus-per-worker", "1")):
        if not any(a == option or a.startswith(option + "=") for a in args):
            args += [option, value]
    return ["render-many", *args]


if __name__ == "__main__":
    sys.exit(main(cluster_defaults(sys.argv[1:])))
