"""Synthetic scenes with ground truth (the demo tabletop), rendered independently of our rasterizer.

`demo_scene`, `generate`, `SimConfig`, `SIZES`, `cache_dir`, `GENERATOR_VERSION` come from `m3_memory.sim.demo`,
imported on first use so that `m3_memory.sim.cli` can be registered without loading pybullet.
"""

_DEMO_NAMES = ("GENERATOR_VERSION", "SIZES", "SimConfig", "cache_dir", "demo_scene", "generate")
__all__ = list(_DEMO_NAMES)


def __getattr__(name: str):
    if name in _DEMO_NAMES:
        from m3_memory.sim import demo

        return getattr(demo, name)
    raise AttributeError(f"module 'm3_memory.sim' has no attribute {name!r}")
