"""TLS (``rediss://``), username/password in the URL, and credentials kept out of logs, errors and reprs.

A redis-server of this module's own serves TLS with certificates made by
openssl in a temp dir (a private CA, a server certificate for 127.0.0.1 and a
client certificate: the server requires one, as production setups with mutual
TLS do). TLS options travel as URL query parameters redis-py understands:
``ssl_ca_certs``, ``ssl_cert_reqs``, ``ssl_certfile``, ``ssl_keyfile``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
import redis
import structlog
from click.testing import CliRunner
from structlog.testing import capture_logs

from slowburn_redis import Budget
from slowburn_redis.errors import RedisUnavailable, SlowburnError
from tests.servers import RedisServer, free_port, redis_server_available

pytestmark = pytest.mark.realredis

USER = "svc-user"
SECRET = "S3cr3t-p@ss:w/rd%?#&=+ é"
"""A password with every character that has a meaning in a URL."""
ENCODED_SECRET = quote(SECRET, safe="")


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("SLOWBURN_REQUIRE_REAL_REDIS", "") not in ("", "0", "false"):
            pytest.fail(f"{tool} is required (SLOWBURN_REQUIRE_REAL_REDIS) but not on PATH")
        pytest.skip(f"{tool} not on PATH")


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


def _make_ca(directory: Path, name: str) -> None:
    _openssl(directory, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key")
    _openssl(
        directory, "req", "-x509", "-new", "-key", f"{name}.key", "-out", f"{name}.crt",
        "-days", "2", "-subj", f"/CN=slowburn test {name}",
    )  # fmt: skip


def _make_cert(directory: Path, name: str, ca: str, extensions: str) -> None:
    _openssl(directory, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key")
    _openssl(directory, "req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    (directory / f"{name}.ext").write_text(extensions + "\n")
    _openssl(
        directory, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    _require("openssl")
    directory = tmp_path_factory.mktemp("certs")
    _make_ca(directory, "ca")
    _make_ca(directory, "other-ca")
    _make_cert(directory, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost")
    _make_cert(directory, "client", "ca", "extendedKeyUsage=clientAuth")
    return Certs(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.crt",
    )


@dataclass(frozen=True)
class TlsServer:
    server: RedisServer
    tls_port: int
    certs: Certs

    def url(
        self,
        *,
        user: str | None = USER,
        password: str = ENCODED_SECRET,
        ca: Path | None = None,
        client_cert: bool = True,
        port: int | None = None,
        scheme: str = "rediss",
    ) -> str:
        query: dict[str, str] = {}
        if scheme == "rediss":
            query = {"ssl_cert_reqs": "required", "ssl_ca_certs": str(ca or self.certs.ca)}
            if client_cert:
                query |= {"ssl_certfile": str(self.certs.client_cert), "ssl_keyfile": str(self.certs.client_key)}
        auth = f"{user}:{password}@" if user is not None else ""
        return f"{scheme}://{auth}127.0.0.1:{port or self.tls_port}/0" + ("?" + urlencode(query) if query else "")


@pytest.fixture(scope="module")
def tls(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """TLS on its own port (client certificates required); the plain port serves only the test's setup."""
    if not redis_server_available():
        _require("redis-server")
    tls_port = free_port()
    server = RedisServer(
        tmp_path_factory.mktemp("tls"),
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(certs.server_cert),
        "--tls-key-file", str(certs.server_key),
        "--tls-ca-cert-file", str(certs.ca),
        "--tls-auth-clients", "yes",
    )  # fmt: skip
    server.start()
    root = redis.Redis(port=server.port)
    root.execute_command("ACL", "SETUSER", USER, "on", ">" + SECRET, "~*", "&*", "+@all")
    root.close()
    yield TlsServer(server, tls_port, certs)
    server.stop()


def assert_secret_free(*texts: object) -> None:
    """None of `texts` shows the password, raw or URL-encoded."""
    for text in texts:
        shown = str(text)
        assert SECRET not in shown and ENCODED_SECRET not in shown, shown
        assert "S3cr3t" not in shown, shown


