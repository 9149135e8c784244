#!/usr/bin/env bash
# Run the x-transformers 2.0.1 release's own test suite against THIS package.
#
# The sdist is fetched with pip into a temporary directory and its tests/test_x_transformers.py is run from there,
# so `x_transformers` resolves to the installed (editable) copy of this repository. Nothing of it is committed.
#
#   scripts/run_upstream_suite.sh                   # download the sdist with pip
#   UPSTREAM_TESTS=/path/to/tests scripts/run_upstream_suite.sh   # use an already unpacked copy (offline)
#   PYTHON=.venv/bin/python scripts/run_upstream_suite.sh -k kv_cache   # extra args go to pytest
set -euo pipefail

PYTHON="${PYTHON:-python}"
VERSION="${UPSTREAM_VERSION:-2.0.1}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if [[ -n "${UPSTREAM_TESTS:-}" ]]; then
    cp "$UPSTREAM_TESTS/test_x_transformers.py" "$WORK/"
else
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "x-transformers==$VERSION" -d "$WORK/sdist"
    tar -xzf "$WORK"/sdist/x_transformers-"$VERSION".tar.gz -C "$WORK/sdist"
    cp "$WORK/sdist/x_transformers-$VERSION/tests/test_x_transformers.py" "$WORK/"
fi

# make sure the package under test is this repository, not some other install
"$PYTHON" - "$REPO_ROOT" <<'EOF'
import sys, pathlib, x_transformers
root = pathlib.Path(sys.argv[1]).resolve()
where = pathlib.Path(x_transformers.__file__).resolve()
if root not in where.parents:
    sys.exit(f"x_transformers resolves to {where}, not to {root}; run `pip install -e {root}` first")
print(f"testing x_transformers from {where.parent}")
EOF

cd "$WORK"
"$PYTHON" -m pytest -q -p no:cacheprovider test_x_transformers.py "$@"
