""".env.example: every commented-out variable is valid once uncommented.

make run sources .env with bash (`set -a; . ./.env`), honcho parses it again
for the Procfile's processes, and `make status` reads it too; a value bash
cannot source (``MAIL_FROM=PhoneShop <orders@...>`` is a redirection) stops
make run, and one the three read differently runs processes with different
settings."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import honcho.environ
import pytest

from app.ops.status import read_env_file
from app.settings import Settings
from mail.settings import MailSettings
from nginx.render import ENVIRONMENT, NginxConfig

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / ".env.example"
ASSIGNMENT = re.compile(r"^#([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


@pytest.fixture(scope="module")
def uncommented(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A copy of .env.example with every `#NAME=value` line uncommented."""
    lines, names = [], []
    for line in EXAMPLE.read_text().splitlines():
        match = ASSIGNMENT.match(line)
        if match:
            names.append(match.group(1))
            line = line[1:]
        lines.append(line)
    env_file = tmp_path_factory.mktemp("env") / ".env"
    env_file.write_text("\n".join(lines) + "\n")
    return env_file, names


def _source_with_bash(env_file: Path, names: list[str]) -> dict[str, str]:
    """What make run's `set -a; . ./.env; set +a` gives each variable (-u, -e as make has)."""
    dump = "; ".join(f'printf "%s\\0" "${{{name}}}"' for name in names)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", f'set -a; . "$1"; set +a; {dump}', "bash", env_file],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # e.g. "PhoneShop: command not found"
    values = result.stdout.split("\0")[:-1]
    return dict(zip(names, values, strict=True))


def test_there_is_something_to_uncomment(uncommented: tuple[Path, list[str]]) -> None:
    _, names = uncommented
    assert {"REDIS_PORT", "ADMIN_TOKEN", "MAIL_FROM", "HTTP_PORT", "WEB_ACCESS_LOG"} <= set(names)
    assert len(names) == len(set(names)), "a variable listed twice"


def test_every_line_sources_with_bash(uncommented: tuple[Path, list[str]]) -> None:
    env_file, names = uncommented
    values = _source_with_bash(env_file, names)
    assert values["MAIL_FROM"] == "PhoneShop <orders@phoneshop.localhost>"
    assert values["WEB_ACCESS_LOG"] == "-"
    assert values["REDIS_URL"] == "redis://127.0.0.1:6390/0"


def test_bash_honcho_and_make_status_read_the_same_values(
    uncommented: tuple[Path, list[str]],
) -> None:
    env_file, names = uncommented
    by_bash = _source_with_bash(env_file, names)
    by_honcho = honcho.environ.parse(env_file.read_text())
    by_status = read_env_file(env_file)
    for name in names:
        # honcho leaves an empty assignment out; empty means "the default" to everyone.
        assert by_honcho.get(name, "") == by_bash[name], name
        assert by_status[name] == by_bash[name], name


def test_the_uncommented_defaults_are_valid_settings(uncommented: tuple[Path, list[str]]) -> None:
    env_file, names = uncommented
    env = {**_source_with_bash(env_file, names), "ADMIN_TOKEN": "a-token-of-16-chars+"}
    settings = Settings.from_env(env)
    assert settings.redis_url == Settings.redis_url
    mail = MailSettings.from_env(env)
    assert mail.mail_from == MailSettings.mail_from, json.dumps(mail.mail_from)


def test_the_nginx_lines_are_the_renderers_defaults() -> None:
    """Every variable nginx/render.py reads is in .env.example, with NginxConfig's
    default (or empty, for the derived ones): changing a default there and not
    here fails."""
    example = dict(
        match.groups() for match in map(ASSIGNMENT.match, EXAMPLE.read_text().splitlines()) if match
    )
    assert set(ENVIRONMENT) <= set(example), set(ENVIRONMENT) - set(example)
    defaults = NginxConfig.from_env({})
    for name in ENVIRONMENT:
        if example[name]:
            assert NginxConfig.from_env({name: example[name]}) == defaults, name
