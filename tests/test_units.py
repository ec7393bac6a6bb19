"""Work units sized for the device (devices.py): the auto choice, the memory estimate, and the plan that shows them."""

import json

import pytest
import torch
from helpers import small_config

from apt_dist import cli
from apt_dist.config import ConfigError, RenderConfig
from apt_dist.devices import CPU_VIEWS, GIB, DeviceProfile, LiveBytes, choose_units, estimate_memory
from apt_dist.planning import plan

TINY_NATIVE = 16


def test_live_bytes_counts_the_peak_of_live_tensors_not_their_sum():
    x = torch.empty(1000, device="meta")  # made outside: not counted
    with LiveBytes() as live:
        y = x + 1  # 4000 bytes
        z = y * 2  # 8000 live
        del y  # 4000 live
        w = z + 1  # 8000 live again
        v = w.view(10, 100)  # a view: no new storage
        del w
        assert live.total == 8000  # z, and w's storage kept alive by its view
        del v
    assert live.peak == 8000
    assert live.total == 4000


def test_auto_units_on_cpu_batch_both_branches_of_cpu_views_patches():
    c = choose_units(RenderConfig(), TINY_NATIVE, DeviceProfile("cpu"))
    assert (c.view_batch_size, c.split_guidance, c.rows, c.auto) == (CPU_VIEWS, False, 2 * CPU_VIEWS, True)
    assert c.memory is None


def test_set_units_are_kept_as_given():
    c = choose_units(RenderConfig(view_batch_size=3, split_guidance=True), TINY_NATIVE, DeviceProfile("cpu"))
    assert (c.view_batch_size, c.split_guidance, c.auto) == (3, True, False)


def test_auto_units_on_cuda_take_the_largest_unit_that_fits_the_memory():
    cfg = RenderConfig(dtype="float16", decode_tile=2, decode_context=0)  # the tiny UNet's activations dominate
    need = {v: estimate_memory(cfg, TINY_NATIVE, 2 * v).need / GIB for v in (8, 4, 2, 1)}
    assert need[8] > need[4] > need[2] > need[1]  # activations grow with the rows
    assert choose_units(cfg, TINY_NATIVE, DeviceProfile("cuda", need[8])).view_batch_size == 8
    just_below_8 = (need[8] + need[4]) / 2
    c = choose_units(cfg, TINY_NATIVE, DeviceProfile("cuda", just_below_8))
    assert (c.view_batch_size, c.split_guidance) == (4, False)
    assert c.memory.need <= just_below_8 * GIB


def test_a_set_unit_too_big_for_the_gpu_stops_naming_the_largest_that_fits():
    cfg = RenderConfig(dtype="float16", view_batch_size=8, decode_tile=2, decode_context=0)
    budget = estimate_memory(cfg, TINY_NATIVE, 2 * 4).need / GIB
    with pytest.raises(ConfigError) as e:
        choose_units(cfg, TINY_NATIVE, DeviceProfile("cuda", budget))
    assert e.value.option == "--view-batch-size"
    assert "the largest that fits: 4" in str(e.value)


def test_a_decode_tile_too_big_for_the_gpu_stops_naming_a_tile_that_fits():
    cfg = RenderConfig(dtype="float16", decode_tile=64, decode_context=0)
    est = estimate_memory(cfg, TINY_NATIVE, 2)
    assert est.vae_decode > est.unet_activations
    budget = (est.need - est.vae_decode / 2) / GIB  # room for a tile of about half the area
    with pytest.raises(ConfigError) as e:
        choose_units(cfg, TINY_NATIVE, DeviceProfile("cuda", budget))
    assert e.value.option == "--decode-tile"
    tile = int(str(e.value).split("--decode-tile ")[1].rstrip(")"))
    assert 2 <= tile < 64
    assert estimate_memory(cfg, TINY_NATIVE, 2, tile).need <= budget * GIB


def test_the_plan_uses_the_auto_units_for_its_calls():
    p = plan(small_config())
    assert p.units.view_batch_size == CPU_VIEWS and not p.units.split_guidance
    fixed = plan(small_config(view_batch_size=CPU_VIEWS, split_guidance=False))
    assert [ph.units_per_step for ph in p.phases] == [ph.units_per_step for ph in fixed.phases]
    assert p.unet_calls < plan(small_config(view_batch_size=1, split_guidance=True)).unet_calls


