"""The lock files (app/ops/requirements/*.txt, app/ops/lock.py): fresh, exact, hashed, and used."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from app.ops.lock import LOCK_DIR, LOCKS, check, dependencies_hash, lock_path, stale_locks

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ \\]+) \\$")


def _pins(name: str) -> dict[str, str]:
    return {
        match.group(1).lower().replace("_", "-"): match.group(2)
        for line in lock_path(name).read_text().splitlines()
        if (match := PIN.match(line))
    }


def test_the_committed_locks_are_fresh() -> None:
    # Fails after a change to pyproject.toml's dependencies without `make lock`.
    assert stale_locks() == []
    result = subprocess.run(
        [sys.executable, "-m", "app.ops.lock", "check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_a_changed_dependency_makes_every_lock_stale(tmp_path: Path, capsys) -> None:
    pyproject = tmp_path / "pyproject.toml"
    text = (ROOT / "pyproject.toml").read_text()
    locks = tmp_path / "requirements"
    shutil.copytree(LOCK_DIR, locks)
    pyproject.write_text(text)
    assert check(pyproject, locks) == 0

    # A comment is no dependency change.
    pyproject.write_text(text.replace("dependencies = [", "dependencies = [\n    # why\n", 1))
    assert check(pyproject, locks) == 0

    pyproject.write_text(text.replace('"aiohttp>=3.10"', '"aiohttp>=3.11"', 1))
    assert dependencies_hash(pyproject) != dependencies_hash(ROOT / "pyproject.toml")
    assert stale_locks(pyproject, locks) == list(LOCKS)
    assert check(pyproject, locks) == 1
    assert "Run `make lock`" in capsys.readouterr().err

    # A new extra changes what the locks must hold too.
    pyproject.write_text(text.replace("load = [", 'docs = ["x>=1"]\nload = [', 1))
    assert check(pyproject, locks) == 1


def test_a_lock_without_its_stamp_is_stale(tmp_path: Path) -> None:
    locks = tmp_path / "requirements"
    shutil.copytree(LOCK_DIR, locks)
    run = locks / "run.txt"
    run.write_text(run.read_text().split("\n", 1)[1])
    assert stale_locks(ROOT / "pyproject.toml", locks) == ["run"]


@pytest.mark.parametrize("name", list(LOCKS))
def test_every_requirement_is_pinned_with_hashes(name: str) -> None:
    lines = lock_path(name).read_text().splitlines()
    requirements = [line for line in lines if line and not line[0].isspace() and line[0] != "#"]
    assert requirements, name
    for line in requirements:
        assert PIN.match(line), f"{name}: not an exact pin with hashes: {line!r}"
    hashes = sum(1 for line in lines if line.strip().startswith("--hash=sha256:"))
    assert hashes >= len(requirements)
    # No index, find-links or file path of this machine leaks into a lock.
    assert not any(
        line.startswith(("--index-url", "--extra-index-url", "--find-links")) for line in lines
    )
    assert "file://" not in "\n".join(lines)


def test_the_locks_agree_and_hold_their_groups() -> None:
    everything = _pins("all")
    for name in LOCKS:
        pins = _pins(name)
        assert all(everything[package] == version for package, version in pins.items()), name
    base, run, test, load = (set(_pins(name)) for name in ("base", "run", "test", "load"))
    assert base < run < test and run < load
    assert {"aiohttp", "gunicorn", "redis", "hiredis"} <= base
    assert {"honcho", "aiosmtpd"} <= run - base
    assert {"pytest", "playwright", "ruff"} <= test - run
    # make run and the image carry no test or load tool.
    assert {"pytest", "playwright", "locust", "matplotlib", "py-spy"}.isdisjoint(run)
    assert {"matplotlib", "py-spy"} <= load - test


def test_redis_py_is_pinned_narrowly() -> None:
    # app/fastredis.py imports redis._parsers, a private module: a minor release may move it.
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [dep for dep in dependencies if dep.startswith("redis")]
    match = re.fullmatch(r"redis\[hiredis\]>=(\d+)\.(\d+),<(\d+)\.(\d+)", spec)
    assert match, spec
    low_major, low_minor, high_major, high_minor = map(int, match.groups())
    assert (high_major, high_minor) == (low_major, low_minor + 1)
    locked = _pins("base")["redis"]
    assert locked.startswith(f"{low_major}.{low_minor}.")
    import redis._parsers  # noqa: F401, the private module fastredis needs
    from redis import __version__

    assert __version__ == locked


def test_make_and_the_dockerfile_install_from_the_locks() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet --require-hashes --no-deps -r $<" in makefile
    assert "$(PYTHON) -m app.ops.lock check" in makefile
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes" in dockerfile and "app/ops/requirements/base.txt" in dockerfile
