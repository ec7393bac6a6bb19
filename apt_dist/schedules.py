"""Noise schedules and stateless scheduler steps (Euler, DDIM), built from the model's scheduler config.

Everything here is a pure function of tensors and a `NoiseSchedule` table, in the
style of k-diffusion: no step counters, no hidden state. diffusers' scheduler
objects keep a step index, which breaks when hundreds of patches are stepped at
the same timestep (ALGORITHM.md, "Schedulers"); these functions are tested
against diffusers' EulerDiscreteScheduler and DDIMScheduler instead.

`SchedulerConfig` is the model's `scheduler/scheduler_config.json`, parsed and checked:
prediction type (epsilon, v_prediction, sample), timestep spacing (leading, trailing,
linspace), beta table (scaled_linear, linear), zero-terminal-SNR rescale. Anything else
raises `UnsupportedScheduler` (one line: the setting, its value, what is supported).

Scale-aware Scheduling (APT) is `sas_betas`: a beta table whose growth is set by `eta`:
beta_t = (b0^eta + t/(T-1) (bT^eta - b0^eta))^(1/eta), with the model's beta_start/end.
eta is the exponent of one family of tables through the same endpoints: eta = 0.5 is
`scaled_linear` (SDXL), eta = 1 is `linear`; larger eta adds noise faster. The paper's
eta values (2, 3, 3.5) are for SDXL's scaled_linear table; on a linear table they still
mean the same tables, just further from the model's own (eta 1). eta None is the model's
own table, as diffusers builds it. A zero-SNR rescale is applied after.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

SCHEDULERS = ("auto", "euler", "ddim")  # auto: the model's own scheduler class
STEP_CLASSES = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler"}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("scaled_linear", "linear")


class UnsupportedScheduler(ValueError):
    """A scheduler config (or choice) apt-dist cannot follow exactly; the message is one line."""


# Defaults of diffusers' two classes where a config leaves a setting out (as `from_config` fills them in).
_CLASS_DEFAULTS = {
    "euler": {"timestep_spacing": "linspace", "clip_sample": False, "set_alpha_to_one": False},
    "ddim": {"timestep_spacing": "leading", "clip_sample": True, "set_alpha_to_one": True},
}
# Settings that must hold their default value (or be left out), with what is supported.
_MUST_BE = {
    "use_karras_sigmas": (False, "false"),
    "use_exponential_sigmas": (False, "false"),
    "use_beta_sigmas": (False, "false"),
    "thresholding": (False, "false"),
    "interpolation_type": ("linear", "linear"),
    "final_sigmas_type": ("zero", "zero"),
    "timestep_type": ("discrete", "discrete"),
}


@dataclass(frozen=True)
class SchedulerConfig:
    """The model's scheduler config, checked. None: the config leaves it out (the stepping class's default)."""

    class_name: str = "EulerDiscreteScheduler"  # `_class_name`
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    clip_sample: bool | None = None  # DDIM only: clamp the predicted x0
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool | None = None  # DDIM only: the last step goes to alpha 1 (else alphas_cumprod[0])

    @classmethod
    def from_dict(cls, d: dict) -> SchedulerConfig:
        """Parse a `scheduler_config.json` dict; unknown keys are ignored, unsupported values raise."""
        if d.get("trained_betas"):
            _unsupported("trained_betas", "[...]", "a beta_schedule (scaled_linear, linear)")
        for key, (ok, allowed) in _MUST_BE.items():
            if d.get(key) not in (None, ok):
                _unsupported(key, d[key], allowed)
        fields = {f.name for f in dataclasses.fields(cls)} - {"class_name"}
        kw = {k: v for k, v in d.items() if k in fields}
        out = cls(class_name=str(d.get("_class_name") or "unknown"), **kw)
        _check_choice("beta_schedule", out.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", out.prediction_type, PREDICTION_TYPES)
        if out.timestep_spacing is not None:
            _check_choice("timestep_spacing", out.timestep_spacing, TIMESTEP_SPACINGS)
        for name in ("num_train_timesteps", "steps_offset"):
            v = getattr(out, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (2 if name == "num_train_timesteps" else 0):
                _unsupported(name, v, "an integer >= 2" if name == "num_train_timesteps" else "an integer >= 0")
        for name in ("beta_start", "beta_end"):
            v = getattr(out, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                _unsupported(name, v, "a number in (0, 1)")
        return out

    def for_step(self, kind: str) -> SchedulerConfig:
        """This config as `kind`'s diffusers class reads it (`XScheduler.from_config`): its defaults fill the gaps."""
        defaults = _CLASS_DEFAULTS[kind]
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _unsupported(setting: str, value, allowed: str):
    raise UnsupportedScheduler(f"scheduler config {setting}={value!r} is not supported; supported: {allowed}")


def _check_choice(setting: str, value, allowed) -> None:
    if value not in allowed:
        _unsupported(setting, value, ", ".join(allowed))


