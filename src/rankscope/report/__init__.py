"""Tables, figures and report.md from what `rankscope.store` wrote. Never imports torch.

    from rankscope.report import write_report, paradox_text
    write_report("runs/qk-muon")            # runs/qk-muon/report.md + runs/qk-muon/plots/*.png
    print(paradox_text("runs/qk-muon"))     # the seed's paradox table, for a terminal
"""

from .load import StudyData, load_study
from .report import paradox_text, write_report
from .tables import (
    fmt_tokens,
    format_table,
    head_layer_mean,
    layer_means,
    metric_summary,
    paradox_table,
)

__all__ = [
    "StudyData", "load_study", "paradox_text", "write_report", "fmt_tokens", "format_table",
    "head_layer_mean", "layer_means", "metric_summary", "paradox_table",
]
