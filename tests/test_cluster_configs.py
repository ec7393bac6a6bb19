"""The cluster-launcher configs (cluster/*.yaml) and the cluster example (examples/poster.py).

The configs are checked the way `ray up` checks them, offline: against the JSON schema that
ships in the ray package (ray/autoscaler/ray-schema.json), then through Ray's own
`prepare_config` (fills in the provider's defaults; for `type: local` builds the node type from
head_ip/worker_ips) and `validate_config`. The cloud calls of `ray up` (AMIs, subnets, IAM) need
credentials and are not run.
"""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "cluster" / "aws-gpu.yaml"
ONPREM = ROOT / "cluster" / "onprem.yaml"
POSTER = ROOT / "examples" / "poster.py"
LOCAL = ROOT / "cluster" / "local-ssh.yaml"
CONFIGS = pytest.mark.parametrize("path", [AWS, ONPREM], ids=["aws-gpu", "onprem"])
ALL_CONFIGS = pytest.mark.parametrize("path", [AWS, ONPREM, LOCAL], ids=["aws-gpu", "onprem", "local-ssh"])


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_schema() -> dict:
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def commands(cfg: dict, *keys: str) -> str:
    return "\n".join(c for k in keys for c in cfg.get(k) or [])


# ---- Ray's own validation ---------------------------------------------------------------------


@ALL_CONFIGS
def test_matches_rays_cluster_schema(path):
    schema = ray_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(load(path), schema, cls=jsonschema.Draft7Validator)


@ALL_CONFIGS
def test_passes_rays_prepare_and_validate(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(load(path)))
    validate_config(prepared)  # what `ray up` runs before it contacts any machine
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_the_schema_check_would_catch_a_typo():
    cfg = load(AWS)
    cfg["setup_command"] = cfg.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_command"):
        jsonschema.validate(cfg, ray_schema())


# ---- what matters for apt-dist ----------------------------------------------------------------

GPU_INSTANCE = re.compile(r"^(g\d|p\d)", re.IGNORECASE)  # AWS GPU families: g4dn, g5, g6, p4d, p5, ...


def test_aws_head_is_cpu_only_and_workers_have_gpus():
    cfg = load(AWS)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not GPU_INSTANCE.match(head["node_config"]["InstanceType"])
    assert head["resources"].get("CPU") == 0  # no Ray tasks or actors on the driver's node

    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers
    for t in workers:
        assert t["resources"].get("GPU", 0) >= 1 or GPU_INSTANCE.match(t["node_config"]["InstanceType"])
        assert GPU_INSTANCE.match(t["node_config"]["InstanceType"])
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= cfg["max_workers"]
    # The README's `--workers 16` fits at full scale.
    assert sum(t["max_workers"] * t["resources"]["GPU"] for t in workers) >= 16


def test_onprem_head_takes_no_gpu_workers():
    cfg = load(ONPREM)
    assert cfg["provider"]["type"] == "local"
    assert cfg["provider"]["head_ip"] and cfg["provider"]["worker_ips"]
    assert "available_node_types" not in cfg  # the local provider makes its own single node type
    head = commands(cfg, "head_start_ray_commands")
    assert "--head" in head
    m = re.search(r"--num-gpus[= ](\S+)", head)
    assert m is None or float(m.group(1)) == 0
    assert "--num-gpus" not in commands(cfg, "worker_start_ray_commands")  # workers: Ray detects their GPUs


def test_local_ssh_installs_nothing_and_runs_everything_on_this_machine():
    cfg = load(LOCAL)
    assert cfg["provider"]["head_ip"] == "127.0.0.1" and cfg["provider"]["worker_ips"] == []
    setup = commands(cfg, "setup_commands", "head_setup_commands", "initialization_commands")
    assert not re.search(r"\b(pip|uv|curl|wget|apt-get)\b", setup)  # no download at `ray up` time
    # The head activates the checkout's venv (the README's set-up) through the activate script's copy.
    assert cfg["file_mounts"]["~/.apt-dist-activate"] == ".venv/bin/activate"
    assert "source ~/.apt-dist-activate" in setup and ".bashrc" in setup
    head = commands(cfg, "head_start_ray_commands")
    assert "--dashboard-host=127.0.0.1" in head  # `ray job submit` from this machine only
    assert "RAY_AUTH_MODE=token" in head and "~/.ray/auth_token" in cfg["file_mounts"]
    assert not cfg.get("worker_start_ray_commands")


@CONFIGS
def test_setup_installs_torch_ray_and_the_uploaded_project(path):
    cfg = load(path)
    assert Path(os.path.expanduser(cfg["file_mounts"]["~/apt-dist"])) == Path(".")  # the checkout `ray up` runs from
    setup = cfg["setup_commands"]
    i_torch = next(i for i, c in enumerate(setup) if re.search(r"pip install .*\btorch\b", c))
    i_ray = next(i for i, c in enumerate(setup) if f'"ray[default]=={ray.__version__}"' in c)
    i_project = next(i for i, c in enumerate(setup) if re.search(r"pip install .*-e ~/apt-dist\b", c))
    assert i_torch < i_project and i_ray < i_project
    # Every `ray ...` the launcher runs must find the venv the setup installed into.
    assert any("source ~/venv/bin/activate" in c and ".bashrc" in c for c in setup)
    if path == AWS:
        assert "boto3" in commands(cfg, "head_setup_commands")  # the head's autoscaler launches EC2 nodes


