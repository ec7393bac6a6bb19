"""The driver's shared-memory file: grows, is unlinked, and workers see what the driver wrote."""

import os

import numpy as np
import pytest

from apt_dist import shared_memory as shm

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm")


def test_buffer_grows_into_a_new_file_and_unlinks_the_old_one():
    buf = shm.SharedBuffer()
    buf.ensure(1000)
    first = buf.path
    assert os.path.exists(first) and buf.size >= 1000
    buf.ensure(buf.size)  # fits: same file
    assert buf.path == first
    buf.ensure(buf.size + 1)
    assert buf.path != first and not os.path.exists(first) and os.path.exists(buf.path)
    last = buf.path
    buf.close()
    assert not os.path.exists(last) and buf.path is None


def test_worker_views_see_the_drivers_writes_and_the_driver_sees_theirs():
    buf = shm.SharedBuffer()
    try:
        buf.ensure(1 << 16)
        x = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
        buf.array(128, x.shape, x.dtype)[...] = x
        views = shm.SharedViews()  # what a worker on this node holds
        np.testing.assert_array_equal(views.array(buf.path, 128, x.shape, x.dtype.str), x)
        views.array(buf.path, 4096, (5,), "<f4")[...] = 2.5
        np.testing.assert_array_equal(buf.array(4096, (5,), np.float32), np.full(5, 2.5, np.float32))
        assert shm.nbytes(x.shape, x.dtype) == 48
    finally:
        buf.close()


def test_a_full_dev_shm_is_an_error_at_reservation_not_a_crash_later(tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    buf = shm.SharedBuffer(directory=str(tmp_path))
    with pytest.raises(OSError, match="No space"):
        buf.ensure(1 << 20)
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_files_of_dead_drivers_are_removed_live_ones_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"apt-dist-{int(dead.stdout)}-0123456789ab"
    live = tmp_path / f"apt-dist-{os.getpid()}-0123456789ab"
    other = tmp_path / "something-else"
    for f in (stale, live, other):
        f.write_bytes(b"x")
    buf = shm.SharedBuffer(directory=str(tmp_path))
    buf.ensure(10)  # the first file of a driver sweeps up after dead ones
    assert not stale.exists() and live.exists() and other.exists()
    buf.close()


def test_staging_lays_out_every_patch_and_every_output_apart_and_reuses_the_layout_for_the_same_step_shape():
    import torch

    from apt_dist.executor import make_units
    from apt_dist.ray_executor import _Staging

    patches = [torch.full((4, 16, 16), float(k)) for k in range(3)] + [torch.full((4, 8, 8), 9.0)]
    units = make_units([tuple(p.shape) for p in patches], 2, True)
    buf = shm.SharedBuffer()
    try:
        a, b = (_Staging(units, patches, np.float16, buf) for _ in range(2))
        assert a.in_off is b.in_off and a.out_off is b.out_off  # laid out once for a phase's steps
        item = np.dtype(np.float16).itemsize
        regions = [(off, off + int(np.prod(p.shape)) * item) for off, p in zip(a.in_off, patches)]
        regions += [(off, off + len(u.rows) * int(np.prod(patches[u.rows[0][0]].shape)) * item)
                    for off, u in zip(a.out_off, units)]
        regions.sort()
        assert all(end <= nxt for (_, end), (nxt, _) in zip(regions, regions[1:])) and regions[-1][1] <= buf.size
        for k in range(len(units)):  # each unit reads its own patches back from the buffer
            (path, off, shape, dtype), rows, _, _ = a.message(k, [(0, 0)] * len(patches), True)
            got = buf.array(off, shape, np.dtype(dtype))
            assert np.array_equal(got, np.stack([patches[p].numpy() for p in units[k].patches]).astype(np.float16))
    finally:
        buf.close()
