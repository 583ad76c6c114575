#!/usr/bin/env bash
# The environment of pixcontrast's set-up commands and of CI, in one place.
#
#   bash scripts/env.sh [COMMAND [ARG...]]
#
# Creates the virtual environment .venv at the repository root if it is missing, installs torch
# into it FIRST, then pixcontrast in editable mode with the extras CI uses ("test", "examples",
# "docs" and "release": the tests, the examples, the documentation site and the package checks),
# and runs COMMAND (from the repository root, with the environment's bin/ first on PATH). Once
# installed, a later call only checks that nothing changed (about a second) and runs COMMAND.
#
# Which torch (read at every call; a change reinstalls):
#   PIXCONTRAST_TORCH        the requirement, default "torch==2.13.0"
#   PIXCONTRAST_TORCH_INDEX  the package index torch is installed from, default none: pip's
#                            configured indexes (and wheel stores) decide. On public PyPI the Linux
#                            wheel of that pin is a multi-gigabyte CUDA build; for a CPU build,
#                            PyTorch's own CPU index:
#                              PIXCONTRAST_TORCH_INDEX=https://download.pytorch.org/whl/cpu
#                            GPU users: pick your CUDA build with the index that PyTorch's install
#                            selector (https://pytorch.org/get-started/locally/) gives for your
#                            driver, https://download.pytorch.org/whl/cuXYZ, and, if you need
#                            another torch version, PIXCONTRAST_TORCH="torch==X.Y.Z".
#   PIXCONTRAST_VENV         where the environment lives, default <repository>/.venv
#   PYTHON                   the interpreter that creates it, default python3
#
# The rest is installed under a constraint pinning the torch just installed, so no dependency can
# replace it with another build; the script fails if torch changed anyway.
set -euo pipefail

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PIXCONTRAST_VENV:-$root/.venv}"
torch_requirement="${PIXCONTRAST_TORCH:-torch==2.13.0}"
torch_index="${PIXCONTRAST_TORCH_INDEX:-}"
extras="test,examples,docs,release"
stamp="$venv/.pixcontrast-env"

say() { echo "scripts/env.sh: $*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv"
    "${PYTHON:-python3}" -m venv "$venv"
fi
python="$venv/bin/python"
installed_torch() {
    "$python" -c "from importlib.metadata import version; print(version('torch'))" 2>/dev/null
}

# What the environment was built from: the torch choice and the package's dependencies.
wanted="torch=$torch_requirement index=$torch_index extras=$extras pyproject=$(cksum < "$root/pyproject.toml")"

# Installed from the same choices, the pinned torch still in place and the package and the test
# tools present (package metadata only: importing torch would cost seconds): nothing to do.
installed() {
    "$python" -c "from importlib.metadata import version; version('pixcontrast'); version('pytest')" \
        2>/dev/null \
        && [ "$(cat "$venv/torch-constraint.txt" 2>/dev/null)" = "torch==$(installed_torch)" ]
}
if [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ] && installed; then
    :
else
    rm -f "$stamp"
    "$python" -m pip install -q --upgrade pip
    say "installing $torch_requirement${torch_index:+ from $torch_index}"
    if [ -n "$torch_index" ]; then
        "$python" -m pip install -q --index-url "$torch_index" "$torch_requirement"
    else
        "$python" -m pip install -q "$torch_requirement"
    fi
    torch_version="$(installed_torch)"
    constraints="$venv/torch-constraint.txt"
    echo "torch==$torch_version" > "$constraints"
    say "installing pixcontrast[$extras] with torch pinned to $torch_version"
    "$python" -m pip install -q -c "$constraints" -e "$root[$extras]"
    after="$(installed_torch)"
    if [ "$after" != "$torch_version" ]; then
        say "torch changed from $torch_version to $after while installing the rest"
        exit 1
    fi
    echo "$wanted" > "$stamp"
fi

[ $# -eq 0 ] && exit 0
cd "$root"
export VIRTUAL_ENV="$venv"
export PATH="$venv/bin:$PATH"
exec "$@"
