"""Mutation check: each listed change to the production sampler must make the reference tests fail.

A test suite that compares the sampler only with itself passes whatever the sampler computes.
This script copies the package, makes one change to `apt_dist/sampler.py` (each must match
exactly once, so the check breaks loudly when the sampler is rewritten), runs the reference
tests against the copy, and requires them to fail on a wrong image (an assertion on the
latents, not an import or syntax error). The unchanged copy must pass first.

Usage (CI runs it after the suite):  python tests/mutation_check.py [-k PYTEST_SELECTION]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MUTATIONS = {
    "fusion weight c2 -> 1 - c2": (
        "x = torch.lerp(local.result(), dilated.result(), c2)",
        "x = torch.lerp(local.result(), dilated.result(), 1 - c2)",
    ),
    "skip-residual weight c1 -> 1 - c1": (
        "x = torch.lerp(S.add_noise(sched, z, noise, i), x, 1 - c1)",
        "x = torch.lerp(S.add_noise(sched, z, noise, i), x, c1)",
    ),
    "Statistical Matching skipped": (
        "if cfg.sm_on:  # Statistical Matching",
        "if False:  # Statistical Matching",
    ),
    "eta 0.5 in every phase": (
        "sched = self.schedule(phase.eta)  # Scale-aware Scheduling",
        "sched = self.schedule(0.5)  # Scale-aware Scheduling",
    ),
    "shortcut starts one step late": (
        "x = S.add_noise(sched, z, noise, phase.start_step)  # the shortcut",
        ("phase = __import__('dataclasses').replace(phase, start_step=phase.start_step + 1, steps=phase.steps - 1)\n"
         "        x = S.add_noise(sched, z, noise, phase.start_step)  # the shortcut"),
    ),
    "blur sigma doubled": (
        "dilated = DilatedViews(x, d, cfg.sigma * c3, sched, i)",
        "dilated = DilatedViews(x, d, 2 * cfg.sigma * c3, sched, i)",
    ),
}


def run_tests(package_parent: Path, selection: str) -> tuple[int, str]:
    # Run from the copy's folder: `python -m` puts the working directory first on sys.path.
    env = dict(os.environ, PYTHONPATH=str(package_parent))
    where = subprocess.run([sys.executable, "-c", "import apt_dist; print(apt_dist.__file__)"], cwd=package_parent, env=env,
                           capture_output=True, text=True, check=False).stdout.strip()
    if not where.startswith(str(package_parent)):
        raise SystemExit(f"mutation check: the tests would import {where!r}, not the copy in {package_parent}")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_reference.py"),
           "-m", "not slow", "-k", selection]
    proc = subprocess.run(cmd, cwd=package_parent, env=env, capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="apt_euler_3phases", help="reference tests to run per mutation (default: the APT case)")
    args = ap.parse_args()
    source = (ROOT / "apt_dist" / "sampler.py").read_text()
    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="apt-dist-mutation-") as tmp:
        for name, (old, new) in [("(none)", ("", ""))] + list(MUTATIONS.items()):
            copy = Path(tmp) / name.replace(" ", "_").replace(">", "").replace("/", "")
            shutil.copytree(ROOT / "apt_dist", copy / "apt_dist", ignore=shutil.ignore_patterns("__pycache__"))
            if old:
                if source.count(old) != 1:
                    rows.append((name, "NOT APPLIED", f"pattern found {source.count(old)} times in sampler.py"))
                    ok = False
                    continue
                (copy / "apt_dist" / "sampler.py").write_text(source.replace(old, new))
            t0 = time.perf_counter()
            rc, out = run_tests(copy, args.k)
            seconds = time.perf_counter() - t0
            if not old:
                good = rc == 0
                verdict = "passes" if good else "FAILS (the unchanged sampler must pass)"
            else:
                good = rc == 1 and "Mismatched elements" in out
                diff = re.search(r"Greatest absolute difference: ([0-9.e+-]+)", out)
                verdict = (f"caught: latents differ by up to {float(diff.group(1)):.3g}" if good and diff else "caught" if good
                           else "NOT CAUGHT" if rc == 0 else "failed, but not on the image")
            ok &= good
            rows.append((name, verdict, f"{seconds:.0f} s"))
            if not good:
                print(out[-3000:], file=sys.stderr)
    width = max(len(r[0]) for r in rows)
    print(f"{'mutation of apt_dist/sampler.py':<{width}}  result")
    for name, verdict, extra in rows:
        print(f"{name:<{width}}  {verdict} ({extra})")
    print("mutation check:", "every mutation caught" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
