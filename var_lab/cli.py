"""The ``var-lab`` entry point.

Each subcommand lives in its own module and is imported only when called, so ``var-lab --help`` is fast and a
subcommand's heavy imports (torch, mlflow, torch-fidelity) are paid only by that subcommand. Every subcommand
function takes the remaining argv and returns an exit code; a ``BadInputError`` (``var_lab.inputs``) it raises is
printed as one line, ``var-lab <command>: error: <message>``, with exit code 2.
"""

from __future__ import annotations

import importlib
import sys

#: subcommand -> ("module:function", one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "fit-tokenizer": ("var_lab.train:fit_tokenizer_main", "train the multi-scale VQVAE tokenizer"),
    "fit": ("var_lab.train:fit_main", "train a VAR transformer of a given depth"),
    "tokenize": ("var_lab.data.tokenize:tokenize_main", "encode a dataset once into token shards"),
    "sample": ("var_lab.sampling_cli:sample_main", "sample a PNG grid and folder from a checkpoint"),
    "eval": ("var_lab.evaluate:eval_main", "sample and compute FID/KID/IS/precision/recall, log to MLflow"),
    "fid-weights": ("var_lab.metrics.fid_weights:fid_weights_main", "install the FID Inception weights offline"),
    "reference-stats": ("var_lab.evaluate:reference_stats_main", "compute and cache FID reference statistics"),
    "sweep": ("var_lab.sweeps.cli:sweep_main", "expand | launch | status | resume | cancel a sweep file"),
    "analyze": ("analysis.cli:analyze_main", "fit power laws, plot scaling curves, write the report"),
    "sync": ("var_lab.tracking:sync_main", "deliver metrics kept locally while the tracking store was down"),
}


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: var-lab <command> [options]", "", "commands:"]
    for name, (_, text) in SUBCOMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {text}")
    lines.append("")
    lines.append("Run 'var-lab <command> --help' for the options of a command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``var-lab <command> ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from var_lab import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"var-lab: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = SUBCOMMANDS[name]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    from var_lab.inputs import BadInputError, report

    try:
        code = func(rest)
    except BadInputError as error:  # raised before the command wrote anything: the message is the whole story
        return report(f"var-lab {name}", error)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
