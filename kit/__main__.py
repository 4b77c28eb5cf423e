"""Command line entry point: `python -m kit COMMAND ...`."""

from __future__ import annotations

import argparse

from kit import plan_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kit", description="Microsite Kit tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plan_cli.add_arguments(commands.add_parser("plan", help=plan_cli.HELP, description=plan_cli.HELP))
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
