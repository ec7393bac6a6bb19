"""Ray's cluster launcher for real: cluster/README.md's `local-ssh.yaml` walk-through, command for command.

`ray up`, `ray submit examples/poster.py`, `ray rsync-down`, `ray job submit` and `ray down`, over SSH
to an sshd of the test's own on 127.0.0.1 (a non-default port, key logins only, its keys and config
in a temp folder). That sshd runs in a PID namespace of its own: `ray down` runs `ray stop` on the
head, which stops every Ray process it can see, and in the namespace it sees only this cluster's,
not the other Ray instances on this machine. The "head machine" also has its own HOME and TMPDIR
(sshd's SetEnv) under the temp folder, so nothing is written to the real home or /tmp/ray, and the
head's Ray ports are free ones, so it cannot collide with the other Ray tests.
"""

import copy
import getpass
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "cluster" / "local-ssh.yaml"
README = ROOT / "cluster" / "README.md"
MARK = "<!-- local-ssh walk-through: tests/test_launcher.py runs exactly these commands -->"
VENV_BIN = Path(sys.executable).parent
# The README's values that the test replaces by its own: the config (filled in), the dashboard's
# port (a free one), and rsync-down's destination (a temp folder instead of the repository root).
README_CONFIG = "cluster/local-ssh.yaml"
README_DASHBOARD = "127.0.0.1:8265"
PROMPT = "a lighthouse at dusk"


def readme_commands() -> list[str]:
    """The shell commands of the README's local-ssh walk-through, continuation lines joined."""
    text = README.read_text()
    assert MARK in text, f"{README} lost the marker line {MARK!r}"
    block = re.match(r"\s*```bash\n(.*?)\n```", text.split(MARK, 1)[1], re.DOTALL)
    assert block, "the marker must be followed by a ```bash block"
    return [c.strip() for c in block.group(1).replace("\\\n", " ").splitlines() if c.strip()]


def ray_subcommand(cmd: str) -> str:
    """`ray up -y x.yaml` -> "up"; `RAY_AUTH_MODE=token ray job submit ...` -> "job submit"."""
    words = [w for w in cmd.split() if "=" not in w or w.startswith("-")]
    assert words[0] == "ray", cmd
    return "job submit" if words[1] == "job" else words[1]


def test_readme_local_walkthrough_is_the_launcher_sequence():
    cmds = readme_commands()
    assert [ray_subcommand(c) for c in cmds] == [
        "get-auth-token", "up", "submit", "rsync-down", "job submit", "rsync-down", "down"]
    # What the slow test substitutes must be there to substitute.
    assert all(README_CONFIG in c for c in cmds if ray_subcommand(c) in ("up", "submit", "rsync-down", "down"))
    assert all(c.endswith(" .") for c in cmds if ray_subcommand(c) == "rsync-down")
    assert README_DASHBOARD in next(c for c in cmds if ray_subcommand(c) == "job submit")
    # Like for like: the poster and the job render the same image (same settings, same driver threads).
    # What poster.py gets: `ray submit` joins its arguments unquoted, and the head's shell splits them again.
    submit = shlex.split(" ".join(shlex.split(next(c for c in cmds if ray_subcommand(c) == "submit").split(" -- ", 1)[1])))
    job = shlex.split(next(c for c in cmds if ray_subcommand(c) == "job submit").split("apt_dist render ", 1)[1])
    same = ("--model", "--driver-threads", "--prompt", "--width", "--height", "--steps", "--workers", "--seed")

    def options(argv):
        return {a: argv[i + 1] for i, a in enumerate(argv) if a in same}

    assert options(submit) == options(job)
    assert options(submit)["--prompt"] == PROMPT


