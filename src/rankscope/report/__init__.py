"""Tables, figures, report.md and report.html from what `rankscope.store` wrote. Never imports torch.

    from rankscope.report import write_report, paradox_text
    write_report("runs/qk-muon")            # runs/qk-muon/report.md, report.html, plots/*.png
    print(paradox_text("runs/qk-muon"))     # the seed's paradox table with intervals, for a terminal

Statistics (t intervals over seeds, seed-by-seed differences, correlations) are in `stats`;
the comparisons built from them in `tables` and `compare`.
"""

from .compare import correlation_table, pairwise_comparisons
from .load import StudyData, load_study
from .report import paradox_text, write_report
from .stats import Difference, Interval, correlate, paired_difference, t_interval
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
    "head_layer_mean", "layer_means", "metric_summary", "paradox_table", "pairwise_comparisons",
    "correlation_table", "t_interval", "paired_difference", "correlate", "Interval", "Difference",
]
