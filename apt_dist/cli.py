"""The `apt-dist` command: render, upscale, plan.

Every RenderConfig field is an option (`--field-name`), except guidance_scale, which
is `--guidance`, and the input picture's fields, which only `upscale` has (IMAGE,
`--init-strength`, `--crop center` / `--pad`). Bad input exits with code 2 and one line naming the option, before
any model is loaded. `--help` shows every option's default. (The benchmarks are
`python benchmarks/bench.py`, outside the package.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import traceback
import typing

from . import __version__
from .config import ConfigError, RenderConfig, parse_eta

DEFAULT_CALL_TIMEOUT_FLOOR_S = 60.0  # ray_executor.CALL_TIMEOUT_FLOOR_S (not imported: keeps --help light)

OPTION_NAMES = {"guidance_scale": "--guidance", "loras": "--lora"}
HELP = {
    "prompt": "what to render (default: empty)",
    "negative_prompt": "what to avoid (default: empty, SDXL's zero embedding)",
    "width": "output width in pixels, a multiple of 8",
    "height": "output height in pixels, a multiple of 8",
    "seed": "render seed: every random draw comes from it",
    "model": "tiny (built in, random weights) | sdxl-random | hub id | diffusers folder | .safetensors file",
    "dtype": "UNet dtype: auto (float16 on CUDA, float32 on CPU) | float32 | float16 | bfloat16",
    "device": "auto | cpu | cuda | cuda:N (in-process executor)",
    "loras": "a LoRA to fuse into the model, FILE[:SCALE] (scale 1.0 by default); repeat for several",
    "vae": "a separate VAE: a diffusers AutoencoderKL folder or a single .safetensors file (e.g. an fp16-fixed SDXL VAE)",
    "vae_dtype": "VAE dtype: float32 (default, safe) | float16 (only for fp16-safe VAEs, such as fp16-fixed ones) | bfloat16",
    "model_config": "single-file models: a diffusers config folder to read them with (default: built-in SDXL base configs)",
    "method": "apt | demofusion: presets for the three APT parts below (default: apt)",
    "scheduler": "auto (the model's own: Euler or DDIM) | euler | ddim; timesteps, betas and prediction type always "
                 "come from the model's scheduler config",
    "steps": "denoising steps N of the schedule",
    "guidance_scale": "classifier-free guidance scale",
    "statistical_matching": "APT Statistical Matching of dilated sub-lattices (default: as --method says: on for apt, off for demofusion)",
    "sm_stats": "Statistical Matching statistics: channel | global",
    "scale_aware_scheduling": "APT Scale-aware Scheduling (default: as --method says: on for apt, off for demofusion)",
    "eta": "SaS eta per phase, 'PHASE:ETA,...'; later phases keep the last (default: 2:2.0,3:3.0,4:3.5)",
    "shortcut": "apt: each upscaling phase runs the last SHORTCUT of the steps, from step round((1 - SHORTCUT) x steps) "
                "(default 0.6, the paper's 30 of 50)",
    "shortcut_steps": "T0: steps run in each upscaling phase, overriding --shortcut (default: as --shortcut for apt, all for demofusion)",
    "cosine_scale_1": "DemoFusion skip-residual cosine scale",
    "cosine_scale_2": "DemoFusion local/dilated fusion cosine scale",
    "cosine_scale_3": "DemoFusion blur cosine scale",
    "sigma": "Gaussian blur sigma of the dilated branch",
    "stride": "local window stride in latents (default: native window / 2)",
    "jitter": "jitter the local windows every step",
    "anchor_renorm": "renormalise each phase to the reference latent's statistics",
    "view_batch_size": "patches per UNet call, or auto: sized for the workers' device (CPU: 16; CUDA: the largest of 8, 4, "
                       "2, 1 that fits its memory), never for their number; bigger calls run faster per patch but give "
                       "fewer units to share at each step's barrier (see plan --workers N) (default: auto)",
    "split_guidance": "run the two guidance branches as separate UNet calls: twice the units, half the rows (finer "
                      "load balance, slower per patch) (default: auto, which batches them on every device)",
    "gpu_memory": "GiB of GPU memory one worker may use: sizes auto units and checks that a worker fits, before any "
                  "work (default: the GPU's, read on the workers; plan: none, no memory estimate)",
    "compile": "torch.compile the UNet on every worker (and in-process); the first render of each shape pays the "
               "compile, later ones read torch's cache (TORCHINDUCTOR_CACHE_DIR)",
    "decode_tile": "VAE decode tile in latents, also upscale's encode tile (default: native window)",
    "decode_overlap": "VAE decode tile overlap in latents (default: tile / 4)",
    "decode_context": "latents of surroundings decoded with each tile and cropped off (default: max(8, tile / 8); "
                      "upscale's encode: max(16, tile / 4))",
    "save_phases": "also write each phase's image beside the output",
    "init_strength": "0: upscale the picture as it is; (0, 1]: first re-noise it and denoise int(steps x STRENGTH) steps "
                     "at the native size, as img2img does (more change the higher)",
}
INIT_FIELDS = ("init_image", "init_strength", "init_fit")  # upscale's: IMAGE, --init-strength, --crop/--pad


# `apt-dist plan` with the tiny model (a 128 px window) warns above this many phases: a size planned for SDXL.
TINY_PHASES_WARNING = 8


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already says its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: {_show_default(action.default)})"


def _show_default(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value == "":
        return "empty"
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    return str(value).replace("%", "%%")


def add_config_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = (), helps: dict | None = None) -> None:
    """One option per RenderConfig field but those in `skip` (`helps`: help texts replacing HELP's). The default
    stays RenderConfig's (shown in --help), so that an option not given is not passed on: callers may put their
    own defaults under the config."""
    hints = typing.get_type_hints(RenderConfig)
    for f in dataclasses.fields(RenderConfig):
        if f.name in skip:
            continue
        opt = OPTION_NAMES.get(f.name, "--" + f.name.replace("_", "-"))
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = (helps or {}).get(f.name, HELP.get(f.name, ""))
        if "(default" not in text:
            text = f"{text} (default: {_show_default(default)})"
        kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": text}
        if f.name == "eta":
            p.add_argument(opt, type=parse_eta, **kw)
        elif f.name == "view_batch_size":
            p.add_argument(opt, type=_auto_or_int, metavar="N|auto", **kw)
        elif f.name == "gpu_memory":
            p.add_argument(opt, type=float, metavar="GiB", **kw)
        elif f.name == "split_guidance":
            p.add_argument(opt, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "loras":
            p.add_argument(opt, action="append", metavar="FILE[:SCALE]", **kw)
        elif hint in (bool, bool | None):
            p.add_argument(opt, action=argparse.BooleanOptionalAction, **kw)
        else:
            base = next(a for a in typing.get_args(hint) if a is not type(None)) if typing.get_args(hint) else hint
            p.add_argument(opt, type=base, **kw)


def _auto_or_int(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or auto, got {text!r}") from None


def config_from_args(ns: argparse.Namespace) -> RenderConfig:
    names = {f.name for f in dataclasses.fields(RenderConfig)}
    return RenderConfig(**{k: v for k, v in vars(ns).items() if k in names})


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="apt-dist", description="APT high-resolution rendering (DemoFusion + APT on SDXL), on one GPU or many.")
    p.add_argument("--version", action="version", version=f"apt-dist {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    r = sub.add_parser("render", help="render an image", formatter_class=HelpFormatter)
    add_config_options(r, skip=INIT_FIELDS)
    _add_render_options(r)

    u = sub.add_parser("upscale", help="upscale an existing picture (APT from it instead of from text)",
                       formatter_class=HelpFormatter,
                       description="Upscale IMAGE: it is resized to the model's native size and encoded with the VAE, "
                                   "and takes the place of phase 1's result; the upscaling phases run as for a render.")
    u.add_argument("init_image", metavar="IMAGE", help="the picture to upscale (PNG, JPEG, WebP, TIFF, ...)")
    add_config_options(u, skip=("init_image", "init_fit"), helps={
        "width": "output width in pixels, a multiple of 8, with --height (default: from --scale)",
        "height": "output height in pixels, a multiple of 8, with --width (default: from --scale)"})
    t = u.add_argument_group("target size and fit")
    t.add_argument("--scale", type=int, choices=(2, 3, 4), default=None,
                   help="output = SCALE x the model's native size (phase 1: its long side the native window, "
                        "the picture's aspect) (default: 2, unless --width/--height are given)")
    fit = t.add_mutually_exclusive_group()
    fit.add_argument("--crop", choices=("center",), default=None,
                     help="a --width/--height of another aspect than the picture's: crop the picture's centre to it "
                          "(default: refuse another aspect)")
    fit.add_argument("--pad", action="store_true", help="... or pad the picture with white to it")
    _add_render_options(u, out_default="apt-dist-upscaled.png")

    m = sub.add_parser("render-many", help="render a batch of jobs at once on one pool of workers",
                       formatter_class=HelpFormatter,
                       description="Render every job of JOBS (one JSON object per line: RenderConfig's fields, e.g. "
                                   '{"prompt": "a lighthouse", "width": 2048, "height": 2048, "seed": 3, "out": "a.png"}) '
                                   "at once: the renders share the workers, and each fills the others' idle time at its "
                                   "step barriers. The options below are every job's defaults; a line's keys override them.")
    m.add_argument("jobs", metavar="JOBS", help="the batch: a JSON-lines file")
    add_config_options(m, skip=INIT_FIELDS)
    m.add_argument("--out-dir", required=True, help="folder of the images (made if missing); a job's \"out\" is a path "
                                                    "under it (default: job-LINE.png)")
    m.add_argument("--checkpoint-dir", default=None,
                   help="keep each job's checkpoint here; the same command run again skips the jobs whose image was "
                        "written and resumes the others (default: none)")
    m.add_argument("--policy", choices=("longest", "earliest"), default="longest",
                   help="which render has the workers first while the others backfill: longest = the most UNet work "
                        "left (the renders end close together, the pool busy to the end); earliest = the earliest "
                        "submitted (renders end in submission order)")
    m.add_argument("--strict", action="store_true", help="a bad line stops the batch before any work (default: it is "
                                                         "reported and the other jobs go on)")
    _add_render_options(m, single=False)

    pl = sub.add_parser("plan", help="print the plan of a render (phases, patches, UNet evaluations); loads no model",
                        formatter_class=HelpFormatter)
    add_config_options(pl, skip=INIT_FIELDS)
    pl.add_argument("--json", action="store_true", help="print JSON")
    pl.add_argument("--debug", action="store_true", help="show the traceback of a failure instead of one line")
    pl.add_argument("--workers", type=int, default=None, help="also estimate wall time on this many workers (default: no estimate)")
    pl.add_argument("--seconds-per-patch", type=float, default=0.035, help="UNet time per patch with guidance (H100 SDXL: ~0.035)")
    return p


def _add_render_options(r: argparse.ArgumentParser, out_default: str = "apt-dist.png", single: bool = True) -> None:
    """What render, upscale and render-many share beside the RenderConfig fields: output, checkpoints, Ray, --debug."""
    if single:
        r.add_argument("--out", default=out_default, help="output PNG path (written atomically)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--driver-threads", type=int, default=None,
                   help="torch threads of this process: the driver's tensor work, and without --workers the UNet's too "
                        "(default: torch's own, one per core). With GPU workers on a many-core head node, 4 made the "
                        "driver faster (benchmarks/README.md). CPU reductions, so an image's last bits, depend on thread counts")
    if single:
        r.add_argument("--checkpoint", default=None,
                       help="write the render's state here after every phase (and within a phase, see --checkpoint-every); "
                            "if it exists (same settings, checked in full), resume from it (default: none)")
    r.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="seconds of work between two checkpoints within a phase (default 60)")
    r.add_argument("--restart", action="store_true",
                   help="ignore an existing --checkpoint and render from the start (it is overwritten as the render goes)"
                   if single else "ignore the checkpoints and done-records in --checkpoint-dir: render every job again")
    g = r.add_argument_group("distributed (Ray)")
    g.add_argument("--workers", type=int, default=None, help="render on N Ray workers, one UNet replica each "
                   "(default: in this process, no Ray; with --address: 1)")
    g.add_argument("--address", default=None,
                   help="Ray cluster to join: auto | HOST:PORT (default: a local Ray instance, or the cluster of a Ray job)")
    g.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker, fractions allowed (default: 1 if the cluster has GPUs, else 0)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker")
    g.add_argument("--placement-strategy", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                   help="how the placement group spreads workers over nodes")
    g.add_argument("--placement-timeout", type=float, default=120.0, help="seconds to wait for the cluster to provide every worker")
    g.add_argument("--max-restarts", type=int, default=2, help="times Ray may restart a dead worker")
    g.add_argument("--call-timeout", type=float, default=None, metavar="SECONDS",
                   help="a worker call without a reply for this long counts as a hung worker: its work is re-queued and "
                        "the worker is killed and restarted through Ray (default: 10 x the median time of recent calls "
                        f"for as much work, at least {DEFAULT_CALL_TIMEOUT_FLOOR_S:g} s)")
    g.add_argument("--worker-return-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long a lost worker may take to come back (restarted by Ray) before it counts as gone for "
                        "good (default 300)")

    r.add_argument("--debug", action="store_true", help="print the traceback of a runtime failure")


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return _main(ns)
    except ConfigError as e:
        print(f"apt-dist {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a runtime failure: one line, the traceback with --debug
        from .loading import ModelLoadError

        if getattr(ns, "debug", False):
            traceback.print_exc()
        print(f"apt-dist {ns.command}: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code if isinstance(e, ModelLoadError) else 1


def _one_line(e: BaseException) -> str:
    from .loading import ModelLoadError
    from .ray_executor import ClusterError, WorkerError
    from .sampler import RenderError

    text = " ".join(str(e).split()) or type(e).__name__
    worded = (RenderError, ClusterError, WorkerError, ModelLoadError, RuntimeFailure)
    return text if isinstance(e, worded) else f"{type(e).__name__}: {text}"


class RuntimeFailure(RuntimeError):
    """A failure after the input was accepted, already worded for the user."""


def _main(ns) -> int:
    if ns.command == "render-many":
        _set_driver_threads(ns.driver_threads)
        configure_logging()
        return _render_many(ns)
    config = (_upscale_config(ns) if ns.command == "upscale" else config_from_args(ns)).validate()
    _set_driver_threads(getattr(ns, "driver_threads", None))
    if ns.command in ("render", "upscale"):
        configure_logging()
        return _render(config, ns)
    if ns.command == "plan":
        return _plan(config, ns)
    return 0


def _upscale_config(ns) -> RenderConfig:
    """upscale's RenderConfig: the picture, its fit, and the target from --scale or --width/--height."""
    from .init_image import check_image, scaled_size

    config = config_from_args(ns)
    config.init_fit = "crop" if ns.crop else "pad" if ns.pad else "exact"
    size = check_image(config.init_image)  # not an image, zero-sized, too large: refused before anything else
    given = [o for o in ("width", "height") if hasattr(ns, o)]
    if ns.scale is not None and given:
        raise ConfigError("--scale", f"give --scale or --width/--height, not both (got --scale {ns.scale} and --{given[0]})")
    if len(given) == 1:
        other = "height" if given[0] == "width" else "width"
        raise ConfigError(f"--{other}", f"give both --width and --height (or --scale), got only --{given[0]}")
    if not given:
        from .loading import check_source, model_source
        from .models import model_info

        config.validate()  # the model's name, before its configs are read
        check_source(model_source(config))
        info = model_info(model_source(config))
        config.width, config.height = scaled_size(size, ns.scale or 2, info.native_window, info.vae_scale)
    return config


class _LogToStderr(logging.Handler):
    """One line per record on stderr, through tqdm.write: the progress bar is cleared and redrawn around it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(f"apt-dist: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)
        except Exception:
            self.handleError(record)


_HANDLER = _LogToStderr(logging.INFO)


def configure_logging() -> None:
    """Show the package's log (worker losses, restarts, re-queues as they happen) on stderr; idempotent."""
    logger = logging.getLogger("apt_dist")
    if _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)
    logger.setLevel(logging.INFO)


