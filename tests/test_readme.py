"""Every code block in README.md that a user would paste runs here, so that none can rot.

A block runs as written, but for what the `<!-- readme-test: ... -->` comments just above it say:
`replace "A" "B"` (smaller sizes, or the install step left out: the suite runs in an installed
environment) or `skip (why)` (a GPU, a cluster, the test suite itself).
"""

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"((?:<!-- readme-test: .*? -->\n)*)```(\w*)\n(.*?)```", re.DOTALL)
MARK = re.compile(r"<!-- readme-test: (.*?) -->")


@dataclass
class Block:
    line: int
    lang: str
    text: str  # as written in the README
    code: str  # as run
    skip: str | None


def readme_blocks(path: Path = ROOT / "README.md") -> list[Block]:
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        code, skip = m.group(3), None
        for mark in MARK.findall(m.group(1)):
            words = shlex.split(mark)
            if words[0] == "skip":
                skip = " ".join(words[1:]) or "no reason given"
            elif words[0] == "replace" and len(words) == 3:
                assert words[1] in code, f"README line {text[: m.start()].count(chr(10)) + 1}: {words[1]!r} not in its block"
                code = code.replace(words[1], words[2])
            else:
                raise AssertionError(f"unknown readme-test comment: {mark!r}")
        line = text[: m.start(2)].count("\n") + 1
        out.append(Block(line, m.group(2), m.group(3), code, skip))
    return out


BLOCKS = readme_blocks()
RUN = [b for b in BLOCKS if b.skip is None]


def test_every_readme_block_is_bash_or_python_and_runs_here_or_says_why_not():
    assert len(BLOCKS) >= 6
    assert {b.lang for b in BLOCKS} <= {"bash", "python"}, [(b.line, b.lang) for b in BLOCKS]
    assert all(b.skip.strip("() ") for b in BLOCKS if b.skip is not None)
    assert {b.lang for b in RUN} == {"bash", "python"}  # the quick start, the CLI and the Python API run
    quick = next(b for b in RUN if "pip install" in b.text)
    assert quick.code.startswith("apt-dist render ") and "--workers 2" in quick.code  # only the install is left out


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("block", RUN, ids=[f"line{b.line}-{b.lang}" for b in RUN])
def test_readme_block_runs(block, tmp_path):
    env = os.environ | {
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),  # apt-dist of this venv
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    cmd = ["bash", "-euo", "pipefail", "-c", block.code] if block.lang == "bash" else [sys.executable, "-c", block.code]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"README line {block.line}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    for name in set(re.findall(r"[\w.-]+\.png", block.code)):  # every image the block names was written
        assert (tmp_path / name).is_file(), (name, done.stdout[-2000:])


def test_the_apt_dist_commands_of_the_blocks_not_run_here_parse():
    """Blocks that need a GPU or a cluster do not run here; their apt-dist commands must still be valid."""
    from apt_dist.cli import build_parser

    commands = []
    for block in BLOCKS:
        if block.skip is None or block.lang != "bash":
            continue
        for line in block.code.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0]
            m = re.search(r"(?:^|\s)(?:apt-dist|python -m apt_dist) ((?:render|plan) .*)", line)
            if m:
                commands.append(m.group(1))
    assert len(commands) >= 2  # the GPU render and the job's render
    for command in commands:
        ns = build_parser().parse_args(shlex.split(command))
        assert ns.prompt and ns.width >= 1024, command
