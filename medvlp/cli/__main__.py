"""``python -m medvlp.cli``: the ``medvlp`` command."""
import sys

from medvlp.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
