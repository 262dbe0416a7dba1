"""Command line: ``lowlevel info [--json]`` (the console script) or ``python -m lowlevel info [--json]``."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    prog = "python -m lowlevel" if sys.argv[0].endswith("__main__.py") else "lowlevel"
    parser = argparse.ArgumentParser(prog=prog, description="lowlevel: streams, events, graphs and SM control.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="GPU, SM count, versions, green-context support")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        from .info import device_info, format_info

        info = device_info()
        print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
