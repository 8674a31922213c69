"""Listen addresses (gateway.listen, api.listen): one parser, and a bad address is a config error at its line."""

from __future__ import annotations

import pytest

from modelfleet.reconciler.config import ConfigError, local_url, parse_config, parse_listen


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("localhost:8081") == ("localhost", 8081)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    assert parse_listen("[::]:9000") == ("::", 9000)
    assert parse_listen(":80") == ("0.0.0.0", 80)  # every interface


@pytest.mark.parametrize(("listen", "message"), [
    ("localhost", "expected host:port"),
    ("127.0.0.1:", "expected host:port"),
    ("127.0.0.1:http", "expected host:port"),
    ("127.0.0.1:65536", "expected host:port"),
    ("127.0.0.1:-1", "expected host:port"),
    ("127.0.0.1:\u00b2", "expected host:port"),  # a digit to str.isdigit(), not to int()
    ("::1:8080", "brackets"),
    ("[::1:8080", "brackets"),
])
def test_parse_listen_refuses(listen: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_listen(listen)


def test_local_url_reaches_wildcard_and_ipv6_addresses() -> None:
    assert local_url("0.0.0.0:8081") == "http://127.0.0.1:8081"
    assert local_url(":8081") == "http://127.0.0.1:8081"
    assert local_url("[::]:8081") == "http://127.0.0.1:8081"
    assert local_url("[::1]:8080") == "http://[::1]:8080"
    assert local_url("10.0.0.5:8080") == "http://10.0.0.5:8080"


def test_listen_addresses_are_validated_with_file_and_line() -> None:
    config = parse_config("gateway: {listen: '[::1]:8080'}\napi: {listen: ':8081'}\n")
    assert config.gateway.listen == "[::1]:8080"  # kept as written
    with pytest.raises(ConfigError) as caught:
        parse_config("repo: {branch: main}\ngateway:\n  listen: localhost\napi:\n  listen: 127.0.0.1:99999\n",
                     file="fleet.yaml")
    errors = {error.field: error for error in caught.value.errors}
    assert set(errors) == {"gateway.listen", "api.listen"}
    assert (errors["gateway.listen"].file, errors["gateway.listen"].line) == ("fleet.yaml", 3)
    assert errors["api.listen"].line == 5
    assert "expected host:port" in errors["gateway.listen"].message
    assert str(errors["gateway.listen"]).startswith("fleet.yaml:3: gateway.listen: expected host:port")
