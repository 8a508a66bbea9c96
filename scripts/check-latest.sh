#!/usr/bin/env bash
# Non-blocking early warning: installs the newest release of every dependency that is not pinned
# (ignoring requirements/dev.txt) into a throwaway virtual environment and runs the README's test
# command there. A failure here means an upstream release breaks skinflint before users meet it;
# fix the code or add an upper bound, then refresh the pins with scripts/update-constraints.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade -e '.[dev]' || exit 1
"$venv/bin/python" -m pip list --disable-pip-version-check --format=freeze \
  | diff <(grep -v '^#' requirements/dev.txt | sort -f) <(sort -f) | grep '^>' \
  | sed 's/^> /newer than the pins: /' || true
# shellcheck disable=SC1091
source "$venv/bin/activate"
ruff check skinflint tests bench scripts && mypy skinflint && lint-imports && pytest -q
status=$?
echo "check-latest: test command exited with $status"
exit $status
