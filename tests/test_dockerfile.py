"""The app image (Dockerfile, .dockerignore), checked statically (no Docker engine
here): locked dependencies in their own layer before the code, no tests or load
tests inside, and every module the image runs importable from what it holds."""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==")


def _instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _copied_sources() -> list[str]:
    sources = []
    for instruction, args in _instructions():
        if instruction == "COPY":
            sources += args.split()[:-1]
    return sources


def test_locked_dependencies_are_installed_before_the_code() -> None:
    steps = _instructions()
    install = next(
        index
        for index, (instruction, args) in enumerate(steps)
        if instruction == "RUN" and "pip install" in args
    )
    assert "--require-hashes" in steps[install][1]
    assert "-r app/ops/requirements/base.txt" in steps[install][1]
    before = [args for instruction, args in steps[:install] if instruction == "COPY"]
    # Only the lock comes before it, so a code change keeps that layer cached.
    assert before == ["app/ops/requirements/base.txt app/ops/requirements/base.txt"]
    after = [args for instruction, args in steps[install + 1 :] if instruction == "COPY"]
    assert after and all("requirements" not in args for args in after)
    # No second resolution: nothing else is pip-installed.
    assert sum("pip install" in args for instruction, args in steps if instruction == "RUN") == 1


def test_tests_and_load_tests_stay_out_of_the_image() -> None:
    sources = _copied_sources()
    assert sorted(sources) == sorted(
        ["app/ops/requirements/base.txt", "app", "mail", "gunicorn.conf.py"]
    ), sources
    # The build context itself: .dockerignore lets in only what is copied.
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = [pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")]
    for path in ("tests", "loadtests", "nginx", ".env", "secrets", ".venv", "var"):
        assert not any(fnmatch.fnmatch(path, pattern) for pattern in allowed), path
    # Operator tooling lives inside app/ but stays out; only its runtime lock is let back in.
    ops = patterns.index("app/ops/")
    assert patterns.index("!app/") < ops
    assert patterns[ops + 1] == "!app/ops/requirements/base.txt"
    assert [p for p in patterns if p.startswith("!app/ops")] == ["!app/ops/requirements/base.txt"]
    assert set(allowed) == set(sources)


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, package: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(parts + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            # `from app import keys` imports the submodule app.keys.
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def _closure(entries: list[str], first_party: set[str]) -> tuple[set[str], set[str]]:
    """(first-party modules reached, other top-level names imported) from the entries."""
    seen: set[str] = set()
    external: set[str] = set()
    todo = list(entries)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        top = name.split(".")[0]
        if top not in first_party:
            external.add(top)
            continue
        path = _module_file(name)
        if path is None:
            continue  # a name inside a module (`from app import keys` names both)
        seen.add(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        # Importing a.b.c runs a/__init__ and a/b/__init__ too.
        parents = [".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))]
        todo += parents + sorted(_imports(path, package))
    return seen, external


def test_everything_the_image_runs_imports_from_the_image() -> None:
    """gunicorn (gunicorn.conf.py, app.main:create_app), `python -m mail` and its
    `--check`: every module they import is copied into the image, in the
    standard library, or installed from app/ops/requirements/base.txt."""
    copied = {source for source in _copied_sources() if (ROOT / source).is_dir()}
    first_party = {path.name for path in ROOT.iterdir() if (path / "__init__.py").is_file()}
    gunicorn_conf = _imports(ROOT / "gunicorn.conf.py", "")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert compose["mail"]["command"] == ["python", "-m", "mail"]
    entries = ["app.main", "mail.__main__", *gunicorn_conf]
    reached, external = _closure(entries, first_party)
    assert {"app.main", "app.settings", "mail.worker"} <= reached
    outside = {name for name in reached if name.split(".")[0] not in copied}
    assert not outside, f"the image runs modules it does not hold: {sorted(outside)}"

    locked = {
        match.group(1).lower().replace("_", "-")
        for line in (ROOT / "app" / "ops" / "requirements" / "base.txt").read_text().splitlines()
        if (match := PIN.match(line))
    }
    provided = importlib.metadata.packages_distributions()
    missing = []
    for name in sorted(external - set(sys.stdlib_module_names) - {"__future__"}):
        distributions = {dist.lower().replace("_", "-") for dist in provided.get(name, [])}
        if not distributions & locked:
            missing.append(f"{name} (from {sorted(distributions) or 'nothing installed'})")
    assert not missing, f"imported by the image but not in app/ops/requirements/base.txt: {missing}"


def test_no_module_in_the_image_imports_a_package_left_out() -> None:
    # What used to break: app/status.py imported nginx/, which the image lacks.
    copied = {source for source in _copied_sources() if (ROOT / source).is_dir()}
    left_out = {path.name for path in ROOT.iterdir() if (path / "__init__.py").is_file()} - copied
    assert {"nginx", "loadtests", "tests"} <= left_out
    for package in sorted(copied):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.is_relative_to(ROOT / "app" / "ops"):
                continue  # left out by .dockerignore (above)
            dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            names = _imports(
                path, dotted.rpartition(".")[0] if path.name != "__init__.py" else dotted
            )
            bad = sorted(name for name in names if name.split(".")[0] in left_out)
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
