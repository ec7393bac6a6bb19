"""apt-dist: APT high-resolution rendering (DemoFusion + APT on SDXL) on one GPU or many.

    from apt_dist import RenderConfig, render, plan
    result = render(RenderConfig(prompt="a lighthouse at dusk", width=384, height=256))
    result.image.save("out.png")

Heavy modules (torch models, Ray) are imported lazily.
"""

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Executor",
    "InProcessExecutor",
    "Plan",
    "RayExecutor",
    "RenderConfig",
    "RenderError",
    "RenderResult",
    "__version__",
    "plan",
    "render",
]

_LAZY = {
    "RenderConfig": "config",
    "ConfigError": "config",
    "render": "sampler",
    "RenderResult": "sampler",
    "RenderError": "sampler",
    "plan": "planning",
    "Plan": "planning",
    "Executor": "executor",
    "InProcessExecutor": "executor",
    "RayExecutor": "ray_executor",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'apt_dist' has no attribute {name!r}")
