"""`make venv` on a user's machine (the Makefile, run for real in a temp copy):
a half-made .venv is made again, an old Python is refused with a clear message,
and a Python without ensurepip (Debian without python3-venv) gets its venv
package from apt-get before the venv is made."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A folder holding the project's Makefile, as a fresh clone has it."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    return tmp_path


def _make(checkout: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MAKE")}
    env.pop("VIRTUAL_ENV", None)
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(checkout), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
    )


def _pip_works(venv: Path) -> bool:
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "--version"], capture_output=True, timeout=60
    )
    return result.returncode == 0


def _script(path: Path, text: str) -> Path:
    path.write_text("#!/bin/bash\n" + text)
    path.chmod(0o755)
    return path


def test_a_half_made_venv_is_made_again(checkout: Path) -> None:
    venv = checkout / ".venv"
    # What Debian's `python3 -m venv` leaves without python3-venv: a python, no pip.
    subprocess.run([PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    assert not _pip_works(venv)

    result = _make(checkout, "venv", f"PYTHON={PYTHON}")
    assert result.returncode == 0, result.stderr
    assert ".venv is incomplete" in result.stdout
    assert _pip_works(venv)

    # Once whole, it is left alone.
    marker = venv / "kept"
    marker.touch()
    again = _make(checkout, "venv", f"PYTHON={PYTHON}")
    assert again.returncode == 0, again.stderr
    assert "incomplete" not in again.stdout and marker.exists()


def test_an_old_python_is_refused_with_a_clear_message(checkout: Path, tmp_path: Path) -> None:
    old = _script(
        tmp_path / "python3.9",
        'if [ "$1" = -V ]; then echo "Python 3.9.2"; exit 0; fi\n'
        # Anything else runs the real interpreter pretending to be 3.9.
        f'exec {PYTHON} -c "import sys; sys.exit(1)"\n',
    )
    result = _make(checkout, "venv", f"PYTHON={old}")
    assert result.returncode != 0
    assert f"PhoneShop needs Python 3.11 or newer; PYTHON={old} is Python 3.9.2." in result.stderr
    assert "make run PYTHON=python3.12" in result.stderr
    assert not (checkout / ".venv").exists()

    missing = _make(checkout, "venv", "PYTHON=python3-not-installed")
    assert missing.returncode != 0
    assert "PYTHON=python3-not-installed is not found." in missing.stderr


def test_a_python_without_ensurepip_gets_its_venv_package(checkout: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A Debian python3 without python3.X-venv: `import ensurepip` fails.
    python = _script(
        bin_dir / "python3",
        f'case "$*" in *"import ensurepip"*) exit 1;; esac\nexec {PYTHON} "$@"\n',
    )
    log = tmp_path / "apt-get.log"
    _script(bin_dir / "apt-get", f'echo "$@" >> {log}\n')
    result = _make(checkout, "venv", f"PYTHON={python}", path=f"{bin_dir}:{os.environ['PATH']}")
    assert result.returncode == 0, result.stderr
    assert f"cannot make a venv without python{VERSION}-venv: installing it" in result.stdout
    installs = log.read_text().splitlines()
    assert installs and installs[0].startswith("install -y --no-install-recommends")
    assert installs[0].endswith(f" python{VERSION}-venv")
    assert _pip_works(checkout / ".venv")


def test_make_help_lists_every_target(checkout: Path) -> None:
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    assert {"run", "test", "lint", "status", "loadtest", "bench", "soak", "lock"} <= targets
    result = _make(checkout, "help")
    assert result.returncode == 0, result.stderr
    listed = set(re.findall(r"\bmake ([a-z][a-z-]*)", result.stdout))
    assert targets <= listed, f"not in make help: {sorted(targets - listed)}"
