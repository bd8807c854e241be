"""The ``var-lab`` subcommands and the one function that runs one in-process.

Each subcommand lives in its own module and is imported only when called (by name, through ``importlib``), so
``var-lab --help`` is fast and a subcommand's heavy imports (torch, mlflow, torch-fidelity) are paid only by that
subcommand; it also keeps this table at the bottom of the import layers, where both ``var_lab.cli`` and a sweep's
SLURM job function (``var_lab.sweeps.slurm.SweepJob``) can use it. Every subcommand function takes the remaining argv
and returns an exit code; a ``BadInputError`` (``var_lab.inputs``) it raises is printed as one line,
``var-lab <command>: error: <message>``, with exit code 2.
"""

from __future__ import annotations

import importlib

from var_lab.inputs import BadInputError, report

#: subcommand -> ("module:function", one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "fit-tokenizer": ("var_lab.train:fit_tokenizer_main", "train the multi-scale VQVAE tokenizer"),
    "fit": ("var_lab.train:fit_main", "train a VAR transformer of a given depth"),
    "tokenize": ("var_lab.data.tokenize:tokenize_main", "encode a dataset once into token shards"),
    "sample": ("var_lab.sampling_cli:sample_main", "sample a PNG grid and folder from a checkpoint"),
    "eval": ("var_lab.evaluate:eval_main", "sample and compute FID/KID/IS/precision/recall, log to MLflow"),
    "export": ("var_lab.export:export_main", "write a checkpoint in the released format, with a model card"),
    "fid-weights": ("var_lab.metrics.fid_weights:fid_weights_main", "install the FID Inception weights offline"),
    "reference-stats": ("var_lab.evaluate:reference_stats_main", "compute and cache FID reference statistics"),
    "sweep": ("var_lab.sweeps.cli:sweep_main", "expand | launch | status | resume | cancel a sweep file"),
    "analyze": ("analysis.cli:analyze_main", "fit power laws, plot scaling curves, write the report"),
    "sync": ("var_lab.tracking:sync_main", "deliver metrics kept locally while the tracking store was down"),
}


def run_command(name: str, argv: list[str]) -> int:
    """Run subcommand ``name`` with ``argv``; returns its exit code (2 for bad input, reported in one line).

    Raises:
        KeyError: ``name`` is not a subcommand.
    """
    target, _ = SUBCOMMANDS[name]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        code = func(argv)
    except BadInputError as error:  # raised before the command wrote anything: the message is the whole story
        return report(f"var-lab {name}", error)
    return int(code or 0)
