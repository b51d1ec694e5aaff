"""The top-level packages import one way (README: Layout).

    app  <-  mail  <-  loadtests  <-  tests
     ^                    |
     +----  nginx  <------+

app is the core and imports none of the others; mail and nginx import app only;
loadtests (and its support/ package, which the tests use too) may import app,
mail and nginx; tests may import everything, and nothing imports tests. No
package imports another package's private name (``_x``), a module or a name,
and no test module imports another (what they share is in tests/helpers.py and
the fixture plugins).

Every ``import`` statement of every module is read with ast, those inside
functions included, so a lazy import cannot slip through.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "mail", "nginx", "loadtests", "tests")
FORBIDDEN = {
    "app": {"mail", "nginx", "loadtests", "tests"},
    "mail": {"nginx", "loadtests", "tests"},
    "nginx": {"mail", "loadtests", "tests"},
    "loadtests": {"tests"},
    "tests": set(),
}


@dataclass(frozen=True)
class Import:
    line: int
    target: str  # the module, dotted and absolute
    names: tuple[str, ...]  # what ``from target import ...`` takes; () for ``import target``


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def imports_of(module: str, source: str, *, is_package: bool = False) -> list[Import]:
    """Every import of ``module`` (dotted name), relative ones made absolute."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(node.lineno, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".") if node.level else []
            if node.level > 1:
                base = base[: len(base) - (node.level - 1)]
            target = ".".join([*base, *([node.module] if node.module else [])])
            found.append(Import(node.lineno, target, tuple(a.name for a in node.names)))
    return found


def violations(module: str, source: str, *, is_package: bool = False) -> list[str]:
    """What ``module`` imports against the direction, one line each."""
    own = module.split(".")[0]
    problems = []
    for imported in imports_of(module, source, is_package=is_package):
        top, *rest = imported.target.split(".")
        where = f"{module}:{imported.line}"
        if top == "tests" and rest and rest[0].startswith("test_"):
            problems.append(f"{where} imports {imported.target}: a test module imports no other")
        if top not in PACKAGES or top == own:
            continue
        if top in FORBIDDEN.get(own, set()):
            problems.append(f"{where} imports {imported.target}: {own} must not import {top}")
        private = [p for p in rest if _private(p)] + [n for n in imported.names if _private(n)]
        if private:
            problems.append(
                f"{where} imports {', '.join(private)} of {imported.target}: a private name"
            )
    return problems


def modules(root: Path) -> list[tuple[str, Path]]:
    """(dotted name, path) of every .py file of the packages, and of the root's own .py files."""
    found = [(path.stem, path) for path in sorted(root.glob("*.py"))]
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found.append((".".join(parts), path))
    return found


def scan(root: Path) -> list[str]:
    problems = []
    for name, path in modules(root):
        is_package = path.name == "__init__.py"
        dotted = name.removesuffix(".__init__")
        problems += violations(dotted, path.read_text(encoding="utf-8"), is_package=is_package)
    return problems


def test_no_module_imports_against_the_direction() -> None:
    checked = modules(ROOT)
    assert len(checked) > 100  # the scan did find the code
    assert scan(ROOT) == []


def test_a_forbidden_import_is_caught_wherever_it_hides() -> None:
    bad = {
        ("app.admin.mail", "from mail import scripts"): "app must not import mail",
        ("app.main", "def f():\n    import nginx.render\n"): "app must not import nginx",
        ("app.ops.status", "from loadtests.support import servers"): "app must not import",
        ("mail.worker", "import loadtests.stack as stack"): "mail must not import loadtests",
        ("nginx.render", "from mail.settings import MailSettings"): "nginx must not import mail",
        ("loadtests.stack", "from tests.servers import free_port"): "loadtests must not import",
        ("mail.settings", "from app.settings import _int, redis_url_from_env"): "_int of app",
        ("tests.test_x", "from loadtests.bench_data import _Command"): "_Command of",
        ("tests.test_x", "from app._private import thing"): "_private of app._private",
        ("tests.test_x", "from tests.test_mail import seed_order"): "imports no other",
    }
    for (module, source), message in bad.items():
        found = violations(module, source)
        assert len(found) == 1 and message in found[0], (module, source, found)


def test_what_the_direction_allows_is_not_reported() -> None:
    allowed = [
        ("mail.worker", "from app import keys\nfrom app.vocabulary import decode_items"),
        ("nginx.render", "from app.ops.instances import instance_ports"),
        ("loadtests.bench_mail", "from mail.render import render_confirmation"),
        ("tests.test_x", "from loadtests.__main__ import locust_command\nimport nginx.render"),
        ("app.settings", "from app.env import _reader\nimport os, redis"),  # its own private name
        ("app.admin.mail", "from . import audit\nfrom ..scripts import load_source"),
    ]
    for module, source in allowed:
        assert violations(module, source) == [], (module, source)
    assert [i.target for i in imports_of("app.admin.mail", "from ..scripts import x")] == [
        "app.scripts"
    ]


def test_the_scan_fails_on_a_copy_with_one_bad_import(tmp_path: Path) -> None:
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text('"""A package."""\n')
    (tmp_path / "mail" / "worker.py").write_text("from app import keys\n")
    assert scan(tmp_path) == []
    (tmp_path / "app" / "admin.py").write_text("import os\n\nfrom mail import scripts\n")
    assert scan(tmp_path) == ["app.admin:3 imports mail: app must not import mail"]
