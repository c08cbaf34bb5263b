"""rankscope: how the geometry of attention changes while a language model trains."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`rankscope.Probe` and the submodules, imported on first use so that `import rankscope`
    (and the report, which never needs torch) stays light."""
    if name == "Probe":
        from .attach import Probe

        return Probe
    if name in ("attach", "analyze", "integrations"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'rankscope' has no attribute {name!r}")
