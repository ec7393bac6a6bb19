"""Smoke tests of the benchmark harness (`python benchmarks/bench.py`): the benchmarks run on tiny configs and
their tables have the right columns.

No timing assertions: the numbers depend on the machine and its load.
"""

import json

import bench  # benchmarks/bench.py (conftest puts benchmarks/ on sys.path)
import pytest
from bench import main

from apt_dist import plan
from apt_dist.config import RenderConfig


def test_bench_phases_table():
    cfg = RenderConfig(width=256, height=192, steps=2)
    t = bench.bench_phases(cfg, warmup=False)
    assert t.columns == ["phase", "size", "steps", "wall s", "patch evals", "UNet s", "ms/patch", "driver share"]
    assert [r[0] for r in t.rows] == [1, 2, "decode", "setup", "total"]
    # 2 steps of 1 patch, then the shortcut's round(0.6 x 2) = 1 step of 6 windows and 4 sub-lattices
    assert t.rows[-1][4] == t.data["patch_evals"] == plan(cfg).unet_patch_evals == 2 + 10
    text, md = t.text(), t.markdown()
    assert "driver share" in text and md.count("\n|") == 2 + len(t.rows)


def test_bench_cli_writes_json_and_markdown(tmp_path, capsys):
    js, md = tmp_path / "p.json", tmp_path / "p.md"
    argv = ["phases", "--steps", "2", "--width", "256", "--height", "192", "--no-warmup",
            "--json", str(js), "--markdown", str(md)]
    assert main(argv) == 0
    assert "bench phases" in capsys.readouterr().out
    doc = json.loads(js.read_text())
    assert doc["benchmark"] == "phases" and doc["config"]["steps"] == 2 and doc["machine"]["nproc"] >= 1
    assert md.read_text().startswith("`python benchmarks/bench.py phases --steps 2")


def test_bench_config_defaults_and_workers_option():
    cfg = bench.config_for("scaling", {"steps": 4})
    assert (cfg.model, cfg.width, cfg.height, cfg.steps) == ("sdxl-random", 4096, 4096, 4)
    assert bench.parse_workers(None, "scaling") == [1, 2, 4, 8, 16]
    assert bench.parse_workers("1,3", "workers") == [1, 3]
    assert main(["scaling", "--workers", "0,2"]) == 2
    assert main(["scaling", "--driver-threads", "0"]) == 2
    assert main(["scaling", "--steps", "0"]) == 2


@pytest.mark.ray
def test_bench_overhead_one_worker(ray_local):
    t = bench.bench_overhead(RenderConfig(model="sdxl-random", width=1024, height=1024, steps=2), workers=1, repeats=1)
    assert t.columns == ["executor", "workers", "patch evals", "seconds", "ms/patch (driver+transport)",
                         "ms/patch (driver only)", "transport share"]
    assert [r[0] for r in t.rows] == ["in-process zeros", "Ray, simulated 0 s"]
    assert t.rows[1][2] == 2


@pytest.mark.slow
@pytest.mark.ray
def test_bench_scaling_and_workers_tiny(ray_local):
    t = bench.bench_scaling(RenderConfig(model="sdxl-random", width=2048, height=2048, steps=2), [2], 0.001)
    assert [r[0] for r in t.rows] == [2]
    assert {"wall s", "ideal s", "eff vs ideal", "barrier s", "bound eff", "wall vs bound", "bound eff (whole patches)"} <= set(t.columns)
    w = bench.bench_workers(RenderConfig(width=256, height=192, steps=2), [1])
    assert [r[0] for r in w.rows] == ["in-process", "Ray"]
    assert w.rows[1][-1] is True  # bit-identical to the in-process render


