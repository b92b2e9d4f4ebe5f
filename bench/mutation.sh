#!/usr/bin/env bash
# Mutation testing of the modules that guard data and numbers; writes bench/results/mutation.{json,md}.
#
#   bench/mutation.sh                     every default module (see --list)
#   bench/mutation.sh fileio checkpoint   some modules (the others keep their last result)
#   bench/mutation.sh --list              modules, the functions mutated and their test files
#   bench/mutation.sh --report-only       re-classify survivors after editing
#                                         bench/mutation_equivalents.toml
#   bench/mutation.sh --recheck step      rerun only the last run's open survivors
#
# CRAFT_MUTATION_CHILDREN=1 (or --jobs 1) tests one mutant at a time instead of two, for a machine
# that others share.
#
# The pinned tool (bench/mutation-requirements.txt) goes into .mutation/venv, a virtual environment
# that sees the system packages (torch, the dev extras) and adds only mutmut and its dependencies.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="$repo/.mutation/venv"
req="$repo/bench/mutation-requirements.txt"
if [[ ! -x "$venv/bin/mutmut" ]] || ! cmp -s "$req" "$venv/requirements.txt"; then
    python3 -m venv --system-site-packages "$venv"
    "$venv/bin/python" -m pip install --quiet -r "$req"
    cp "$req" "$venv/requirements.txt"
fi
cd "$repo"
exec "$venv/bin/python" bench/mutation.py "$@"
