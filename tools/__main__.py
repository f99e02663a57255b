"""python -m tools {replay|tail|lookup|demo|refill-table|models|quality} ...: the same commands as
python -m tools.<module>."""
from __future__ import annotations

import importlib
import sys

# command -> module under tools/
COMMANDS = {"replay": "replay", "tail": "tail", "lookup": "lookup", "demo": "demo", "refill-table": "refill",
            "models": "registry", "quality": "quality"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m tools {{{'|'.join(COMMANDS)}}} [arguments]  (--help after a command for its own)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"tools.{COMMANDS[argv[0]]}")
    sys.argv[0] = f"python -m tools.{COMMANDS[argv[0]]}"
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
