"""`python -m kit hash-password` and `python -m kit new-token`: make users and API token entries."""

from __future__ import annotations

import argparse
import getpass
import sys

from kit.security.auth import hash_api_token, hash_password, new_api_token

HASH_PASSWORD_HELP = "print a users-file entry (NAME:scrypt$...) for a user name and a password read from the terminal"
NEW_TOKEN_HELP = "create an API token for a user name: print the token once, and the entry for the API tokens file"
MIN_PASSWORD_CHARS = 8


def add_hash_password_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("username", help="user name (letters, digits and . _ @ -)")
    parser.add_argument(
        "--password-stdin", action="store_true", help="read the password from the first line of standard input instead of a prompt"
    )
    parser.set_defaults(run=run_hash_password)


def add_new_token_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("username", help="user name the token acts as (its gallery and its job limits)")
    parser.set_defaults(run=run_new_token)


def _read_password(args: argparse.Namespace) -> str | None:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass("Password: ")
    if getpass.getpass("Repeat the password: ") != password:
        print("error: the passwords differ", file=sys.stderr)
        return None
    return password


def run_hash_password(args: argparse.Namespace) -> int:
    password = _read_password(args)
    if password is None:
        return 1
    if len(password) < MIN_PASSWORD_CHARS:
        print(f"error: the password has {len(password)} characters; use at least {MIN_PASSWORD_CHARS}", file=sys.stderr)
        return 1
    print(f"{args.username}:{hash_password(password)}")
    return 0


def run_new_token(args: argparse.Namespace) -> int:
    token = new_api_token()
    print(f"# Token for {args.username}; it is shown only now. Scripts send it as: Authorization: Bearer TOKEN", file=sys.stderr)
    print(f"token: {token}")
    print(f"entry: {args.username}:{hash_api_token(token)}")
    return 0
