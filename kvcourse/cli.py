"""The ``kvcourse`` command: ``kvcourse bench ...`` (``kvcourse.bench``), ``kvcourse train ...`` (``kvcourse.train``).

Each subcommand hands the rest of the command line to that module's ``main``, so
``kvcourse bench --quick`` is ``python -m kvcourse.bench --quick`` and ``kvcourse train --help`` shows
the training options.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "bench": "time generation with and without a KV cache (python -m kvcourse.bench)",
    "train": "train the bundled model from scratch (python -m kvcourse.train)",
}


def usage() -> str:
    lines = ["usage: kvcourse {bench,train} [ARGS...]", "", "commands:"]
    lines += [f"  {name:<7} {text}" for name, text in COMMANDS.items()]
    lines += ["", "kvcourse COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from . import bench

        return bench.main(rest)
    if command == "train":
        from . import train

        train.main(rest)
        return 0
    print(f"kvcourse: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
