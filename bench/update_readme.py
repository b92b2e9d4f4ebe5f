"""Regenerate the results section of bench/README.md from the files in bench/results/.

    python bench/update_readme.py

Run it after adding or replacing a result file. It reads JSON and Markdown only (no torch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from craft.bench.summary import update_readme  # noqa: E402


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    update_readme(HERE / "README.md", HERE / "results")
    print(f"updated {HERE / 'README.md'}")


if __name__ == "__main__":
    main()
