"""``python -m scpo_ros.experiments NAME [options]`` (``NAME --help`` for the options)."""
import importlib
import sys

from . import EXPERIMENTS


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in EXPERIMENTS:
        names = "|".join(EXPERIMENTS)
        print(f"usage: python -m scpo_ros.experiments {{{names}}} [options]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(EXPERIMENTS[argv[0]])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
