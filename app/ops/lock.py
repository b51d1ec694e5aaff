"""The lock files in app/ops/requirements/: exact versions with hashes, one per use.

pyproject.toml keeps version ranges; the locks pin what `make` and the
Dockerfile install (``pip install --require-hashes --no-deps -r ...``), so a
fresh machine gets the versions the tests passed with, not whatever was
released that morning (with ``filterwarnings = error`` a new
DeprecationWarning in an upgrade fails the suite).

=========  ======================================  ==========================
lock       pyproject's groups                      installed by
=========  ======================================  ==========================
base.txt   dependencies                            the Dockerfile (app image)
run.txt    dependencies + dev                      make run
test.txt   dependencies + dev + test               make test, make lint
load.txt   dependencies + dev + load               make bench/loadtest/soak
all.txt    dependencies + every extra              the constraint of the above
=========  ======================================  ==========================

Every lock is compiled against all.txt, so a package that two locks share has
the same version in both and one .venv can hold them together.

``python -m app.ops.lock check`` (stdlib only, offline; make runs it before every
install and a test runs it): each lock's first line records the SHA-256 of
pyproject's dependency sections it was compiled from; a lock whose hash is
not the current one is stale and the check fails, naming ``make lock``.
``python -m app.ops.lock compile`` (``make lock``) recompiles them all with
pip-compile (pip-tools) and records the hash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
LOCK_DIR = Path(__file__).resolve().parent / "requirements"
# The constraint every other lock is compiled against: compiled first.
ALL = "all"
LOCKS: dict[str, tuple[str, ...] | None] = {
    ALL: None,  # every extra
    "base": (),
    "run": ("dev",),
    "test": ("dev", "test"),
    "load": ("dev", "load"),
}
STAMP_PREFIX = "# pyproject-dependencies-sha256: "


def dependencies_hash(pyproject: Path = PYPROJECT) -> str:
    """SHA-256 of what a lock is compiled from; comments and formatting do not count."""
    project = tomllib.loads(pyproject.read_text())["project"]
    sections = {
        "requires-python": project.get("requires-python", ""),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
    }
    return hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()


def lock_path(name: str, lock_dir: Path = LOCK_DIR) -> Path:
    return lock_dir / f"{name}.txt"


def recorded_hash(path: Path) -> str | None:
    try:
        with path.open() as lock:
            first = lock.readline().rstrip("\n")
    except OSError:
        return None
    return first[len(STAMP_PREFIX) :] if first.startswith(STAMP_PREFIX) else None


def stale_locks(pyproject: Path = PYPROJECT, lock_dir: Path = LOCK_DIR) -> list[str]:
    """Names of the locks that are missing or compiled from other dependencies."""
    current = dependencies_hash(pyproject)
    return [name for name in LOCKS if recorded_hash(lock_path(name, lock_dir)) != current]


def check(pyproject: Path = PYPROJECT, lock_dir: Path = LOCK_DIR) -> int:
    stale = stale_locks(pyproject, lock_dir)
    if not stale:
        return 0
    names = ", ".join(f"{lock_dir.name}/{name}.txt" for name in stale)
    print(
        f"Stale lock: {names} not compiled from the dependencies now in {pyproject.name}.\n"
        "Run `make lock` (it needs the package index) and commit app/ops/requirements/.",
        file=sys.stderr,
    )
    return 1


def _pip_compile(name: str, extras: tuple[str, ...] | None, stamp: str) -> None:
    out = lock_path(name)
    command = [
        sys.executable,
        "-m",
        "piptools",
        "compile",
        "--quiet",
        "--generate-hashes",
        "--strip-extras",
        "--allow-unsafe",
        "--no-emit-index-url",
        "--no-emit-find-links",
        "--resolver=backtracking",
        "--output-file",
        str(out.relative_to(ROOT)),
    ]
    if extras is None:
        command.append("--all-extras")
    else:
        command += [f"--extra={extra}" for extra in extras]
        command += ["--constraint", str(lock_path(ALL).relative_to(ROOT))]
    # Start from nothing so that a compile never keeps an older pin by inertia:
    # `make lock` is the moment versions move.
    out.unlink(missing_ok=True)
    env = {**os.environ, "CUSTOM_COMPILE_COMMAND": "make lock"}
    subprocess.run([*command, "pyproject.toml"], cwd=ROOT, env=env, check=True)
    out.write_text(f"{STAMP_PREFIX}{stamp}\n" + out.read_text())


def compile_all() -> int:
    LOCK_DIR.mkdir(exist_ok=True)
    stamp = dependencies_hash()
    for name, extras in LOCKS.items():
        print(f"make lock: app/ops/requirements/{name}.txt", flush=True)
        _pip_compile(name, extras, stamp)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.ops.lock", description=__doc__.split("\n")[0]
    )
    parser.add_argument("action", choices=("check", "compile"))
    args = parser.parse_args(argv)
    return check() if args.action == "check" else compile_all()


if __name__ == "__main__":
    sys.exit(main())
