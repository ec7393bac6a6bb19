"""Phase checkpoints: a render that dies resumes after its last finished phase, with the same image."""

import hashlib
import json
import os
import zipfile

import pytest
import torch
from helpers import small_config

from apt_dist import checkpoint as ckpt
from apt_dist import cli, render, sampler
from apt_dist.config import ConfigError
from apt_dist.executor import InProcessExecutor


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def executor():
    return InProcessExecutor()


def test_resume_after_a_crash_gives_the_same_image(tmp_path, executor):
    ck = tmp_path / "render.ckpt"
    whole = render(small_config(), executor=executor, progress=False)

    def crash_in_phase_3(phase, step, t):
        if phase == 3 and step == 3:
            raise Crash()

    with pytest.raises(Crash):
        render(small_config(), executor=executor, progress=False, checkpoint=str(ck), callback=crash_in_phase_3)
    assert ck.exists() and not list(tmp_path.glob("*.tmp"))

    seen = []
    resumed = render(small_config(), executor=executor, progress=False, checkpoint=str(ck),
                     callback=lambda ph, i, t: seen.append(ph))
    assert set(seen) == {3}  # phases 1 and 2 came from the checkpoint
    assert resumed.resumed_phases == 2
    assert torch.equal(resumed.latent, whole.latent)
    assert resumed.image.tobytes() == whole.image.tobytes()


@pytest.mark.parametrize("phase,step", [(1, 3), (3, 4)])
def test_resume_inside_a_phase_from_an_in_phase_checkpoint_gives_the_same_image(tmp_path, executor, phase, step):
    """With --checkpoint-every 0 the state is saved before every step after a phase's first: a render stopped after
    step `step` resumes at that step (its checkpoint was written before it ran), and ends bit-identical."""
    ck = tmp_path / "render.ckpt"
    whole = render(small_config(), executor=executor, progress=False)

    def crash(ph, i, t):
        if (ph, i) == (phase, step):
            raise Crash()

    with pytest.raises(Crash):
        render(small_config(), executor=executor, progress=False, checkpoint=str(ck), checkpoint_every_s=0.0, callback=crash)
    state = torch.load(ck, weights_only=True)
    assert (state["in_phase"]["phase"], state["in_phase"]["step"]) == (phase, step)
    assert len(state["latents"]) == phase - 1

    seen = []
    resumed = render(small_config(), executor=executor, progress=False, checkpoint=str(ck),
                     callback=lambda ph, i, t: seen.append((ph, i)))
    assert seen[0] == (phase, step)  # nothing before the checkpointed step is rendered again
    assert torch.equal(resumed.latent, whole.latent)
    assert resumed.image.tobytes() == whole.image.tobytes()


