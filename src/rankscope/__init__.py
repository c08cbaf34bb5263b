"""rankscope: how the geometry of attention changes while a language model trains."""

__version__ = "0.1.0"
