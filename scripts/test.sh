#!/usr/bin/env bash
# Install fastkd with its test extras into a virtual environment and run the test suite against
# the installed package, from outside the source tree. Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup_venv.sh" test,examples
py="${FASTKD_VENV:-$root/.venv}/bin/python"
# An empty working directory keeps the checkout's fastkd/ off sys.path: `import fastkd` must
# find the installed copy.
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
cd "$workdir"
"$py" -c "import fastkd, sys; assert '$root' not in fastkd.__file__, fastkd.__file__"
"$py" -m pytest -c "$root/pytest.ini" --rootdir "$root" -p no:cacheprovider "$root/tests" "$@"
