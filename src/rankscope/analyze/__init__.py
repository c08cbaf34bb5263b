"""`rankscope analyze`: the attention geometry of a finished model (`command`), of every
checkpoint of one run (`series`), and what both read (`inputs`)."""

from .command import AnalyzeResult, add_arguments, analyze, run

__all__ = ["AnalyzeResult", "analyze", "add_arguments", "run"]