def resolve_kind(requested: str, config: SchedulerConfig) -> str:
    """'euler' | 'ddim' for a `--scheduler` value; 'auto' is the model's own class where it is one of the two."""
    if requested != "auto":
        if requested not in STEP_CLASSES:
            raise UnsupportedScheduler(f"unknown scheduler {requested!r}; allowed: {', '.join(SCHEDULERS)}")
        return requested
    for kind, cls in STEP_CLASSES.items():
        if config.class_name == cls:
            return kind
    raise UnsupportedScheduler(
        f"the model's scheduler is {config.class_name}, which --scheduler auto does not run; "
        "--scheduler euler|ddim uses the model's table with that step"
    )


# ---- beta tables -------------------------------------------------------------------


def sas_betas(num_train_timesteps: int, beta_start: float, beta_end: float, eta: float) -> torch.Tensor:
    """Scale-aware beta table: beta_t = (b0^eta + t/(T-1) * (bT^eta - b0^eta)) ** (1/eta).

    Computed in float64; eta = 0.5 reproduces `scaled_linear`, eta = 1 `linear`; larger eta adds noise faster.
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    t = torch.arange(num_train_timesteps, dtype=torch.float64) / (num_train_timesteps - 1)
    lo, hi = beta_start**eta, beta_end**eta
    return (lo + t * (hi - lo)) ** (1.0 / eta)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last alphas_cumprod is 0 (arXiv 2305.08891, Algorithm 1), as diffusers computes them."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


def phase_betas(config: SchedulerConfig, eta: float | None = None) -> torch.Tensor:
    """float32 [T]: the model's own table (eta None, as diffusers builds it) or Scale-aware Scheduling's (eta)."""
    T, b0, b1 = config.num_train_timesteps, config.beta_start, config.beta_end
    if eta is not None:
        betas = sas_betas(T, b0, b1, eta).to(torch.float32)
    elif config.beta_schedule == "linear":
        betas = torch.linspace(b0, b1, T, dtype=torch.float32)
    else:  # scaled_linear
        betas = torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float32) ** 2
    return rescale_zero_terminal_snr(betas) if config.rescale_betas_zero_snr else betas


def inference_timesteps(spacing: str, num_inference_steps: int, num_train_timesteps: int, steps_offset: int,
                        integral: bool) -> np.ndarray:
    """The N timesteps of a spacing (float32), as diffusers' set_timesteps makes them.

    `integral`: DDIM rounds linspace timesteps to integers; Euler keeps them fractional.
    """
    N, T = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, N, dtype=np.float64 if integral else np.float32)[::-1]
        ts = ts.round() if integral else ts
    elif spacing == "leading":
        ts = (np.arange(0, N) * (T // N)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / N)) - 1
    else:
        _check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    return np.ascontiguousarray(ts).astype(np.float32)


def leading_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> torch.Tensor:
    """SDXL's 'leading' spacing: 50 steps of 1000 give 981, 961, ..., 1."""
    ts = inference_timesteps("leading", num_inference_steps, num_train_timesteps, steps_offset, True)
    return torch.from_numpy(ts).to(torch.long)


# ---- one phase's tables ----------------------------------------------------------------


@dataclass(frozen=True)
class NoiseSchedule:
    """One phase's tables. Step i runs at timesteps[i] and moves to step i + 1."""

    kind: str  # "euler" | "ddim"
    prediction_type: str  # "epsilon" | "v_prediction" | "sample"
    timesteps: torch.Tensor  # [N]: float32 for Euler (fractional with linspace spacing), long for DDIM
    alphas_cumprod: torch.Tensor  # float32 [T]
    sigmas: torch.Tensor  # float32 [N + 1], Euler's sigma at each step, then 0
    alpha_t: torch.Tensor  # float32 [N], DDIM: alphas_cumprod at timesteps[i]
    alpha_prev: torch.Tensor  # float32 [N], DDIM: alphas_cumprod at the previous timestep (or the final alpha)
    num_train_timesteps: int
    init_sigma: float  # scale of the pure-noise start latent
    clip_range: float | None = None  # DDIM: clamp the predicted x0 to [-r, r]

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())