@CONFIGS
def test_token_auth_is_consistent(path):
    cfg = load(path)
    head, worker = commands(cfg, "head_start_ray_commands"), commands(cfg, "worker_start_ray_commands")
    assert ("RAY_AUTH_MODE=token" in head) == ("RAY_AUTH_MODE=token" in worker)  # else workers cannot join
    if "RAY_AUTH_MODE=token" in head:
        assert "~/.ray/auth_token" in cfg["file_mounts"]  # the same token on every node


def test_readme_commands_name_real_files():
    text = (ROOT / "cluster" / "README.md").read_text()
    for ref in re.findall(r"\b((?:cluster|examples)/[\w.-]+\.(?:yaml|py))\b", text):
        assert (ROOT / ref).is_file(), ref


def test_readme_job_command_parses_with_the_cli():
    import shlex

    from apt_dist.cli import build_parser

    text = (ROOT / "cluster" / "README.md").read_text()
    blocks = [b.replace("\\\n", " ") for b in re.findall(r"python -m apt_dist render (.*?)\nray rsync-down", text, re.DOTALL)]
    parsed = [build_parser().parse_args(["render", *shlex.split(b)]) for b in blocks]
    assert len(parsed) == 2  # local-ssh.yaml's and aws-gpu.yaml's
    assert [(ns.workers, ns.view_batch_size, ns.driver_threads) for ns in parsed if ns.workers == 16] == [(16, 4, 4)]


# ---- examples/poster.py -----------------------------------------------------------------------


def _env():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    return env


def test_poster_help():
    r = subprocess.run([sys.executable, str(POSTER), "--help"], capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    for opt in ("--prompt", "--width", "--height", "--workers", "--model", "--out", "--seed", "--gpus-per-worker", "--address"):
        assert opt in r.stdout


@pytest.mark.slow
@pytest.mark.ray
def test_poster_renders_locally(tmp_path):
    out = tmp_path / "poster.png"
    cmd = [sys.executable, str(POSTER), "--address", "local", "--model", "tiny", "--workers", "1",
           "--width", "256", "--height", "192", "--steps", "4", "--prompt", "a tiny lighthouse", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    with Image.open(out) as img:
        assert img.size == (256, 192)
        assert img.info["prompt"] == "a tiny lighthouse"
    assert re.search(r"^\s+0\s+\w+\s+[\d.]+\s+\d+.*\blive$", r.stdout, re.MULTILINE), r.stdout  # the per-worker table


# ---- examples/posters.py and examples/posters.jsonl (render-many) ---------------------------------------------
POSTERS = ROOT / "examples" / "posters.py"


def test_readme_batch_commands_parse_and_the_example_batch_is_valid(tmp_path):
    import shlex

    from apt_dist.cli import build_parser
    from apt_dist.many import read_jobs

    sys.path.insert(0, str(POSTERS.parent))
    from posters import cluster_defaults

    text = (ROOT / "cluster" / "README.md").read_text().replace("\\\n", " ")
    submit = re.search(r"examples/posters\.py -- (.*)", text).group(1)
    job = re.search(r"python -m apt_dist render-many (.*)", text).group(1)
    ns_submit = build_parser().parse_args(cluster_defaults(shlex.split(submit)))
    ns_job = build_parser().parse_args(["render-many", *shlex.split(job)])
    assert (ns_submit.address, ns_submit.gpus_per_worker, ns_submit.workers) == ("auto", 1.0, 16)
    assert ns_job.jobs == "examples/posters.jsonl" and ns_job.workers == 16 and ns_job.checkpoint_dir
    assert cluster_defaults(["j.jsonl", "--address=local"]) == ["render-many", "j.jsonl", "--address=local", "--gpus-per-worker", "1"]
    jobs, problems = read_jobs(str(ROOT / "examples" / "posters.jsonl"), str(tmp_path), {"model": "sdxl-random"})
    assert problems == [] and len(jobs) == 4


@pytest.mark.slow
@pytest.mark.ray
def test_posters_example_renders_a_batch_locally(tmp_path):
    jobs = tmp_path / "small.jsonl"
    jobs.write_text('{"prompt": "a lighthouse", "width": 256, "height": 192, "out": "a.png"}\n'
                    '{"prompt": "a harbour", "width": 192, "height": 192, "seed": 2, "out": "b.png"}\n')
    cmd = [sys.executable, str(POSTERS), str(jobs), "--address", "local", "--gpus-per-worker", "0", "--workers", "2",
           "--model", "tiny", "--steps", "4", "--no-progress", "--out-dir", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert Image.open(tmp_path / "out" / "a.png").size == (256, 192) and Image.open(tmp_path / "out" / "b.png").size == (192, 192)
    assert re.search(r"pool: 2 workers, [\d.]+ s, utilisation \d+%", r.stdout), r.stdout
