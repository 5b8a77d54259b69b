"""The tested environment of one leg as a pip constraints file (locks/axolotl-<minor>.txt), and the check of a venv
against it. scripts/install.sh runs this with the venv's own interpreter:

    python scripts/pip_lock.py write LOCK LEG   # LOCK := this interpreter's `pip freeze` (after `install.sh --latest`)
    python scripts/pip_lock.py check LOCK       # exit 1, naming each difference, unless `pip freeze` equals LOCK

`pip freeze --all --exclude-editable`: pip and setuptools are part of what was tested (the DeepSpeed source build
uses them), this project's own editable install is not.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
from pathlib import Path

from packaging.utils import canonicalize_name


def installed() -> dict[str, str]:
    """name -> version of everything this interpreter's pip sees, this project excepted."""
    freeze = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return parse(freeze)


def parse(text: str) -> dict[str, str]:
    """name -> version of the `name==version` lines of a freeze or lock; comments and blank lines skipped."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, separator, version = line.partition("==")
        if not separator:
            raise ValueError(f"{line!r} is not a name==version pin: a lock holds only exact versions")
        pins[canonicalize_name(name)] = version.strip()
    return pins


def differences(lock: dict[str, str], venv: dict[str, str]) -> list[str]:
    """One line per package whose installed version is not the locked one, sorted by name; empty when they agree."""
    lines = []
    for name in sorted(lock.keys() | venv.keys()):
        if name not in venv:
            lines.append(f"{name}: locked {lock[name]}, not installed")
        elif name not in lock:
            lines.append(f"{name}: installed {venv[name]}, not in the lock")
        elif lock[name] != venv[name]:
            lines.append(f"{name}: locked {lock[name]}, installed {venv[name]}")
    return lines


def write(lock_path: Path, leg: str) -> None:
    pins = installed()
    header = (
        f"# The tested environment of the axolotl {leg} leg: "
        f"Python {platform.python_version()}, {platform.machine()}.\n"
        f"# Resolved fresh on {datetime.date.today().isoformat()} by `bash scripts/install.sh --latest {leg}`, "
        "which wrote this file after the unit tests passed.\n"
        "# scripts/install.sh installs exactly these versions (pip --constraint) "
        "and checks `pip freeze` against them.\n"
    )
    lock_path.write_text(header + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))


def check(lock_path: Path) -> int:
    lines = differences(parse(lock_path.read_text()), installed())
    if lines:
        print(f"pip_lock: {sys.prefix} differs from {lock_path}:", *lines, sep="\n  ", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    write_parser = commands.add_parser("write", help="write LOCK from this interpreter's pip freeze")
    write_parser.add_argument("lock", type=Path)
    write_parser.add_argument("leg", help="the axolotl version the leg installs, e.g. 0.21.0")
    commands.add_parser("check", help="exit 1 unless this interpreter's pip freeze equals LOCK").add_argument(
        "lock", type=Path
    )
    args = parser.parse_args()
    if args.command == "write":
        write(args.lock, args.leg)
        return 0
    return check(args.lock)


if __name__ == "__main__":
    sys.exit(main())
