"""Regenerate the results section of bench/README.md from the files in bench/results/.

    python bench/update_readme.py

Run it after adding or replacing a result file. It reads JSON and Markdown only (no torch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from craft.bench.summary import update_readme

HERE = Path(__file__).resolve().parent


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    update_readme(HERE / "README.md", HERE / "results")
    print(f"updated {HERE / 'README.md'}")


if __name__ == "__main__":
    main()
