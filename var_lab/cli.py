"""The ``var-lab`` entry point: usage, version, and the subcommands of ``var_lab.commands``."""

from __future__ import annotations

import sys

from var_lab.commands import SUBCOMMANDS, run_command


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
    return run_command(name, rest)


if __name__ == "__main__":
    sys.exit(main())
