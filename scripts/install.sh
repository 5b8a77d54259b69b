#!/usr/bin/env bash
# Create .venv (Python 3.12) with axolotl-chainlora, its test extras and axolotl 0.21.
# Re-runnable: dependencies are reinstalled only when this script or pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${CHAINLORA_VENV:-.venv}
AXOLOTL_VERSION=0.21.0

find_python() {
    if PYENV_VERSION=3.12.1 python3.12 --version >/dev/null 2>&1; then
        echo "env PYENV_VERSION=3.12.1 python3.12"
    elif command -v python3.12 >/dev/null 2>&1; then
        echo "python3.12"
    else
        echo "axolotl ${AXOLOTL_VERSION} needs Python >= 3.12; none found" >&2
        exit 1
    fi
}

stamp="$VENV/.chainlora-install-$(cat scripts/install.sh pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
    echo "install: $VENV is up to date"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    $(find_python) -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e ".[test]" "axolotl==${AXOLOTL_VERSION}"
rm -f "$VENV"/.chainlora-install-*
touch "$stamp"
echo "install: done ($("$VENV/bin/python" -c 'import peft, torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")'))"