@pytest.mark.ray
@pytest.mark.parametrize("script,args", [
    ("bench.py", ["scaling", "--workers", "2", "--width", "2048", "--height", "2048"]),
    ("transport_ab.py", ["--workers", "2"]),
    ("step_timeline.py", ["--workers", "2", "--driver-threads", "1"]),
    ("checkout_ab.py", ["ROOT", "ROOT", "--workers", "2", "--rounds", "1", "--renders", "1"]),
])
@pytest.mark.slow
def test_benchmark_scripts_run_and_write_their_tables(script, args, tmp_path):
    """The scripts in benchmarks/ start their own Ray instance: run each in a fresh process, tiny settings."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "table.md"
    cmd = [sys.executable, str(root / "benchmarks" / script), "--steps", "4", "--seconds-per-patch", "0.001",
           "--markdown", str(out), *[str(root) if a == "ROOT" else a for a in args]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ | {"RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 0, done.stderr[-2000:]
    table = out.read_text()
    assert table.startswith("`python ")
    assert ("| workers |" in table) or ("| phase |" in table) or ("| checkout |" in table)
    assert table.count("\n|") >= 3  # header, rule, at least one row
    if script == "checkout_ab.py":  # each round's walls are printed as it ends: a run stopped early still tells them
        assert "round 1/1: " in done.stdout


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("script,table", [("view_batch.py", "view_batch.md"), ("gpu_check.py", "gpu_check.md")])
def test_gpu_scripts_dry_run_on_the_cpu(script, table, tmp_path):
    """The GPU scripts (run once on a lent GPU) also run on the CPU with `tiny`: a dry run before spending GPU time."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "benchmarks" / script), str(tmp_path), "--model", "tiny", "--device", "cpu",
           "--dtype", "float32", "--size", "256", "--steps", "2"] + (["--sizes", "1,2"] if script == "view_batch.py" else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ | {"RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 0, done.stderr[-2000:]
    md = (tmp_path / table).read_text()
    assert md.startswith("# ") and "command: `python benchmarks/" in md
    data = json.loads((tmp_path / table.replace(".md", ".json")).read_text())
    runs = data.get("runs") or data.get("rows")
    assert len(runs) == (3 if script == "gpu_check.py" else 2)
    assert all(r["s_per_patch"] > 0 for r in runs)


@pytest.mark.slow
def test_gpu_bench_and_equal_work_dry_run_on_the_cpu(tmp_path):
    """gpu_bench.py (MFU table) and equal_work.py (without Ray) on the CPU with `tiny`: the device check's dry run."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_bench.py"), "--model", "tiny", "--device", "cpu",
                           "--dtypes", "float32", "--rows", "2,4", "--seconds", "0.1", "--peak-tflops", "1",
                           "--json", str(tmp_path / "mfu.json")], capture_output=True, text=True, timeout=300, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    (mfu,) = json.loads((tmp_path / "mfu.json").read_text())
    assert [r[2] for r in mfu["rows"]] == [2, 4]
    assert mfu["rows"][1][4] == pytest.approx(2 * mfu["rows"][0][4], rel=1e-3)  # FLOPs grow with the rows
    assert any("scaled_dot_product" in n for n in mfu["notes"])
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "equal_work.py"), "--no-ray", "--rounds", "1",
                           "--width", "256", "--height", "256", "--steps", "2", "--threads", "1",
                           "--json", str(tmp_path / "ew.json")], capture_output=True, text=True, timeout=300, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "ew.json").read_text())["rows"]
    assert [r[0] for r in rows] == ["apt", "demofusion"] and all(r[5] > 0 and r[9] > 0 for r in rows)


@pytest.mark.ray
@pytest.mark.slow
def test_farm_dry_run_table_columns_and_utilisation_fractions(ray_local, tmp_path):
    """benchmarks/farm.py --quick (small sizes, 2 workers): every run and mode has a row, utilisations are fractions
    in (0, 1], and the busy counters cover every render of each mode (one after another included)."""
    import farm  # benchmarks/farm.py

    js, md = tmp_path / "farm.json", tmp_path / "farm.md"
    assert farm.main(["--quick", "--seconds-per-patch", "0.01", "--json", str(js), "--markdown", str(md)]) == 0
    doc = json.loads(js.read_text())
    assert doc["columns"] == farm.COLUMNS
    col = {c: i for i, c in enumerate(doc["columns"])}
    assert [(r[col["run"]], r[col["mode"]]) for r in doc["rows"]] == [
        ("overhead", "together"), ("overhead", "alone"),
        ("farm", "together"), ("farm", "together, --policy earliest"), ("farm", "one after another"),
        ("mixed 1024+2048", "together"), ("mixed 1024+2048", "together, --policy earliest"),
        ("mixed 1024+2048", "one after another")]
    for r in doc["rows"]:
        assert r[col["workers"]] == 2 and r[col["wall s"]] >= r[col["sampling s"]] > 0
        if r[col["run"]] == "overhead":
            assert r[col["ms/patch (sampling)"]] > 0
            continue
        for c in ("util (sampling)", "util (wall)", "1-render bound"):
            assert 0 < float(r[col[c]].rstrip("%")) / 100 <= 1, (c, r)
        # the simulated sleeps add up to at least the plan's UNet seconds, in both modes: no render's calls uncounted
        assert r[col["busy s"]] >= 0.95 * r[col["UNet s (plan)"]], r
    assert md.read_text().startswith("`python benchmarks/farm.py --quick")


def test_farm_bad_options_exit_2_before_ray(capsys):
    import farm

    assert farm.main(["--workers", "0,2"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert farm.main(["--size", "1001"]) == 2  # not a multiple of 8: RenderConfig says so, named as --size
    assert "--size: must be a positive multiple of 8" in capsys.readouterr().err
    assert farm.main(["--quick", "--driver-threads", "0"]) == 2