def _set_driver_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise ConfigError("--driver-threads", f"must be an integer >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _render(config: RenderConfig, ns) -> int:
    from .outputs import check_output_path

    problem = check_output_path(ns.out)
    if problem:
        raise ConfigError("--out", problem)
    if ns.checkpoint:
        from .outputs import check_writable_file

        problem = check_writable_file(ns.checkpoint)
        if problem:
            raise ConfigError("--checkpoint", problem)
    if not (ns.checkpoint_every > 0 and ns.checkpoint_every < float("inf")):
        raise ConfigError("--checkpoint-every", f"must be a number of seconds > 0, got {ns.checkpoint_every}")
    executor = _executor_from_args(ns)  # checks its options; starts nothing yet

    from . import checkpoint as ckpt
    from .cleanup import remove_stale_files
    from .loading import prepare
    from .planning import build_plan
    from .sampler import render

    _, info, _, _ = prepare(config)  # the model's files and configs checked before any weights load
    # Model-dependent checks (steps, sizes, and that a worker's GPU fits the units), still before any weights.
    plan = build_plan(config, info.native_window, info.vae_scale, info.scheduler, info.latent_channels,
                      device=_worker_device(config, ns))
    if ns.checkpoint and not ns.restart:  # a checkpoint that cannot be trusted is refused here, before any work
        ckpt.load(ns.checkpoint, config, plan, info.latent_channels)
    if config.init_image is not None:
        first = plan.phases[0]
        print(f"upscaling {config.init_image} ({_size(config.init_image)}), phase 1 at {first.width}x{first.height}"
              + (f", {config.init_fit} to the target's aspect" if config.init_fit != "exact" else "")
              + (f", phase 1 img2img at strength {config.init_strength:g} ({first.steps} steps)" if config.init_strength else ""))
    remove_stale_files()  # what drivers killed on this node left behind
    try:
        result = render(config, executor=executor, progress=not ns.no_progress, checkpoint=ns.checkpoint,
                        checkpoint_every_s=ns.checkpoint_every, restart=ns.restart)
    finally:
        if executor is not None:
            executor.close()
    from .outputs import write_result

    try:
        paths = write_result(result, ns.out)
    except Exception as e:
        raise RuntimeFailure(f"could not write {ns.out} ({type(e).__name__}: {e}); {_keep_result(result, ns)}") from e
    print(
        f"done in {result.seconds:.1f} s: {len(result.plan.phases)} phases to {config.width}x{config.height}, "
        f"{result.patch_evals} UNet patch evaluations (x2 guidance branches), wrote {paths[0]}"
        + (f" and {len(paths) - 1} phase images" if len(paths) > 1 else "")
        + (f" (resumed after phase {result.resumed_phases} from {ns.checkpoint})" if result.resumed_phases else "")
    )
    _print_workers(result.executor_summary)
    return 0


def _render_many(ns) -> int:
    """Exit 0 when every job rendered (or had been), 1 when some failed or were bad lines, 2 on bad input before work."""
    from pathlib import Path

    from .many import read_jobs, render_many

    if not (ns.checkpoint_every > 0 and ns.checkpoint_every < float("inf")):
        raise ConfigError("--checkpoint-every", f"must be a number of seconds > 0, got {ns.checkpoint_every}")
    for opt, folder in (("--out-dir", ns.out_dir), ("--checkpoint-dir", ns.checkpoint_dir)):
        if folder is not None:
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(opt, f"cannot make folder {folder!r}: {e.strerror or e}") from None
    names = {f.name for f in dataclasses.fields(RenderConfig)}
    defaults = {k: v for k, v in vars(ns).items() if k in names}
    jobs, problems = read_jobs(ns.jobs, ns.out_dir, defaults)
    for p in problems:
        print(f"apt-dist render-many: error: {p}", file=sys.stderr)
    if problems and ns.strict:
        raise ConfigError("JOBS", f"{len(problems)} bad line(s) (--strict: nothing rendered)")
    if not jobs:
        raise ConfigError("JOBS", f"no job to render in {ns.jobs}")
    executor = _executor_from_args(ns)
    from .cleanup import remove_stale_files
    from .executor import InProcessExecutor

    remove_stale_files()
    executor = executor or InProcessExecutor()
    print(f"{len(jobs)} job(s) from {ns.jobs}" + (f", {len(problems)} bad line(s) left out" if problems else "")
          + f", on {getattr(executor, 'num_workers', 1)} worker(s)" + ("" if hasattr(executor, "num_workers") else " (in this process)"))
    done, failed = [], 0
    pool_bar = None if ns.no_progress else _PoolLine(executor, len(jobs))
    try:
        for r in render_many(jobs, executor, checkpoint_dir=ns.checkpoint_dir, checkpoint_every_s=ns.checkpoint_every,
                             restart=ns.restart, progress=not ns.no_progress, policy=ns.policy):
            failed += r.error is not None
            done.append(r)
            if pool_bar is not None:
                pool_bar.update()
            if r.error:
                _write_line(f"failed {r.job.name}: {r.error}")
            else:
                resumed = r.result is not None and r.result.resumed_phases
                _write_line(f"{'done before' if r.skipped else 'done'} {r.job.name} in {r.seconds:.1f} s: {r.job.out}"
                            + (f" (resumed after phase {resumed})" if resumed else ""))
        wall = max((r.finished_s for r in done), default=0.0)
        summary = executor.summary()
    finally:
        if pool_bar is not None:
            pool_bar.close()
        executor.close()
    _print_jobs(sorted(done, key=lambda r: r.index), summary, wall)
    return 1 if failed or problems else 0


class _PoolLine:
    """A progress line for the pool: jobs finished, busy workers, queued work units (refreshed twice a second)."""

    def __init__(self, executor, total: int):
        import threading

        from tqdm.auto import tqdm

        self.executor, self.bar = executor, tqdm(total=total, unit="job", desc="pool", dynamic_ncols=True, position=0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            s = self.executor.pool_status()
            if s:
                self.bar.set_postfix_str(f"workers busy {s['busy']}/{s['workers']}, units queued {s['queued']}")

    def update(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.bar.close()


def _write_line(text: str) -> None:
    from tqdm import tqdm

    tqdm.write(text)


def _print_jobs(results: list, summary: dict, wall: float) -> None:
    print(f"  {'job':<24} {'size':>11} {'wall s':>8} {'patch evals':>11}  output")
    for r in results:
        c = r.job.config
        evals = r.result.patch_evals if r.result is not None else "-"
        what = "failed" if r.error else (r.job.out + (" (done before)" if r.skipped else ""))
        print(f"  {r.job.name[-24:]:<24} {f'{c.width}x{c.height}':>11} {r.seconds:>8.1f} {evals:>11}  {what}")
    workers = summary.get("workers") or []
    if workers and wall > 0:
        busy = sum(w["busy_s"] for w in workers)
        print(f"  pool: {len(workers)} workers, {wall:.1f} s, utilisation {busy / (len(workers) * wall):.0%} "
              "(busy worker-seconds / workers x wall)")


def _size(image) -> str:
    from .init_image import check_image

    w, h = check_image(image)
    return f"{w}x{h}"


def _worker_device(config: RenderConfig, ns):
    """The workers' devices.DeviceProfile as far as the options tell before any starts (None: this process's device).
    Ray workers with GPUs and --gpu-memory are checked here, before any work; without it, once they run."""
    from .devices import DeviceProfile, gpu_workers

    if ns.workers is None and ns.address is None:
        return None
    if ns.gpus_per_worker == 0:
        return DeviceProfile("cpu")
    return gpu_workers(config.gpu_memory) if config.gpu_memory is not None else None


def _keep_result(result, ns) -> str:
    """Save a finished render whose image could not be written as a checkpoint (every phase: decode only on
    resume), at --checkpoint, else beside the output, else in the temp folder; says where and how to resume."""
    import tempfile
    from pathlib import Path

    from . import checkpoint as ckpt

    out = Path(ns.out)
    places = [Path(ns.checkpoint)] if ns.checkpoint else []
    places += [out.with_name(out.name + ".ckpt"), Path(tempfile.gettempdir()) / (out.name + ".ckpt")]
    failures = []
    for place in places:
        try:
            ckpt.save(place, result.config, result.phase_latents, result.generator_state)
        except (OSError, RuntimeError) as e:  # torch.save's errors are RuntimeErrors
            failures.append(f"{place}: {type(e).__name__}")
            continue
        return (f"the rendered latents are saved in {place}: run again with --checkpoint {place} "
                "(and an --out that can be written) to write the image without rendering again")
    return "saving the rendered latents as a checkpoint failed too (" + ", ".join(failures) + ")"


def _executor_from_args(ns):
    """A RayExecutor when --workers or --address is given, else None (in-process)."""
    if ns.workers is None and ns.address is None:
        return None
    workers = 1 if ns.workers is None else ns.workers
    if workers < 1:
        raise ConfigError("--workers", f"must be an integer >= 1, got {workers}")
    if ns.gpus_per_worker is not None and not (0 <= ns.gpus_per_worker):
        raise ConfigError("--gpus-per-worker", f"must be >= 0, got {ns.gpus_per_worker}")
    if ns.cpus_per_worker < 0:
        raise ConfigError("--cpus-per-worker", f"must be >= 0, got {ns.cpus_per_worker}")
    if ns.placement_timeout <= 0:
        raise ConfigError("--placement-timeout", f"must be > 0 seconds, got {ns.placement_timeout}")
    if ns.max_restarts < 0:
        raise ConfigError("--max-restarts", f"must be >= 0, got {ns.max_restarts}")
    if ns.call_timeout is not None and not 0 < ns.call_timeout < float("inf"):
        raise ConfigError("--call-timeout", f"must be a number of seconds > 0, got {ns.call_timeout}")
    if not 0 < ns.worker_return_timeout < float("inf"):
        raise ConfigError("--worker-return-timeout", f"must be a number of seconds > 0, got {ns.worker_return_timeout}")
    from .ray_executor import RayExecutor, address_problem

    problem = address_problem(ns.address)
    if problem:
        raise ConfigError("--address", problem)

    return RayExecutor(
        num_workers=workers,
        address=ns.address,
        gpus_per_worker=ns.gpus_per_worker,
        cpus_per_worker=ns.cpus_per_worker,
        placement_strategy=ns.placement_strategy,
        placement_timeout_s=ns.placement_timeout,
        max_restarts=ns.max_restarts,
        call_timeout_s=ns.call_timeout,
        worker_timeout_s=ns.worker_return_timeout,
    )


def _print_workers(summary: dict) -> None:
    for ev in summary.get("events", []):
        print(f"  event: {ev}")
    rows = summary.get("workers")
    if rows:
        print(f"  {'worker':>6} {'node':>8} {'patches':>8} {'calls':>6} {'busy s':>8} {'idle s':>8}  {'state':<5}  {'calls via':<9}  patches via")
        for w in rows:
            print(f"  {w['worker']:>6} {w['node']:>8} {w['patches']:>8} {w['calls']:>6} {w['busy_s']:>8.2f} {w['idle_s']:>8.2f}  "
                  f"{w['state']:<5}  {w.get('calls_via', 'ray'):<9}  {w['transport']}")


def _plan(config: RenderConfig, ns) -> int:
    from .loading import check_source, model_source
    from .planning import plan

    check_source(model_source(config))
    p = plan(config)
    d = {"model": config.model} | p.to_dict()
    window_px = p.native_window * p.vae_scale
    if config.model == "tiny" and len(p.phases) > TINY_PHASES_WARNING:
        print(f"apt-dist plan: warning: the tiny model's native window is {window_px} px, so {config.width}x{config.height} "
              f"is {len(p.phases)} phases; for SDXL-sized planning use --model sdxl-random (SDXL's geometry, no weights) "
              f"or your SDXL model", file=sys.stderr)
    if config.loras:
        d["loras"] = config.to_dict().get("lora_files", [])
    if ns.workers is not None:
        if ns.workers < 1:
            raise ConfigError("--workers", f"must be an integer >= 1, got {ns.workers}")
        d["estimate"] = p.timing(ns.workers, ns.seconds_per_patch)
    if ns.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"plan for {config.width}x{config.height}, model {config.model}: native window {p.native_window} latents = "
          f"{window_px} px (VAE scale {p.vae_scale}), method {config.method}")
    sc = p.scheduler_config
    print(f"scheduler {p.scheduler}, {config.steps} steps, on the model's table ({sc.class_name} config: {sc.prediction_type}, "
          f"{sc.for_step(p.scheduler).timestep_spacing} spacing, {sc.beta_schedule} betas"
          f"{', zero terminal SNR' if sc.rescale_betas_zero_snr else ''})")
    if len(p.phases) > 1:
        up = p.phases[1]
        how = f"--shortcut {p.shortcut}" if p.shortcut is not None else (
            "--shortcut-steps" if config.shortcut_steps is not None else "demofusion: all steps")
        print(f"upscaling phases: {up.steps} of {config.steps} steps, from step {up.start_step} ({how})")
    print(f"work units: {p.units.describe()}")
    print(f"{'phase':>5} {'size':>11} {'d':>2} {'steps':>5} {'t0':>4} {'eta':>4} {'local':>5} {'dilated':>7} {'patches':>8} "
          f"{'units/step':>10}")
    for ph in p.phases:
        print(
            f"{ph.index:>5} {f'{ph.width}x{ph.height}':>11} {ph.dilation:>2} {ph.steps:>5} {_t(ph.start_timestep):>4} "
            f"{'own' if ph.eta is None else f'{ph.eta:.1f}':>4} {ph.local_windows:>5} {ph.dilated_patches:>7} {ph.patch_evals:>8} "
            f"{ph.units_per_step:>10}"
        )
    print(f"UNet patch evaluations (per guidance branch): {p.unet_patch_evals}, in {p.unet_calls} UNet calls")
    mem = p.units.memory
    if mem is not None:
        def gib(b: int) -> str:
            return f"{b / 2**30:.2f}"

        print(f"GPU memory per worker (estimate, not yet calibrated on a GPU): {gib(mem.need)} GiB of "
              f"{p.units.device.memory_gib:.1f} GiB: " + ", ".join(f"{n} {gib(b)}" for n, b in mem.parts()))
    if "estimate" in d:
        e = d["estimate"]
        print(f"on {e['workers']} workers at {ns.seconds_per_patch * 1000:.0f} ms/patch: ideal {e['ideal_s']:.1f} s, "
              f"with per-step barriers {e['barrier_s']:.1f} s (efficiency bound {e['bound_efficiency']:.0%})")
        print("one step's barrier, the units shared longest first (in patch times): " + ", ".join(
            f"phase {ph.index} {t:g}" for ph, t in zip(p.phases, e["step_patch_times"])))
    return 0


def _t(t: int | float) -> str:
    return str(t) if isinstance(t, int) else f"{t:.1f}"


if __name__ == "__main__":
    sys.exit(main())
