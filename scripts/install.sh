#!/usr/bin/env bash
# Create a virtual environment with axolotl-chainlora, its test, benchmark and DeepSpeed extras and axolotl as the host.
#   bash scripts/install.sh          -> .venv, Python 3.12, axolotl 0.21.0 (the main leg)
#   bash scripts/install.sh 0.19.0   -> .venv-axolotl-0.19, Python 3.11, axolotl 0.19.0 with the on-disk CPU torch 2.13.0
# Re-runnable: dependencies are reinstalled only when this script or pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."

AXOLOTL_VERSION=${1:-0.21.0}
case "$AXOLOTL_VERSION" in
    0.21.0) VENV=.venv PYTHON_VERSION=3.12 PINS=() ;;
    0.19.0) VENV=.venv-axolotl-0.19 PYTHON_VERSION=3.11 PINS=("torch==2.13.0") ;;
    *) echo "install: axolotl $AXOLOTL_VERSION is not a tested host (0.21.0 or 0.19.0)" >&2; exit 2 ;;
esac

find_python() {
    local pyenv_version
    pyenv_version=$(pyenv versions --bare 2>/dev/null | grep -E "^${PYTHON_VERSION}\.[0-9]+$" | tail -1 || true)
    if [ -n "$pyenv_version" ] && PYENV_VERSION="$pyenv_version" "python$PYTHON_VERSION" --version >/dev/null 2>&1; then
        echo "env PYENV_VERSION=$pyenv_version python$PYTHON_VERSION"
    elif command -v "python$PYTHON_VERSION" >/dev/null 2>&1; then
        echo "python$PYTHON_VERSION"
    else
        echo "install: axolotl $AXOLOTL_VERSION needs Python $PYTHON_VERSION; none found" >&2
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
"$VENV/bin/python" -m pip install --quiet -e ".[test,bench]" "axolotl==${AXOLOTL_VERSION}" "${PINS[@]}"
# DeepSpeed's source distribution builds against the torch just installed, its C++ ops left to compile on first use
DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install --quiet --no-build-isolation -e ".[deepspeed]" "${PINS[@]}"
rm -f "$VENV"/.chainlora-install-*
touch "$stamp"
echo "install: $VENV done ($("$VENV/bin/python" -c 'import peft, torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")' 2>/dev/null))"
