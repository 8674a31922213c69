"""The gateway process's startup: the app built from the config (state dir, token file) and the listening socket."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfleet.reconciler.config import parse_config
from modelfleet.reconciler.gateway.routes import ROUTES_DB
from modelfleet.reconciler.gateway.server import GatewayError, bind_socket, create_gateway


def test_create_gateway_from_the_config(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("  abc \n")
    config = parse_config(f"stateDir: {tmp_path}/state\ngateway: {{listen: 127.0.0.1:0, tokenFile: token}}\n",
                          base_dir=tmp_path)
    app = create_gateway(config)
    assert app.routes.source == str(tmp_path / "state" / ROUTES_DB)
    assert app._token == b"abc"
    missing = parse_config("gateway: {tokenFile: nope}\n", base_dir=tmp_path)
    with pytest.raises(GatewayError, match="tokenFile"):
        create_gateway(missing)
    (tmp_path / "empty").write_text(" \n")
    empty = parse_config("gateway: {tokenFile: empty}\n", base_dir=tmp_path)
    with pytest.raises(GatewayError, match="empty"):
        create_gateway(empty)


def test_a_port_in_use_is_a_gateway_error() -> None:
    taken = bind_socket("127.0.0.1", 0)
    try:
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(GatewayError, match=f"gateway.listen: cannot listen on 127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port).close()
    finally:
        taken.close()
