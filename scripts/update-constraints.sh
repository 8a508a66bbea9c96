#!/usr/bin/env bash
# Rewrites requirements/dev.txt: installs skinflint[dev] into a throwaway virtual environment
# with the newest releases its bounds allow, and pins every package that environment holds.
# Run it, then the test command (or .ci/run), and commit the file if they pass.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
{
  echo "# Constraints for 'pip install -e .[dev] -c requirements/dev.txt': the exact versions the"
  echo "# test command was last run with. Written by scripts/update-constraints.sh; do not edit."
  "$venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check
} > requirements/dev.txt
echo "requirements/dev.txt: $(grep -vc '^#' requirements/dev.txt) packages pinned"
