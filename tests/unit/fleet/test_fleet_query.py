"""Target conditions: IoT Hub-like syntax, evaluation over device documents, errors with positions."""

from __future__ import annotations

import pytest

from modelfleet.deployer.fleet.query import QueryError, parse_query

PI = {
    "deviceId": "pi-1",
    "online": True,
    "tags": {"site": "plant-1", "hw": "rpi4", "ring": 0, "floor": 2.5},
    "reported": {"model": {"name": "digits", "version": 3}, "status": "applied"},
}
JETSON = {"deviceId": "jet-7", "online": False, "tags": {"site": "plant-2", "hw": "jetson"}, "reported": {}}


@pytest.mark.parametrize(
    ("query", "pi", "jetson"),
    [
        ("*", True, True),
        ("tags.site = 'plant-1' AND tags.hw = 'rpi4'", True, False),
        ("tags.site = 'plant-1' or tags.hw = 'jetson'", True, True),
        ("NOT tags.site = 'plant-1'", False, True),
        ("tags.site != 'plant-1'", False, True),
        ("tags.site <> 'plant-2'", True, False),
        ("tags.hw IN ['rpi4', 'x86']", True, False),
        ("tags.hw NOT IN ['rpi4']", False, True),
        ("reported.model.version = 3", True, False),
        ("properties.reported.model.version >= 3", True, False),
        ("reported.model.version < 3", False, False),
        ("tags.floor > 2 AND tags.floor <= 2.5", True, False),
        ("tags.ring = 0", True, False),
        ("tags.ring = '0'", False, False),
        ("tags.ring = 0.0", True, False),
        ("tags.ring = false", False, False),
        ("online = 1", False, False),
        ("online != 1", True, True),
        ("deviceId = 'jet-7'", False, True),
        ("online = true", True, False),
        ("(tags.site = 'plant-2' OR tags.ring = 0) AND NOT (deviceId = 'pi-1')", False, True),
        ("tags.missing != 'x'", False, False),
        ('tags.site = "plant-1"', True, False),
        ("tags.site > 'plant-1'", False, True),
    ],
)
def test_query_evaluates_like_iot_hub_target_conditions(query: str, pi: bool, jetson: bool) -> None:
    q = parse_query(query)
    assert (q.matches(PI), q.matches(JETSON)) == (pi, jetson)


def test_and_binds_tighter_than_or() -> None:
    q = parse_query("deviceId = 'jet-7' OR tags.site = 'plant-1' AND tags.hw = 'jetson'")
    assert q.matches(JETSON)
    assert not q.matches(PI)


def test_quotes_escape_inside_strings() -> None:
    assert parse_query("tags.name = 'o''brien'").matches({"tags": {"name": "o'brien"}})


@pytest.mark.parametrize(
    ("query", "position", "fragment"),
    [
        ("", 1, "expected a condition or '*'"),
        ("tags.site = ", 12, "expected a value"),
        ("tags.site = AND", 13, "expected a value"),
        ("tags.site 'x'", 11, "expected a comparison"),
        ("tags.site = 'x' AND", 20, "expected a field"),
        ("(tags.site = 'x'", 17, "expected ')'"),
        ("tags.site = 'x' tags.hw = 'y'", 17, "expected AND, OR or end of query"),
        ("tags.site = 'unterminated", 13, "unterminated string"),
        ("tags.site ~ 'x'", 11, "unexpected character '~'"),
        ("tags.hw IN ['a' 'b']", 17, "expected ',' or ']'"),
        ("tags.hw IN 'a'", 12, "expected '['"),
        ("* AND tags.x = 1", 3, "end of query after '*'"),
        ("tags.hw NOT = 'a'", 13, "expected IN after NOT"),
    ],
)
def test_malformed_query_names_the_position(query: str, position: int, fragment: str) -> None:
    with pytest.raises(QueryError) as err:
        parse_query(query)
    message = str(err.value)
    assert f"at position {position}:" in message
    assert fragment in message
    assert err.value.hint