@pytest.mark.slow
def test_a_driver_killed_mid_phase_resumes_from_its_in_phase_checkpoint_bit_identically(tmp_path):
    """A real kill: SIGKILL of the CLI's process once its checkpoint holds a step of the last phase."""
    import signal
    import subprocess
    import sys
    import time

    args = ARGS + ["--driver-threads", "1", "--checkpoint-every", "0.001"]
    whole, killed, ck = tmp_path / "whole.png", tmp_path / "killed.png", tmp_path / "render.ckpt"
    assert cli.main(args + ["--out", str(whole)]) == 0
    command = [sys.executable, "-m", "apt_dist", *args, "--out", str(killed), "--checkpoint", str(ck)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                within = torch.load(ck, weights_only=True)["in_phase"] if ck.exists() else None
            except Exception:  # an atomic rename in progress: read again
                within = None
            if within is not None and within["phase"] == 3:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        assert proc.wait(timeout=60) == -signal.SIGKILL, "the render ended before its last phase was checkpointed"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not killed.exists()
    assert cli.main(args + ["--out", str(killed), "--checkpoint", str(ck)]) == 0
    from PIL import Image

    assert Image.open(killed).tobytes() == Image.open(whole).tobytes()


def test_a_checkpoint_of_another_render_is_refused(tmp_path, executor):
    ck = tmp_path / "render.ckpt"

    def stop(phase, step, t):
        if phase == 2:
            raise Crash()

    with pytest.raises(Crash):
        render(small_config(), executor=executor, progress=False, checkpoint=str(ck), callback=stop)
    with pytest.raises(ConfigError, match=r"--checkpoint.*another render.*seed"):
        render(small_config(seed=99), executor=executor, progress=False, checkpoint=str(ck))
    # Settings that do not change the latents (decoding, phase images) may differ.
    r = render(small_config(save_phases=True, decode_overlap=2), executor=executor, progress=False, checkpoint=str(ck))
    assert r.resumed_phases == 1 and len(r.phase_images) == 3


def test_garbage_checkpoint_is_a_clear_error(tmp_path, executor):
    ck = tmp_path / "bad.ckpt"
    ck.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable apt-dist checkpoint"):
        render(small_config(), executor=executor, progress=False, checkpoint=str(ck))


# ---- untrusted checkpoints: every tampering is refused with exit 2, one line, and the file left as it was ----

ARGS = ["render", "--prompt", "a red lighthouse on a cliff", "--width", "384", "--height", "288", "--seed", "7",
        "--steps", "6", "--shortcut-steps", "4", "--no-progress"]


@pytest.fixture(scope="module")
def two_phases(tmp_path_factory, executor):
    """A real checkpoint of small_config() after phases 1 and 2 (of 3)."""
    ck = tmp_path_factory.mktemp("ck") / "render.ckpt"

    def stop(phase, step, t):
        if phase == 3:
            raise Crash()

    with pytest.raises(Crash):
        render(small_config(), executor=executor, progress=False, checkpoint=str(ck), callback=stop)
    return ck.read_bytes()


def _state(data: bytes, tmp_path) -> dict:
    p = tmp_path / "orig.ckpt"
    p.write_bytes(data)
    return torch.load(p, weights_only=True)


def _resealed(state: dict) -> dict:
    """The state with its shapes and checksum made consistent again, as a careful forger would."""
    state = dict(state)
    state["shapes"] = [list(z.shape) for z in state["latents"]]
    state["sha256"] = ckpt._digest(ckpt._tensors(state["latents"], state["generator"], state["in_phase"]))
    return state


def _saved(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _flip_a_tensor_byte(data: bytes) -> bytes:
    with zipfile.ZipFile(__import__("io").BytesIO(data)) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # the local header's size
    b = bytearray(data)
    b[start + info.file_size // 2] ^= 0x01
    return bytes(b)


def _with(key, value):
    def f(s):
        s = dict(s)
        s[key] = value
        return _saved(s)
    return f


def _without(key):
    def f(s):
        s = dict(s)
        del s[key]
        return _saved(s)
    return f


TAMPERED = {
    "extra latent": lambda s: _saved(_resealed({**s, "latents": s["latents"] + [s["latents"][-1]] * 2})),
    "extra latent, not resealed": lambda s: _saved({**s, "latents": s["latents"] + [s["latents"][-1]]}),
    "wrong shape": lambda s: _saved(_resealed({**s, "latents": [s["latents"][0], s["latents"][1][:, :, :-1]]})),
    "wrong channels": lambda s: _saved(_resealed({**s, "latents": [z[:, :3] for z in s["latents"]]})),
    "scaled values": lambda s: _saved({**s, "latents": [s["latents"][0], s["latents"][1] * 1.5]}),
    "NaN values": lambda s: _saved(_resealed({**s, "latents": [s["latents"][0], s["latents"][1] * float("nan")]})),
    "other dtype": lambda s: _saved(_resealed({**s, "latents": [z.double() for z in s["latents"]]})),
    "list instead of dict": lambda s: _saved(list(s.values())),
    "latents a dict": _with("latents", {"0": torch.zeros(1)}),
    "generator a list": _with("generator", [1, 2, 3]),
    "generator garbage": lambda s: _saved(_resealed({**s, "generator": torch.zeros(7, dtype=torch.uint8)})),
    "config a string": _with("config", "seed=7"),
    "shapes wrong type": _with("shapes", "1x4"),
    "missing config": _without("config"),
    "missing generator": _without("generator"),
    "missing sha256": _without("sha256"),
    "unknown key": _with("note", "hi"),
    "version 1": _with("version", 1),
    "in-phase record of the wrong phase": lambda s: _saved(_resealed({**s, "in_phase": {
        "phase": 2, "step": 3, "x": s["latents"][1], "noise": s["latents"][1], "generator": s["generator"]}})),
    "in-phase record at a step outside the phase": lambda s: _saved(_resealed({**s, "in_phase": {
        "phase": 3, "step": 0, "x": torch.zeros(1, 4, 36, 48), "noise": torch.zeros(1, 4, 36, 48), "generator": s["generator"]}})),
    "in-phase record of the wrong shape": lambda s: _saved(_resealed({**s, "in_phase": {
        "phase": 3, "step": 3, "x": s["latents"][1], "noise": s["latents"][1], "generator": s["generator"]}})),
}
RAW = {
    "flipped byte": _flip_a_tensor_byte,
    "truncated": lambda d: d[: len(d) // 2],
    "random bytes": lambda d: hashlib.sha256(b"apt").digest() * 200,
    "empty": lambda d: b"",
}


def _refused(data: bytes, tmp_path, capsys, extra=()):
    ck, out = tmp_path / "bad.ckpt", tmp_path / "out.png"
    ck.write_bytes(data)
    assert cli.main(ARGS + ["--checkpoint", str(ck), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--checkpoint" in err and "Traceback" not in err, err
    assert ck.read_bytes() == data and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ckpt"]  # no temporary file either
    return err


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_a_tampered_checkpoint_is_refused_with_exit_2_and_left_unchanged(case, two_phases, tmp_path, capsys, no_models):
    data = TAMPERED[case](_state(two_phases, tmp_path))
    (tmp_path / "orig.ckpt").unlink()
    _refused(data, tmp_path, capsys)


@pytest.mark.parametrize("case", sorted(RAW))
def test_a_damaged_checkpoint_file_is_refused_with_exit_2_and_left_unchanged(case, two_phases, tmp_path, capsys, no_models):
    _refused(RAW[case](two_phases), tmp_path, capsys)


def test_the_checks_say_what_is_wrong(two_phases, tmp_path, capsys, no_models):
    s = _state(two_phases, tmp_path)
    (tmp_path / "orig.ckpt").unlink()
    assert "4 phase latents but this render has 3 phases" in _refused(TAMPERED["extra latent"](s), tmp_path, capsys)
    assert "phase 2 latent of shape [1, 4, 23, 32], but this render's is [1, 4, 24, 32]" in _refused(TAMPERED["wrong shape"](s), tmp_path, capsys)
    assert "SHA-256" in _refused(TAMPERED["scaled values"](s), tmp_path, capsys)
    assert "non-finite" in _refused(TAMPERED["NaN values"](s), tmp_path, capsys)
    assert "missing keys config" in _refused(TAMPERED["missing config"](s), tmp_path, capsys)
    assert "--restart" in _refused(TAMPERED["scaled values"](s), tmp_path, capsys)


def test_a_checkpoint_of_another_render_exits_2_and_is_left_unchanged(two_phases, tmp_path, capsys, no_models):
    ck, out = tmp_path / "c.ckpt", tmp_path / "out.png"
    ck.write_bytes(two_phases)
    assert cli.main([a if a != "7" else "99" for a in ARGS] + ["--checkpoint", str(ck), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another render" in err and "seed" in err
    assert ck.read_bytes() == two_phases and not out.exists()


def test_a_valid_checkpoint_loads_with_an_in_phase_record(two_phases, tmp_path):
    """The lead's sampler writes in-phase records: one of phase 3 at one of its steps passes every check."""
    from apt_dist import plan

    s = _state(two_phases, tmp_path)
    x = torch.randn(1, 4, 36, 48)
    rec = {"phase": 3, "step": 3, "x": x, "noise": torch.randn(1, 4, 36, 48), "generator": torch.Generator().manual_seed(1)}
    ck = tmp_path / "in_phase.ckpt"
    ckpt.save(ck, small_config(), s["latents"], s["generator"], in_phase=rec)
    got = ckpt.load(ck, small_config(), plan(small_config()), latent_channels=4)
    assert torch.equal(got["in_phase"]["x"], x) and got["in_phase"]["step"] == 3 and len(got["latents"]) == 2
    assert torch.equal(got["in_phase"]["generator"], torch.Generator().manual_seed(1).get_state())


def test_restart_ignores_an_untrusted_checkpoint_and_overwrites_it(two_phases, tmp_path, capsys):
    ck, out = tmp_path / "c.ckpt", tmp_path / "out.png"
    ck.write_bytes(b"garbage")
    assert cli.main(ARGS + ["--checkpoint", str(ck), "--out", str(out), "--restart"]) == 0
    assert out.exists() and "resumed" not in capsys.readouterr().out
    from apt_dist import plan

    assert len(ckpt.load(ck, small_config(), plan(small_config()), 4)["latents"]) == 3


def test_a_failing_checkpoint_save_warns_once_and_the_render_goes_on(tmp_path, executor, monkeypatch, caplog):
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "write_atomic", full)
    whole = render(small_config(), executor=executor, progress=False)
    with caplog.at_level("WARNING", logger="apt_dist"):
        r = render(small_config(), executor=executor, progress=False, checkpoint=str(tmp_path / "c.ckpt"))
    warnings = [rec for rec in caplog.records if "could not write the checkpoint" in rec.getMessage()]
    assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()
    assert r.image.tobytes() == whole.image.tobytes()


def test_an_image_that_cannot_be_written_is_kept_and_written_by_the_next_run_without_rendering(tmp_path, capsys, monkeypatch):
    from apt_dist import outputs

    whole = render(small_config(), executor=InProcessExecutor(), progress=False)
    out = tmp_path / "poster.png"
    real = outputs.save_png_atomic

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "save_png_atomic", full)
    assert cli.main(ARGS + ["--out", str(out)]) == 1
    err = _ours(capsys.readouterr().err)
    kept = tmp_path / "poster.png.ckpt"
    assert len(err.splitlines()) == 1 and "No space left" in err and str(kept) in err and "Traceback" not in err, err
    assert kept.exists() and not out.exists()

    monkeypatch.setattr(outputs, "save_png_atomic", real)
    monkeypatch.setattr(sampler._Sampler, "reference_phase", lambda *a: pytest.fail("rendered again"))
    monkeypatch.setattr(sampler._Sampler, "upscale_phase", lambda *a: pytest.fail("rendered again"))
    assert cli.main(ARGS + ["--out", str(out), "--checkpoint", str(kept)]) == 0
    assert "resumed after phase 3" in capsys.readouterr().out
    from PIL import Image

    assert Image.open(out).tobytes() == whole.image.tobytes()
    assert json.loads(Image.open(out).text["phases"]) == ["128x96", "256x192", "384x288"]  # resumed ones too
    assert os.path.exists(kept)


def _ours(err: str) -> str:
    """stderr without transformers' own import-time notices (printed once per process, by the first model load)."""
    return "\n".join(line for line in err.strip().splitlines() if not line.startswith("[transformers]"))


def test_a_runtime_failure_is_one_line_and_exit_1_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("the GPU fell off")

    monkeypatch.setattr(sampler, "render", broken)
    assert cli.main(ARGS + ["--out", str(tmp_path / "x.png")]) == 1
    err = _ours(capsys.readouterr().err)
    assert err == "apt-dist render: error: RuntimeError: the GPU fell off"
    assert cli.main(ARGS + ["--out", str(tmp_path / "x.png"), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("apt-dist render: error: RuntimeError: the GPU fell off")