def make_schedule(kind: str, num_inference_steps: int, config: SchedulerConfig | None = None,
                  eta: float | None = None) -> NoiseSchedule:
    """Tables for `kind` ('euler' | 'ddim') over the model's config (None: SDXL base's), as diffusers builds them.

    eta: Scale-aware Scheduling's table for this phase (None: the model's own).
    """
    if kind not in STEP_CLASSES:
        raise ValueError(f"unknown scheduler {kind!r}; allowed: {', '.join(STEP_CLASSES)}")
    cfg = (config or SDXL_SCHEDULER).for_step(kind)
    T, N = cfg.num_train_timesteps, num_inference_steps
    if not 1 <= N <= T:
        raise ValueError(f"steps must be in 1..{T} (the model's num_train_timesteps), got {N}")
    # diffusers keeps alphas_cumprod in float32; so do we, so the steps match it to float32 rounding.
    alphas_cumprod = torch.cumprod(1.0 - phase_betas(cfg, eta), dim=0)
    ts = inference_timesteps(cfg.timestep_spacing, N, T, cfg.steps_offset, integral=kind == "ddim")
    if kind == "euler":
        if cfg.rescale_betas_zero_snr:
            alphas_cumprod[-1] = 2**-24  # diffusers' Euler: close to 0, so the first sigma is finite (4096)
        full = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
        sigmas = torch.from_numpy(np.concatenate([np.interp(ts, np.arange(T), full), [0.0]]).astype(np.float32))
        top = sigmas.max()
        init = top if cfg.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
        alpha_t = 1 / (1 + sigmas[:-1] ** 2)
        return NoiseSchedule(kind, cfg.prediction_type, torch.from_numpy(ts), alphas_cumprod, sigmas, alpha_t,
                             torch.cat([alpha_t[1:], torch.ones(1)]), T, float(init))
    its = torch.from_numpy(ts).to(torch.long)
    final = torch.tensor(1.0) if cfg.set_alpha_to_one else alphas_cumprod[0]
    prev = its - T // N  # diffusers' DDIM steps back by T // N whatever the spacing
    alpha_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], final)
    sigmas = torch.cat([((1 - alphas_cumprod[its]) / alphas_cumprod[its]) ** 0.5, torch.zeros(1)])
    return NoiseSchedule(kind, cfg.prediction_type, its, alphas_cumprod, sigmas, alphas_cumprod[its], alpha_prev, T,
                         1.0, cfg.clip_sample_range if cfg.clip_sample else None)


def model_timestep(s: NoiseSchedule, i: int) -> int | float:
    """The timestep the UNet gets at step i: an int where it is integral (Euler + linspace: a float)."""
    t = float(s.timesteps[i])
    return int(t) if t.is_integer() else t


def init_noise_sigma(s: NoiseSchedule) -> float:
    """Scale of the pure-noise start latent (diffusers' `init_noise_sigma`: Euler's depends on the spacing)."""
    return s.init_sigma


def scale_model_input(s: NoiseSchedule, x: torch.Tensor, i: int) -> torch.Tensor:
    """What the UNet sees at step i: Euler works in sigma space, so divide by sqrt(sigma^2 + 1)."""
    divisor = input_divisor(s, i)
    return x if divisor is None else x / divisor


def input_divisor(s: NoiseSchedule, i: int) -> torch.Tensor | None:
    """`scale_model_input` as a divisor (for `torch.div(..., out=)`); None where the input is the latent itself."""
    return (s.sigmas[i] ** 2 + 1) ** 0.5 if s.kind == "euler" else None


def add_noise(s: NoiseSchedule, z0: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
    """The noised latent of step i (the forward process at timesteps[i]), in the step's own space."""
    if s.kind == "euler":
        return torch.add(z0, eps, alpha=float(s.sigmas[i]))  # z0 + sigma * eps in one pass
    a = s.alpha_t[i]
    return a**0.5 * z0 + (1 - a) ** 0.5 * eps


def step(s: NoiseSchedule, x: torch.Tensor, model_output: torch.Tensor, i: int) -> torch.Tensor:
    """One deterministic step from timesteps[i] to the next, for the schedule's prediction type."""
    x = x.to(torch.float32)
    out = model_output.to(torch.float32)
    if s.kind == "euler":
        sigma, dt = s.sigmas[i], s.sigmas[i + 1] - s.sigmas[i]
        if s.prediction_type == "epsilon":
            # diffusers' x + (x - x0) / sigma * dt with x0 = x - sigma * eps, i.e. x + dt * eps: one pass, not five
            # (the driver steps every patch of every timestep; equal to diffusers within float rounding, tested).
            return torch.add(x, out, alpha=float(dt))
        if s.prediction_type == "v_prediction":
            x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        else:  # sample
            x0 = out
        return x + (x - x0) / sigma * dt
    a, a_prev = s.alpha_t[i], s.alpha_prev[i]
    if s.prediction_type == "epsilon":
        x0, eps = (x - (1 - a) ** 0.5 * out) / a**0.5, out
    elif s.prediction_type == "v_prediction":
        x0, eps = a**0.5 * x - (1 - a) ** 0.5 * out, a**0.5 * out + (1 - a) ** 0.5 * x
    else:  # sample
        x0, eps = out, (x - a**0.5 * out) / (1 - a) ** 0.5
    if s.clip_range is not None:
        x0 = x0.clamp(-s.clip_range, s.clip_range)
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps


def cosine_factor(t: float, num_train_timesteps: int = 1000) -> float:
    """DemoFusion's cosine weight: 1 at t = T (pure noise), 0 at t = 0."""
    return 0.5 * (1 + math.cos(math.pi * (num_train_timesteps - t) / num_train_timesteps))


# SDXL base's scheduler (stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json).
SDXL_SCHEDULER_DICT = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SDXL_SCHEDULER = SchedulerConfig.from_dict(SDXL_SCHEDULER_DICT)
