"""The runtime package stays a runtime: no benchmark harness in it, nor simulation hooks in its public API."""

import inspect
import json
import subprocess
import sys

IMPORT_ALL = r"""
import importlib, json, pkgutil, sys
import apt_dist
names = [m.name for m in pkgutil.walk_packages(apt_dist.__path__, "apt_dist.") if m.name != "apt_dist.__main__"]
for name in names:
    importlib.import_module(name)
harness = [m for m in sys.modules if m in ("bench", "benchmarks") or m.startswith("benchmarks.") or m.endswith(".bench")]
print(json.dumps({"modules": names, "harness": harness}))
"""


def test_importing_every_apt_dist_module_imports_no_benchmark_harness():
    # A fresh interpreter: this test process has benchmarks/ on its path (conftest) and may have imported it.
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, check=True).stdout
    doc = json.loads(out.strip().splitlines()[-1])
    assert "apt_dist.ray_executor" in doc["modules"] and "apt_dist.cli" in doc["modules"]
    assert not [m for m in doc["modules"] if m.endswith(".bench")]
    assert doc["harness"] == []


def test_executor_and_worker_constructors_have_no_simulation_parameters():
    from apt_dist.ray_executor import RayExecutor
    from apt_dist.worker import UNetWorker

    for cls in (RayExecutor, UNetWorker):
        params = list(inspect.signature(cls.__init__).parameters)
        assert not [p for p in params if "simulate" in p or "delay" in p], (cls.__name__, params)
    assert "worker_class" in inspect.signature(RayExecutor.__init__).parameters


def test_the_cli_has_no_bench_subcommand(capsys):
    import pytest

    from apt_dist.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "phases"])
    assert e.value.code == 2 and "invalid choice: 'bench'" in capsys.readouterr().err
