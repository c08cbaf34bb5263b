"""Tables, figures, report.md and report.html from what `rankscope.storage.store` wrote. Never imports torch.

    from rankscope.report import write_report, paradox_text
    write_report("runs/qk-muon")            # runs/qk-muon/report.md, report.html, plots/*.png
    print(paradox_text("runs/qk-muon"))     # the seed's paradox table with intervals, for a terminal

The modules, from data to document:

    load          study folders -> one StudyData (runs, scalars, probes)
    quantities    what the report compares: keys, names, units, better direction
    series        per-run series, the eval points compared, the value at N tokens, cells over seeds
    stats         t intervals, seed-by-seed differences, correlations (numbers only)
    format        numbers as text: signs, p-values, intervals, decimals, plain-text tables
    paradox       the seed's paradox table, computed and rendered
    compare       every pair of arms; rank against downstream correlations
    factorial     two settings crossed, read as main, simple and interaction effects
    layer_tables  per-layer views at the end: collapse diagnosis, functional rank, rank sweep
    summary       the written summary, sentence by sentence
    seedcompare   the seed study's published figures beside this study's
    analysis      everything one report computes, once
    plotstyle     what every figure shares: Plot, arm colours, file names, saving, axes style
    token_axis    the token axis of every figure over training (linear, or log with token 0)
    band_panels   what panels over training share: mean lines, t bands, fitted limits, zooms
    curves        figures over training tokens: loss and key PR, the downstream measures
    rank_scatter  key PR against each downstream measure, every eval point and run end
    layer_plots   figures across layers and heads (analyze's layer x head heatmap too)
    figures       which figures a report draws
    study_setup   the study described: setup, arms, run status, shared settings
    blocks        the document's building blocks, rendered to markdown and HTML
    document      the report's sections in order, report.md, report.html and the terminal text
    model_summary the key-PR summary `rankscope analyze` writes for one model
"""

from .compare import correlation_table, pairwise_comparisons
from .document import paradox_text, write_report
from .load import StudyData, load_study
from .paradox import format_table, paradox_table
from .series import head_layer_mean, layer_means, metric_summary
from .stats import Difference, Interval, correlate, paired_difference, t_interval

__all__ = [
    "StudyData",
    "load_study",
    "paradox_text",
    "write_report",
    "format_table",
    "head_layer_mean",
    "layer_means",
    "metric_summary",
    "paradox_table",
    "pairwise_comparisons",
    "correlation_table",
    "t_interval",
    "paired_difference",
    "correlate",
    "Interval",
    "Difference",
]
