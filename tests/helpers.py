from apt_dist.config import RenderConfig


def small_config(**kw) -> RenderConfig:
    """Three phases with the tiny model (128x96 -> 256x192 -> 384x288 px), few steps: seconds on a CPU."""
    base = dict(prompt="a red lighthouse on a cliff", width=384, height=288, seed=7, steps=6, shortcut_steps=4)
    base.update(kw)
    return RenderConfig(**base)