def test_plan_command_shows_the_units_per_step_and_the_gpu_memory(capsys):
    assert cli.main(["plan", "--width", "384", "--height", "384", "--gpu-memory", "24", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "work units: 8 patches per UNet call, both guidance branches in one call (16 rows; auto for CUDA, 24.0 GiB" in out
    assert "units/step" in out
    assert "GPU memory per worker (estimate, not yet calibrated on a GPU)" in out
    assert "with per-step barriers" in out
    assert "one step's barrier, the units shared longest first (in patch times): phase 1 1, phase 2 " in out


def test_plan_json_has_the_units_and_the_memory_estimate(capsys):
    assert cli.main(["plan", "--json", "--gpu-memory", "24", "--view-batch-size", "2", "--no-split-guidance"]) == 0
    units = json.loads(capsys.readouterr().out)["units"]
    assert (units["view_batch_size"], units["split_guidance"], units["rows"], units["auto"]) == (2, False, 4, False)
    assert units["memory"]["need"] == units["memory"]["peak"] + units["memory"]["reserve"]


def test_plan_command_refuses_a_unit_that_does_not_fit_with_exit_2(capsys):
    assert cli.main(["plan", "--gpu-memory", "1.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GiB" in err


@pytest.mark.parametrize("value", ["0", "-3", "nan"])
def test_gpu_memory_must_be_positive(value, capsys):
    assert cli.main(["plan", "--gpu-memory", value]) == 2
    assert "--gpu-memory" in capsys.readouterr().err


def test_view_batch_size_takes_auto_or_an_integer(capsys):
    assert cli.main(["plan", "--view-batch-size", "auto"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--view-batch-size", "many"])
    assert e.value.code == 2
    assert "expected an integer >= 1 or auto" in capsys.readouterr().err


@pytest.mark.slow
def test_sdxl_estimate_is_within_15_percent_of_the_h200_measurement():
    """gpu_check.py on an H200 (benchmarks/results/gpu_check.md): sdxl-random float16, one patch a call, guidance
    halves apart, the default decode tile: peak 9.99 GiB (torch.cuda.max_memory_allocated)."""
    cfg = RenderConfig(model="sdxl-random", dtype="float16")
    est = estimate_memory(cfg, 128, rows=1)
    assert est.peak / GIB == pytest.approx(9.99, rel=0.15)


@pytest.mark.slow
def test_4096_and_8192_apt_plan_to_fit_24_gib_workers():
    for side in (4096, 8192):
        p = plan(RenderConfig(model="sdxl-random", width=side, height=side, gpu_memory=24.0))
        assert p.units.memory.need <= 24 * GIB
        assert p.units.view_batch_size >= 1


def test_a_cpu_render_sizes_its_units_for_the_cpu_even_with_gpu_memory_given():
    from apt_dist import render

    assert plan(small_config(gpu_memory=24.0)).units.device.kind == "cuda"  # plan: for CUDA workers of 24 GiB
    r = render(small_config(gpu_memory=24.0, width=128, height=128, steps=2, shortcut_steps=None), progress=False)
    assert r.plan.units.device.kind == "cpu" and r.plan.units.view_batch_size == CPU_VIEWS


def test_ray_workers_report_the_smallest_gpu_times_their_share_of_it():
    from apt_dist.ray_executor import RayExecutor, WorkerState

    ex = RayExecutor(num_workers=2, gpus_per_worker=0.5)
    ex.workers = [WorkerState(None, 0, {"gpu_total_bytes": 80 * GIB, "gpu_name": "H100"}),
                  WorkerState(None, 1, {"gpu_total_bytes": 24 * GIB, "gpu_name": "L4"})]
    assert ex.device_profile() == DeviceProfile("cuda", 12.0, "L4")
    assert ex.device_profile(10.0) == DeviceProfile("cuda", 10.0, "--gpu-memory")
    assert RayExecutor(num_workers=1, gpus_per_worker=0).device_profile(24.0) == DeviceProfile("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_cpu_render_with_gpu_memory_is_not_refused_for_a_gpu_it_does_not_use(tmp_path, capsys):
    out = tmp_path / "x.png"
    # --device auto on a machine without CUDA: `plan --gpu-memory 1` plans for CUDA workers (and refuses), a render runs
    assert cli.main(["render", "--gpu-memory", "1", "--width", "128", "--height", "128", "--steps", "2",
                     "--no-progress", "--out", str(out)]) == 0
    assert out.exists()
