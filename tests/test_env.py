"""app/env.py: the one reader of integers, numbers and booleans from the environment."""

from __future__ import annotations

import math

import pytest

from app.env import SettingsError, env_bool, env_float, env_int
from app.ops.instances import instance_ports
from nginx.render import NginxConfig, RenderError


@pytest.mark.parametrize(("raw", "value"), [("", 7), ("  ", 7), ("0", 0), (" 12 ", 12), ("-3", -3)])
def test_an_integer_in_bounds_or_the_default(raw: str, value: int) -> None:
    assert env_int({"N": raw}, "N", 7, -5, 20) == value
    assert env_int({}, "N", 7, -5, 20) == 7


@pytest.mark.parametrize("raw", ["21", "-6", "1.5", "1e3", "x", "٣", "+", "9" * 40])
def test_an_integer_out_of_type_or_bounds_is_refused_naming_the_variable(raw: str) -> None:
    with pytest.raises(SettingsError, match=r"^N must be an integer from -5 to 20, got "):
        env_int({"N": raw}, "N", 7, -5, 20)


@pytest.mark.parametrize("raw", ["nan", "inf", "-0.5", "11", "ten"])
def test_a_number_out_of_type_or_bounds_is_refused(raw: str) -> None:
    with pytest.raises(SettingsError, match=r"^F must be a number from 0.0 to 10.0, got "):
        env_float({"F": raw}, "F", 1.0, 0.0, 10.0)
    assert math.isclose(env_float({"F": "2.5"}, "F", 1.0, 0.0, 10.0), 2.5)


def test_a_boolean_in_any_usual_spelling() -> None:
    for raw in ("1", "true", "YES", " on "):
        assert env_bool({"B": raw}, "B", False) is True
    for raw in ("0", "False", "no", "off"):
        assert env_bool({"B": raw}, "B", True) is False
    assert env_bool({}, "B", True) is True
    with pytest.raises(SettingsError, match="B must be a boolean"):
        env_bool({"B": "maybe"}, "B", True)


def test_each_reader_raises_its_own_error_type_with_the_same_rules() -> None:
    with pytest.raises(SystemExit, match="WEB_INSTANCES must be an integer from 1 to 64"):
        instance_ports({"WEB_INSTANCES": "65"})
    with pytest.raises(RenderError, match="LIMIT_CONN must be an integer from 1 to"):
        NginxConfig.from_env({"LIMIT_CONN": "0"})
