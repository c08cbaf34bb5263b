"""rankscope: how the geometry of attention changes while a language model trains.

The sub-packages are the architecture; imports run down this list (tests/test_layout.py):

    cli.py, cli_text.py   the command line: thin dispatch, and the texts it prints
    analyze/              a finished model or a checkpoint series, measured (`rankscope analyze`)
    integrations/         probes in other people's training loops (ProbeLogger, callbacks, lm_eval)
    run/                  one training run (train over build, evaluator, resume), studies of arms x
                          seeds, schedules, checkpoints, estimates, `rankscope bench`
    attach/               Probe(model) for other people's models
    measure/              spectrum metrics, probes, downstream evaluations, KV headroom
    core/                 the seed's GPT, the attention-logit loop, optimizers by parameter role
    report/               tables, figures and the report, from the run folders alone (no torch)
    data/                 corpora, tokenizers, token shards, batches
    storage/              the run folder's format, atomic writes, locks, provenance (no torch)
    settings/             typed settings, presets, the names every part shares (no torch)
"""

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
