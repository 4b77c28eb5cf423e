"""Command line entry point: `python -m kit COMMAND ...`."""

from __future__ import annotations

import argparse

from kit import plan_cli
from kit.security import cli as security_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kit", description="Microsite Kit tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plan_cli.add_arguments(commands.add_parser("plan", help=plan_cli.HELP, description=plan_cli.HELP))
    security_cli.add_hash_password_arguments(
        commands.add_parser("hash-password", help=security_cli.HASH_PASSWORD_HELP, description=security_cli.HASH_PASSWORD_HELP)
    )
    security_cli.add_new_token_arguments(
        commands.add_parser("new-token", help=security_cli.NEW_TOKEN_HELP, description=security_cli.NEW_TOKEN_HELP)
    )
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
