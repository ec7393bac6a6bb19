"""What drivers killed on this node left behind, removed by the next driver.

A driver that dies without closing (SIGKILL, out of memory, a lost node) leaves its
shared-memory file in /dev/shm (`shared_memory.py`), its private socket folder in the temp
folder (`ray_executor`), and maybe a half-written checkpoint beside its checkpoint
(`outputs.write_atomic`, removed by `checkpoint.Saver`). Each name carries its driver's pid:
a file is removed only when it is this user's (st_uid) and that process is gone.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from . import shared_memory
from .outputs import pid_alive

SOCKET_DIR_PREFIX = "apt-dist-"  # + the driver's pid + "-" + mkdtemp's random part


def socket_dir_prefix() -> str:
    return f"{SOCKET_DIR_PREFIX}{os.getpid()}-"


def remove_stale_socket_dirs(directory: str | None = None) -> list[str]:
    directory = directory or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        pid = name[len(SOCKET_DIR_PREFIX):].split("-", 1)[0]
        if not (name.startswith(SOCKET_DIR_PREFIX) and pid.isdigit() and "-" in name[len(SOCKET_DIR_PREFIX):]):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if st.st_uid != os.getuid() or not os.path.isdir(path) or os.path.islink(path) or pid_alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def remove_stale_files() -> list[str]:
    """Shared-memory files and socket folders of this user's dead drivers on this node; returns what went."""
    removed = []
    if shared_memory.available():
        removed += [os.path.join(shared_memory.SHM_DIR, n) for n in shared_memory.remove_stale()]
    return removed + remove_stale_socket_dirs()
