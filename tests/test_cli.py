"""The command line: end to end, the plan, and every bad-input case (exit 2, one line, nothing loaded)."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from apt_dist import cli

BAD = [
    (["--width", "100"], "--width"),
    (["--height", "0"], "--height"),
    (["--width", "-64"], "--width"),
    (["--steps", "0"], "--steps"),
    (["--steps", "20", "--shortcut-steps", "30"], "--shortcut-steps"),
    (["--shortcut", "0"], "--shortcut"),
    (["--shortcut", "1.5"], "--shortcut"),
    (["--eta", "2:0"], "--eta"),
    (["--eta", "-1"], "--eta"),
    (["--eta", "two"], "--eta"),
    (["--guidance", "-1"], "--guidance"),
    (["--guidance", "nan"], "--guidance"),
    (["--method", "magic"], "--method"),
    (["--scheduler", "plms"], "--scheduler"),
    (["--model", "./no/such/folder"], "--model"),
    (["--model", "missing.safetensors"], "--model"),
    (["--dtype", "float8"], "--dtype"),
    (["--width", "abc"], "--width"),
    (["--out", "/no/such/dir/x.png"], "--out"),
    (["--out", "/tmp"], "--out"),
    (["--out", "picture.jpg"], "--out"),
    (["--stride", "99"], "--stride"),
    (["--checkpoint", "/no/such/dir/c.ckpt"], "--checkpoint"),
    (["--driver-threads", "0"], "--driver-threads"),
    (["--address", "nohost"], "--address"),
    (["--address", "127.0.0.1:1", "--workers", "2"], "--address"),  # nothing listens: an error in seconds, not Ray's minutes
    # Bounds (issue 16): each before any work.
    (["--steps", "1000"], "--steps"),
    (["--steps", "1001"], "--steps"),
    (["--steps", "1000000000"], "--steps"),
    (["--width", "1000000"], "--width"),
    (["--width", "1000000", "--height", "1000000"], "--width"),
    (["--width", "2048", "--height", "8"], "--height"),
    (["--width", "4096", "--height", "4096", "--stride", "1"], "--stride"),
    (["--seed", "18446744073709551616"], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--device", "quantum"], "--device"),
    (["--device", "cuda:99"], "--device"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--workers", "1", "--call-timeout", "0"], "--call-timeout"),
    (["--workers", "1", "--worker-return-timeout", "-5"], "--worker-return-timeout"),
]
if not __import__("torch").cuda.is_available():
    BAD.append((["--device", "cuda"], "--device"))


@pytest.mark.parametrize("args,option", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line_naming_the_option(args, option, capsys, no_models, tmp_path):
    argv = ["render", "--prompt", "x"] + args
    if "--out" not in args:
        argv += ["--out", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit) as e:
        sys.exit(cli.main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert option in err and "error" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_latent_that_does_not_fit_the_drivers_memory_is_refused_naming_the_limit(capsys, no_models, tmp_path, monkeypatch):
    from apt_dist import planning as plan

    monkeypatch.setattr(plan, "driver_memory_bytes", lambda: 2**27)
    # The tiny model, 16 float32 copies of the latent: 2048x2048 (4x256x256) 16 MiB fits in 128 MiB; 8192x8192, 256 MiB.
    assert cli.main(["plan", "--width", "2048", "--height", "2048"]) == 0
    capsys.readouterr()
    assert cli.main(["render", "--width", "8192", "--height", "8192", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--width" in err and "0.2 GiB of driver memory" in err and "has 0.1 GiB" in err, err
    assert not list(tmp_path.iterdir())


def test_plan_of_an_absurd_size_is_refused_at_once():
    t0 = __import__("time").monotonic()
    assert cli.main(["plan", "--width", "1000000", "--height", "1000000"]) == 2
    assert __import__("time").monotonic() - t0 < 5


def test_plan_json_counts_at_4096():
    def plan_json(*extra):
        out = subprocess.run([sys.executable, "-m", "apt_dist", "plan", "--model", "sdxl-random", "--width", "4096",
                              "--height", "4096", "--json", *extra], capture_output=True, text=True, check=True).stdout
        return json.loads(out)

    assert plan_json()["unet_patch_evals"] == 3410
    assert plan_json("--method", "demofusion")["unet_patch_evals"] == 5650


def test_plan_table(capsys):
    assert cli.main(["plan", "--model", "sdxl-random", "--width", "2048", "--height", "2048", "--workers", "8"]) == 0
    out = capsys.readouterr().out
    assert "UNet patch evaluations (per guidance branch): 440" in out  # 50 + 30 * 13
    assert "on 8 workers" in out


def test_plan_shows_the_shortcut_fraction_and_its_steps(capsys):
    assert cli.main(["plan", "--width", "384", "--height", "384", "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "upscaling phases: 6 of 10 steps, from step 4 (--shortcut 0.6)" in out
    assert "scheduler euler, 10 steps, on the model's table (EulerDiscreteScheduler config: epsilon, leading spacing" in out
    assert cli.main(["plan", "--width", "384", "--height", "384", "--steps", "10", "--shortcut-steps", "3", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["shortcut"] is None and d["upscale_steps"] == 3 and [p["start_step"] for p in d["phases"]] == [0, 7, 7]
    assert cli.main(["plan", "--width", "384", "--height", "384", "--steps", "10", "--shortcut", "0.3", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["shortcut"] == 0.3 and d["upscale_steps"] == 3


def test_plan_names_the_model_geometry_it_used(capsys):
    assert cli.main(["plan", "--model", "sdxl-random", "--width", "2048", "--height", "1024"]) == 0
    out, err = capsys.readouterr()
    assert "model sdxl-random: native window 128 latents = 1024 px" in out.splitlines()[0]
    assert not err
    assert cli.main(["plan", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["model"], doc["native_window"], doc["vae_scale"]) == ("tiny", 16, 8)


def test_plan_warns_when_the_tiny_model_makes_a_large_size_many_phases(capsys):
    assert cli.main(["plan", "--width", "4096", "--height", "4096"]) == 0
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1
    assert "warning" in err and "32 phases" in err and "--model sdxl-random" in err
    assert "UNet patch evaluations" in out  # the plan itself still goes to stdout
    assert cli.main(["plan", "--width", "384", "--height", "384"]) == 0  # three phases: the tiny model's own sizes
    assert not capsys.readouterr().err
    assert cli.main(["plan", "--model", "sdxl-random", "--width", "4096", "--height", "4096"]) == 0
    assert not capsys.readouterr().err


def test_plan_workers_zero_exits_2(capsys):
    assert cli.main(["plan", "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


def test_version_prints_the_package_version(capsys):
    import tomllib
    from pathlib import Path

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert capsys.readouterr().out.strip() == f"apt-dist {project['version']}"


def _subcommand(command):
    import argparse

    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


@pytest.mark.parametrize("command", ["render", "upscale", "plan"])
def test_every_option_shows_its_default_in_help(command):
    sub = _subcommand(command)
    formatter = sub._get_formatter()
    options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 30
    missing = [a.option_strings[0] for a in options if "(default" not in formatter._get_help_string(a)]
    assert not missing, missing


def test_help_shows_renderconfigs_defaults_and_the_real_out_default(monkeypatch):
    from apt_dist.config import RenderConfig

    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside a help line

    text = " ".join(_subcommand("render").format_help().split())
    cfg = RenderConfig()
    assert f"denoising steps N of the schedule (default: {cfg.steps})" in text
    assert f"classifier-free guidance scale (default: {cfg.guidance_scale})" in text
    assert f"(default: {cfg.model})" in text and "(default: as --method says" in text
    assert "output PNG path (written atomically) (default: apt-dist.png)" in text
    assert cli.build_parser().parse_args(["render"]).out == "apt-dist.png"


def test_the_cli_shows_the_packages_log_on_stderr_one_line_each(capsys):
    import logging

    cli.configure_logging()
    cli.configure_logging()  # twice: still one handler, one line per record
    logging.getLogger("apt_dist.ray_executor").warning("worker 1 lost during timestep 981: RayActorError; 3 re-queued")
    logging.getLogger("apt_dist.ray_executor").info("worker 1 is back")
    logging.getLogger("apt_dist.ray_executor").debug("not shown")
    out, err = capsys.readouterr()
    assert not out
    assert err.splitlines() == ["apt-dist: warning: worker 1 lost during timestep 981: RayActorError; 3 re-queued",
                                "apt-dist: info: worker 1 is back"]


@pytest.mark.slow
def test_render_end_to_end_through_the_cli(tmp_path):
    out = tmp_path / "poster.png"
    proc = subprocess.run(
        [sys.executable, "-m", "apt_dist", "render", "--prompt", "a harbour at night", "--width", "384", "--height", "288",
         "--steps", "6", "--shortcut-steps", "4", "--seed", "3", "--save-phases", "--no-progress", "--driver-threads", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "UNet patch evaluations" in proc.stdout and str(out) in proc.stdout
    img = Image.open(out)
    assert img.size == (384, 288)
    assert img.text["prompt"] == "a harbour at night" and img.text["seed"] == "3"
    cfg = json.loads(img.text["apt_dist_config"])
    assert cfg["width"] == 384 and cfg["method"] == "apt" and cfg["resolved"]["upscale_steps"] == 4
    assert cfg["shortcut"] == 0.6 and cfg["resolved"]["shortcut"] is None  # --shortcut-steps overrides the fraction
    assert cfg["resolved"]["upscale_start_step"] == 2
    assert cfg["scheduler"] == "auto" and img.text["scheduler"] == "euler"  # what auto resolved to, for tiny
    assert Image.open(tmp_path / "poster.phase1.png").size == (128, 96)
    assert Image.open(tmp_path / "poster.phase2.png").size == (256, 192)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left nothing behind


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_permissions_of_a_new_file_and_leave_nothing_on_failure(tmp_path, umask):
    import os
    import stat

    from apt_dist.outputs import write_atomic

    old = os.umask(umask)
    try:
        path = write_atomic(tmp_path / "poster.png", lambda f: f.write(b"png"))
    finally:
        os.umask(old)
    assert path.read_bytes() == b"png"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, fail)
    assert path.read_bytes() == b"png" and sorted(p.name for p in tmp_path.iterdir()) == ["poster.png"]


def test_address_problem_says_in_seconds_that_no_cluster_answers(monkeypatch, tmp_path):
    import socket

    from apt_dist.ray_executor import address_problem

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert address_problem(f"127.0.0.1:{port}") is None
        assert address_problem(f"ray://127.0.0.1:{port}") is None
    closed = address_problem(f"127.0.0.1:{port}")  # the socket is gone: refused
    assert closed.startswith(f"no Ray cluster answers at 127.0.0.1:{port}")
    for fine in (None, "local"):
        assert address_problem(fine) is None
    assert "must be auto or HOST:PORT" in address_problem("host:port")
    # auto: RAY_ADDRESS first, else the cluster that `ray start` last left in Ray's temp dir ($RAY_TMPDIR/ray here).
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert "found no Ray cluster" in address_problem("auto") and str(tmp_path / "ray") in address_problem("auto")
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
    assert f"auto: the cluster last started on this machine, {tmp_path / 'ray'}" in address_problem("auto")
    # ...or in the temp dir given to Ray (ray.init's _temp_dir).
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
    assert str(tmp_path / "other") in address_problem("auto", temp_dir=str(tmp_path / "other"))
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    assert "auto: RAY_ADDRESS" in address_problem("auto")


def test_address_auto_reads_the_cluster_file_where_ray_start_writes_it(monkeypatch, tmp_path):
    """Ray keeps ray_current_cluster in $RAY_TMPDIR or $TMPDIR when set (a private temp dir), not /tmp/ray."""
    import socket

    from apt_dist.ray_executor import address_problem

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when checked: nothing answers
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    assert f"127.0.0.1:{port} (auto: the cluster last started on this machine, {tmp_path}" in address_problem("auto")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "other"))  # Ray's own variable comes first
    assert "found no Ray cluster" in address_problem("auto")


def test_auto_address_refuses_an_address_file_of_another_user(monkeypatch, tmp_path):
    from apt_dist import ray_executor

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray_current_cluster").write_text("127.0.0.1:6379\n")
    monkeypatch.setattr(ray_executor.os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    address, why = ray_executor.resolve_auto_address(str(tmp_path))
    assert address == "" and "another user" in why


def test_ray_executor_with_an_address_that_does_not_answer_fails_before_ray_init():
    import time

    import ray

    from apt_dist.executor import RenderContext
    from apt_dist.models import ModelSpec
    from apt_dist.ray_executor import ClusterError, RayExecutor

    assert not ray.is_initialized()  # this module leaves no Ray instance behind
    t0 = time.perf_counter()
    with pytest.raises(ClusterError, match="no Ray cluster answers at 127.0.0.1:1"):
        RayExecutor(num_workers=1, address="127.0.0.1:1").start(RenderContext(ModelSpec("tiny"), None, (64, 64), 5.0))
    assert time.perf_counter() - t0 < 30 and not ray.is_initialized()


@pytest.mark.slow
def test_more_workers_than_a_local_ray_instance_can_hold_fail_at_once_not_after_the_placement_timeout():
    import os
    import time

    import ray

    from apt_dist.executor import RenderContext
    from apt_dist.models import ModelSpec
    from apt_dist.ray_executor import ClusterError, RayExecutor

    assert not ray.is_initialized()
    n = (os.cpu_count() or 1) + 1
    t0 = time.perf_counter()
    # The executor starts a local instance with this machine's CPUs, and closes it on the way out.
    with RayExecutor(num_workers=n, placement_timeout_s=600) as ex, \
            pytest.raises(ClusterError, match=rf"they need {n} x 1 = {n} CPU \(this machine has {n - 1}\)"):
        ex.start(RenderContext(ModelSpec("tiny"), None, (64, 64), 5.0))
    assert time.perf_counter() - t0 < 120 and not ray.is_initialized()  # closed: the instance it started is gone
    with RayExecutor(num_workers=1, gpus_per_worker=1) as ex, \
            pytest.raises(ClusterError, match=r"1 GPU \(this machine has 0\)\. Use fewer workers, a fraction of a GPU"):
        ex.start(RenderContext(ModelSpec("tiny"), None, (64, 64), 5.0))  # no GPU here, nor in CI


def test_call_deadline_is_ten_medians_per_unit_at_least_the_floor_or_as_given():
    from collections import deque

    from apt_dist import ray_executor
    from apt_dist.ray_executor import CALL_TIMEOUT_FLOOR_S, RayExecutor

    assert cli.DEFAULT_CALL_TIMEOUT_FLOOR_S == CALL_TIMEOUT_FLOOR_S  # the help text's number
    ex = RayExecutor(num_workers=1)  # not started: no Ray
    assert ex.call_deadline_s("timestep", 3) == 3 * CALL_TIMEOUT_FLOOR_S  # nothing measured yet
    ex._unit_s["timestep"] = deque([1.0, 2.0, 30.0])
    assert ex.call_deadline_s("timestep", 4) == 10 * 2.0 * 4  # the median, not the mean
    assert ex.call_deadline_s("timestep", 1) == CALL_TIMEOUT_FLOOR_S
    assert ex.call_deadline_s("decode", 1) == CALL_TIMEOUT_FLOOR_S  # per kind
    assert RayExecutor(num_workers=1, call_timeout_s=2.5).call_deadline_s("timestep", 100) == 2.5
    assert ray_executor.CALL_TIMEOUT_FACTOR == 10