# ---- the slow end-to-end test -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _why_not() -> str | None:
    """Why this machine cannot run the walk-through (the test then skips), or None."""
    if sys.platform != "linux":
        return "needs Linux (an sshd in a PID namespace of its own)"
    if os.geteuid() != 0:
        return "needs root: an sshd of its own in a PID namespace of its own (CI runs as root)"
    if not Path("/usr/sbin/sshd").is_file():
        return "no /usr/sbin/sshd: install openssh-server (.ci/run does: apt-get install openssh-server)"
    for tool, package in (("ssh", "openssh-client"), ("ssh-keygen", "openssh-client"), ("rsync", "rsync"),
                          ("nc", "netcat-openbsd"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH: install {package} (.ci/run does)"
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot make a PID namespace (unshare: {r.stderr.strip()}); without one `ray down` would stop every Ray process here"
    return None


def fill_in(cfg: dict, *, cluster_name: str, key: Path, ssh_port: int, ports: dict[str, int]) -> dict:
    """local-ssh.yaml with what its comments tell a user to fill in, and free ports for the head."""
    cfg = copy.deepcopy(cfg)
    cfg["cluster_name"] = cluster_name
    assert cfg["auth"]["ssh_proxy_command"] == "nc %h 2222"
    cfg["auth"].update(ssh_user=getpass.getuser(), ssh_private_key=str(key), ssh_proxy_command=f"nc %h {ssh_port}")
    # The venv this test runs in (in CI, the repository's .venv; in a git worktree, the one it shares).
    assert cfg["file_mounts"]["~/.apt-dist-activate"] == ".venv/bin/activate"
    cfg["file_mounts"]["~/.apt-dist-activate"] = str(VENV_BIN / "activate")
    (i,) = [i for i, c in enumerate(cfg["head_start_ray_commands"]) if "ray start --head" in c]
    cmd = cfg["head_start_ray_commands"][i]
    for flag, default in (("--port", 6379), ("--dashboard-port", 8265)):
        assert f"{flag}={default}" in cmd, cmd
        cmd = cmd.replace(f"{flag}={default}", f"{flag}={ports[flag]}")
    extra = {k: v for k, v in ports.items() if k not in ("--port", "--dashboard-port")}
    cfg["head_start_ray_commands"][i] = cmd + "".join(f" {k}={v}" for k, v in extra.items())
    return cfg


def start_sshd(d: Path, port: int, head_env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    """sshd on 127.0.0.1:port, key logins only, as PID 1 of a new PID namespace; returns it and its client key."""
    key = d / "id_ed25519"
    for path in (key, d / "host_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, capture_output=True)
    shutil.copy(d / "id_ed25519.pub", d / "authorized_keys")
    setenv = " ".join(f"{k}={v}" for k, v in head_env.items())
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'host_ed25519'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n"
        f"SetEnv {setenv}\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder (compiled in)
    check = subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(d / "sshd_config")], capture_output=True, text=True)
    assert check.returncode == 0, f"sshd -t: {check.stderr}"
    # --kill-child: if the unshare process dies, sshd (the namespace's PID 1) dies, and the kernel then
    # ends every process left in the namespace.
    with open(d / "sshd.log", "w") as log:
        proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    deadline = time.time() + 30
    while True:
        probe = subprocess.run(
            ["ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
             f"{getpass.getuser()}@127.0.0.1", "echo $HOME"],
            capture_output=True, text=True, timeout=30,
        )
        if probe.returncode == 0:
            assert probe.stdout.strip() == head_env["HOME"], probe.stdout
            return proc, key
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"sshd did not accept the key on 127.0.0.1:{port}: {probe.stderr.strip()}; "
                               f"sshd log: {(d / 'sshd.log').read_text()[-2000:]}")
        time.sleep(0.5)


def _sshd_pid(unshare: subprocess.Popen) -> int | None:
    import psutil

    try:
        children = psutil.Process(unshare.pid).children()
    except psutil.NoSuchProcess:
        return None
    return children[0].pid if children else None


def stop_sshd(unshare: subprocess.Popen) -> None:
    pid = _sshd_pid(unshare)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)  # the namespace's PID 1: everything in it ends with it
    try:
        unshare.wait(timeout=20)
    except subprocess.TimeoutExpired:
        unshare.kill()  # --kill-child takes sshd along
        unshare.wait(timeout=20)


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def ours(d: Path, control_dir: str, namespace: str | None) -> list[str]:
    """What still runs of what this test started: processes in the head's PID namespace, or whose
    command line or environment names the temp folder, or the launcher's SSH control sockets (which
    the cluster's name picks)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == os.getpid():
            continue
        try:
            cmdline = " ".join(p.info["cmdline"] or [])
            env = "\0".join(f"{k}={v}" for k, v in p.environ().items())
            if (namespace and pid_namespace(p.pid) == namespace) or str(d) in cmdline or str(d) in env or control_dir in cmdline:
                found.append(f"{p.pid}: {cmdline[:200]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def wait_until_gone(what, timeout: float = 30.0) -> list[str]:
    deadline = time.time() + timeout
    while (left := what()) and time.time() < deadline:
        time.sleep(1)
    return left


@pytest.mark.slow
@pytest.mark.ray
def test_launcher_walkthrough_renders_over_ssh_and_leaves_nothing_running():
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    import psutil

    commands = readme_commands()
    # Short: Ray's socket paths (under the head's TMPDIR) must stay under 107 characters.
    d = Path(tempfile.mkdtemp(prefix="aptl-", dir="/tmp"))
    home, tmp, fetched = d / "home", d / "t", d / "fetched"
    for folder in (home, tmp, fetched):
        folder.mkdir()
    cluster_name = f"apt-dist-test-{d.name}"
    # The launcher's SSH control sockets: /tmp/ray_ssh_<user hash>/<cluster name hash>/ (command_runner.py).
    control_dir = f"/tmp/ray_ssh_{hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]}/{hashlib.sha256(cluster_name.encode()).hexdigest()[:10]}"
    ssh_port = _free_port()
    assert ssh_port != 22
    ports = {flag: _free_port() for flag in ("--port", "--dashboard-port", "--ray-client-server-port",
                                             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                             "--metrics-export-port", "--runtime-env-agent-port")}
    # One HOME for this machine's user, on both sides of SSH, as for a real user of local-ssh.yaml.
    # PYTHONPATH: this checkout's apt_dist on the head even where the venv's own install is another checkout's.
    head_env = {"HOME": str(home), "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    client_env = {k: v for k, v in os.environ.items()
                  if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR")}
    client_env.update(head_env, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    # sshd took the key already (start_sshd): `ray up` that cannot SSH in 2 minutes fails (Ray waits 900 s).
    client_env.setdefault("AUTOSCALER_NODE_START_WAIT_S", "120")

    sshd, namespace, launched, outputs, t0 = None, None, False, {}, time.time()
    timings = []
    try:
        try:
            sshd, key = start_sshd(d, ssh_port, head_env)
        except RuntimeError as e:
            pytest.skip(f"no SSH server to launch on: {e}")
        namespace = pid_namespace(_sshd_pid(sshd))
        config = d / "local-ssh.yaml"
        config.write_text(yaml.safe_dump(fill_in(yaml.safe_load(CONFIG.read_text()), cluster_name=cluster_name,
                                                 key=key, ssh_port=ssh_port, ports=ports)))

        for cmd in commands:
            sub = ray_subcommand(cmd)
            run = cmd.replace(README_CONFIG, str(config)).replace(README_DASHBOARD, f"127.0.0.1:{ports['--dashboard-port']}")
            if sub == "rsync-down":
                run = run[: -len(" .")] + f" {fetched}/"
            launched = launched or sub == "up"
            t = time.time()
            try:
                r = subprocess.run(["bash", "-c", run], cwd=ROOT, env=client_env, capture_output=True, text=True,
                                   timeout=900, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired as e:
                pytest.fail(f"`{cmd}` did not finish in {e.timeout:.0f} s:\n{(e.stdout or b'')[-4000:]!r}")
            timings.append(f"{sub}: {time.time() - t:.0f} s")
            outputs[sub] = out = r.stdout + r.stderr
            assert r.returncode == 0, f"`{cmd}` failed ({r.returncode}):\n{out[-6000:]}"
            if sub == "down":
                launched = False
                # Before sshd stops (which would end them anyway): `ray down` itself stopped the head's Ray.
                left = wait_until_gone(lambda: [p for p in ours(d, control_dir, namespace)
                                                if not re.search(r"\d+: (sshd|ssh\b|nc\b|unshare\b|\S*sshd)", p)])
                assert not left, "`ray down` left these running:\n" + "\n".join(left)

        # poster.py under `ray submit`: it says where it wrote the image, on the head (its HOME).
        assert re.search(rf"^wrote {re.escape(str(home / 'posters' / 'p.png'))} on ", outputs["submit"], re.MULTILINE), outputs["submit"][-3000:]
        assert "succeeded" in outputs["job submit"], outputs["job submit"][-3000:]
        images = {}
        for name in ("p.png", "job.png"):
            with Image.open(fetched / name) as img:
                assert img.size == (256, 256)
                assert img.info["prompt"] == PROMPT
                cfg = json.loads(img.info["apt_dist_config"])
                assert (cfg["model"], cfg["steps"], cfg["width"], cfg["height"]) == ("tiny", 4, 256, 256)
                images[name] = np.asarray(img.convert("RGB"))
                assert images[name].std() > 0  # an image, not a blank
        # The same render through examples/poster.py (ray submit) and `apt-dist render` (a Ray job).
        assert np.array_equal(images["p.png"], images["job.png"])
    finally:
        if launched and sshd is not None:
            subprocess.run(["ray", "down", "-y", str(d / "local-ssh.yaml")], cwd=ROOT, env=client_env,
                           capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
        if sshd is not None:
            stop_sshd(sshd)
        left = wait_until_gone(lambda: ours(d, control_dir, namespace))
        for line in left:  # only what this test started, by id
            try:
                psutil.Process(int(line.split(":")[0])).kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(control_dir, ignore_errors=True)
        try:
            os.rmdir(Path(control_dir).parent)  # the launcher's per-user folder, if no other cluster uses it
        except OSError:
            pass
        print(f"launcher walk-through: {time.time() - t0:.0f} s ({', '.join(timings)})")
    assert not left, "still running after `ray down` and stopping sshd:\n" + "\n".join(left)
