#!/usr/bin/env bash
# psalm: the default test run (CPU, tiny configs, < 15 min). Extra pytest arguments pass through,
# e.g. `bash scripts/test.sh -k swin`. Slow tests: `bash scripts/test.sh -m slow`.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PSALM_VENV:-$(pwd)/.venv}/bin/python
"$PY" -m pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit $rc
