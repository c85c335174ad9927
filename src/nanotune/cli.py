"""The `nanotune` command: thin wrappers over the library.

Each subcommand is a function `cmd_<name>(args)` registered in `build_parser`. Errors a user can
cause are `NanotuneError`s: printed as one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from nanotune.errors import NanotuneError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanotune", description="Fine-tune GPT-2 and other small language models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Subcommands register themselves here: add_<name>_parser(sub).
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except NanotuneError as e:
        print(f"nanotune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nanotune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