def exception_text(exc: BaseException) -> str:
    """Everything a traceback of `exc` would print, causes and context included."""
    return "".join(traceback.format_exception(exc))


# TLS ------------------------------------------------------------------------------


async def test_rediss_runs_a_budget_with_waiting_over_tls(tls: TlsServer) -> None:
    async with Budget.from_url(tls.url(), prefix="tls") as budget:
        assert await budget.engine.client.execute_command("ACL", "WHOAMI") == USER
        await budget.set_limits("acme", ["usd 1/day", "concurrency 1"])
        first = await budget.acquire("acme", usd=0.4)
        waiting = asyncio.ensure_future(budget.acquire("acme", usd=0.4, timeout=10))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # concurrency 1: woken only by the pub/sub message over TLS
        await first.commit(usd=0.3)
        second = await asyncio.wait_for(waiting, 5)
        await second.commit(usd=0.3)
        status = await budget.status("acme")
        assert next(row for row in status.limits if row.limit.dimension == "usd").used == pytest.approx(0.6)
        sync = budget.sync()
        try:
            usd = next(row for row in sync.status("acme").limits if row.limit.dimension == "usd")
            assert usd.used == pytest.approx(0.6)
            assert [str(limit) for limit in sync.get_limits("acme")] == ["usd 1/day", "concurrency 1"]
        finally:
            sync.close()


@pytest.mark.parametrize(
    "case",
    ["plain-to-tls-port", "wrong-ca", "no-client-cert", "tls-to-plain-port"],
)
async def test_tls_mismatches_are_refused_without_showing_the_password(tls: TlsServer, case: str) -> None:
    url = {
        "plain-to-tls-port": tls.url(scheme="redis"),
        "wrong-ca": tls.url(ca=tls.certs.other_ca),
        "no-client-cert": tls.url(client_cert=False),
        # The handshake would wait for a ServerHello that never comes: bounded by the connect timeout.
        "tls-to-plain-port": tls.url(port=tls.server.port) + "&socket_connect_timeout=1",
    }[case]
    budget = Budget.from_url(url, prefix="tls", on_unavailable="raise")
    with pytest.raises(RedisUnavailable) as info:  # a failed handshake is "unreachable", never a hang
        await asyncio.wait_for(budget.status("acme"), 8)
    assert_secret_free(exception_text(info.value), budget.description)
    await budget.aclose()


# credentials ------------------------------------------------------------------------


async def test_username_and_password_in_the_url_log_in(tls: TlsServer) -> None:
    plain = tls.url(scheme="redis", port=tls.server.port)
    async with Budget.from_url(plain, prefix="cred") as budget:
        assert await budget.engine.client.execute_command("ACL", "WHOAMI") == USER
        await budget.set_limits("acme", ["requests 5/min"])
        await (await budget.acquire("acme")).commit()


async def test_a_wrong_password_is_refused_without_echoing_it(tls: TlsServer) -> None:
    wrong = quote(SECRET[::-1] + "S3cr3t", safe="")
    for url in (tls.url(password=wrong), tls.url(scheme="redis", port=tls.server.port, password=wrong)):
        budget = Budget.from_url(url, prefix="cred", on_unavailable="raise")
        with pytest.raises(redis.AuthenticationError) as info:
            await budget.status("acme")
        text = exception_text(info.value)
        assert "S3cr3t" not in text and wrong not in text, text
        await budget.aclose()


async def test_repr_description_and_client_repr_hide_the_credentials(tls: TlsServer) -> None:
    budget = Budget.from_url(tls.url(), prefix="cred")
    sync = budget.sync()
    try:
        texts = [repr(budget), str(budget), budget.description, repr(budget.engine.client), repr(sync), str(sync)]
        assert_secret_free(*texts)
        assert USER not in budget.description
        assert budget.description == f"rediss://127.0.0.1:{tls.tls_port}/0"
    finally:
        sync.close()
        await budget.aclose()


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[list[Any]]:
    """structlog events (as captured dicts) and stdlib log records, at every level."""
    with capture_logs() as events, caplog.at_level(logging.DEBUG):
        yield [events, caplog]


