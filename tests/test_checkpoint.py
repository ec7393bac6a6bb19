"""Phase checkpoints: a render that dies resumes after its last finished phase, with the same image."""

import pytest
import torch
from helpers import small_config

from apt_dist import render
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
