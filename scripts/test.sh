#!/usr/bin/env bash
# The test suite, twice: on the lowest transformers this repo supports and on the newest 5.x release.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for pair in ".venv-floor transformers==5.0.0" ".venv transformers>=5.0,<6"; do
    read -r venv spec <<<"$pair"
    echo "=== $spec ($venv)"
    bash scripts/setup_env.sh "$venv" "$spec"
    "$venv/bin/python" -m pytest tests -q -p no:cacheprovider "$@" || status=$?
done
exit $status