async def _work_and_fail(tls: TlsServer) -> list[str]:
    """A session that works, then each way of failing that logs; returns the error texts."""
    errors: list[str] = []
    async with Budget.from_url(tls.url(), prefix="logs") as budget:
        await budget.set_limits("acme", ["usd 1/day"])
        reservation = await budget.acquire("acme", usd=0.2)
        await reservation.commit(usd=0.3)  # an overrun: logged at warning level
        await budget.reset("acme")
        await budget.status("acme")
    closed = f"redis://{USER}:{ENCODED_SECRET}@127.0.0.1:{free_port()}/0"
    for policy in ("raise", "wait", "allow"):
        budget = Budget.from_url(closed, prefix="logs", on_unavailable=policy, retry_timeout=0.3)
        try:
            reservation = await budget.acquire("acme", usd=0.1, timeout=0.3)
            await reservation.commit(usd=0.1)  # fail-open: settles without Redis, logged
            await budget.status("acme")
        except (SlowburnError, redis.RedisError) as exc:
            errors.append(exception_text(exc))
        finally:
            await budget.aclose()
    return errors


async def test_credentials_never_appear_in_logs_or_errors(tls: TlsServer, all_logs: list[Any]) -> None:
    events, caplog = all_logs
    errors = await _work_and_fail(tls)
    assert len(errors) == 3  # raise and wait fail the acquire; allow fails status
    assert all("unavailable" in error for error in errors), errors
    assert_secret_free(*errors)
    assert events, "the session logged nothing: the capture is broken"
    assert any(event.get("event") == "budget.fail_open" for event in events)
    assert any(event.get("event") == "redis.unavailable" for event in events)
    for event in events:
        assert_secret_free(repr(event))
    for record in caplog.records:
        assert_secret_free(record.getMessage(), repr(record.args), record.exc_text or "")


async def test_credentials_never_appear_in_rendered_log_output(
    tls: TlsServer, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The same session through the configured structlog renderer and stdlib handlers."""
    structlog.reset_defaults()
    with caplog.at_level(logging.DEBUG):
        errors = await _work_and_fail(tls)
    out, err = capsys.readouterr()
    assert "redis.unavailable" in out + err + caplog.text
    assert_secret_free(out, err, caplog.text, *errors)


def test_cli_errors_do_not_show_credentials(tls: TlsServer) -> None:
    from slowburn_redis.cli import cli

    runner = CliRunner()
    wrong = tls.url(password=quote("S3cr3t-wrong", safe=""))
    for args in (["status", "acme"], ["limits", "set", "acme", "usd 1/day"], ["reset", "acme", "--yes"]):
        result = runner.invoke(cli, ["--redis-url", wrong, *args])
        assert result.exit_code == 1, (args, result.output)
        assert "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert_secret_free(result.output, exception_text(result.exception) if result.exception else "")
    assert runner.invoke(cli, ["--redis-url", tls.url(), "limits", "set", "acme", "usd 1/day"]).exit_code == 0
    good = runner.invoke(cli, ["--redis-url", tls.url(), "status", "acme"])
    assert good.exit_code == 0, good.output
    assert_secret_free(good.output)


def test_cli_gives_up_on_an_unreachable_redis_without_showing_credentials() -> None:
    closed = f"redis://{USER}:{ENCODED_SECRET}@127.0.0.1:{free_port()}/0"
    try:
        result = subprocess.run(
            ["slowburn-redis", "--redis-url", closed, "status", "acme"],
            capture_output=True, text=True, timeout=15, env=os.environ | {"PATH": _venv_path()},
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        assert_secret_free(exc.output or "", exc.stderr or "")  # what it printed while retrying
        raise
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert_secret_free(result.stdout, result.stderr)


def _venv_path() -> str:
    """PATH with this interpreter's bin folder first, where the console script lives."""
    import sys

    return str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
