"""The real LiteLLM Proxy, in a subprocess, with the budget hook configured; clients in other processes.

The proxy forwards to the local stub. Several client processes (the openai
SDK, each with its own OpenAI ``user``, which the hook maps to an agent)
share a small dollar window: they queue instead of getting 429, the window
holds by admission time, and the ledger equals the stub's bill per agent.
In reject mode a spent budget answers 429 with Retry-After; a failing
request is refunded.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("litellm.proxy.proxy_server", reason="the litellm_proxy extra is not installed")

from slowburn_redis import Budget
from slowburn_redis.llm.bridge import stop_litellm_worker
from slowburn_redis.llm.meter import Meter
from tests.servers import free_port
from tests.stub_provider import StubProvider
from tests.test_integration_llm import ledger, ledger_by_agent

TENANT = "acme"
MODEL = "gpt-4o-mini"
MASTER = "sk-slowburn-test-" + "0" * 32

CLIENT = textwrap.dedent(
    """
    import sys, openai
    url, agent, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    client = openai.OpenAI(base_url=url, api_key=sys.argv[4], max_retries=0, timeout=120)
    for i in range(count):
        client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=40, user=agent,
            messages=[{"role": "user", "content": f"{agent} asks question {i}"}],
        )
    print("done", agent)
    """
)


class Proxy:
    """``litellm --config`` in a subprocess, with the hook configured from the environment."""

    def __init__(self, tmp: Path, stub: StubProvider, redis_url: str, prefix: str, **env: str) -> None:
        self.port = free_port()
        config = tmp / "config.yaml"
        config.write_text(
            textwrap.dedent(
                f"""
                model_list:
                  - model_name: {MODEL}
                    litellm_params:
                      model: openai/{MODEL}
                      api_base: {stub.base_url}
                      api_key: proxy
                litellm_settings:
                  callbacks: slowburn_redis.integrations.litellm_proxy.budget_hook
                """
            )
        )
        self.env = {
            **os.environ,
            "LITELLM_MASTER_KEY": MASTER,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_OFFLINE_MODE": "true",
            "SLOWBURN_REDIS_URL": redis_url,
            "SLOWBURN_PREFIX": prefix,
            "SLOWBURN_TENANT": TENANT,
            "SLOWBURN_TENANT_FROM": "none",
            "SLOWBURN_AGENT_FROM": "end_user",
            **env,
        }
        litellm = Path(sys.executable).with_name("litellm")
        self.log = (tmp / "proxy.log").open("w")
        self.proc = subprocess.Popen(
            [str(litellm), "--config", str(config), "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )
        self.logfile = tmp / "proxy.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, deadline: float = 180) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            assert self.proc.poll() is None, self.logfile.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health/liveliness", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("the proxy did not start:\n" + self.logfile.read_text()[-3000:])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture(autouse=True)
async def _litellm_worker_stopped() -> AsyncIterator[None]:
    yield
    await stop_litellm_worker()


@pytest.fixture
def stub() -> Iterator[StubProvider]:
    with StubProvider() as server:
        yield server


def start(tmp: Path, stub: StubProvider, url: str, prefix: str, **env: str) -> Proxy:
    proxy = Proxy(tmp, stub, url, prefix, **env)
    try:
        proxy.wait_ready()
    except BaseException:
        proxy.stop()
        raise
    return proxy


def run_clients(proxy: Proxy, agents: list[str], count: int) -> None:
    """One client process per agent, each sending `count` requests one after another; all must succeed."""
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, proxy.url, agent, str(count), MASTER],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for agent in agents
    ]
    outputs = [c.communicate(timeout=300) for c in clients]
    assert all(c.returncode == 0 for c in clients), outputs


def post(proxy: Proxy, content: str, user: str) -> tuple[int, dict[str, str], bytes]:
    import json

    body = json.dumps(
        {"model": MODEL, "max_tokens": 40, "user": user, "messages": [{"role": "user", "content": content}]}
    ).encode()
    request = urllib.request.Request(
        proxy.url + "/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {MASTER}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.mark.slow
async def test_client_processes_queue_on_the_proxy_and_match_the_bill(
    server_url: str, prefix: str, stub: StubProvider, tmp_path: Path
) -> None:
    stub.out_tokens = (40, 40)
    budget = Budget.from_url(server_url, prefix=prefix)
    meter = Meter(budget, TENANT)
    one = meter.estimate_chat(MODEL, [{"role": "user", "content": "agent-0 asks question 0"}], {"max_tokens": 40})
    limit = 4 * one.usd * 1.1
    await budget.set_limits(TENANT, [f"usd {limit:.9f}/2s"])
    proxy = await asyncio.to_thread(start, tmp_path, stub, server_url, prefix)
    try:
        await asyncio.to_thread(run_clients, proxy, [f"agent-{i}" for i in range(3)], 4)
    finally:
        proxy.stop()
    log = proxy.logfile.read_text()
    assert "budget.paused" in log, log[-2000:]
    billed: dict[str, int] = {}
    for r in stub.billed():
        billed[r.body["user"]] = billed.get(r.body["user"], 0) + r.nano
    assert len(stub.billed()) == 12
    assert await ledger_by_agent(budget) == billed
    admitted = sorted((e["meta"]["admitted_ms"], int(e["usd"])) for e in await ledger(budget))
    for start_ms, _ in admitted:
        assert sum(u for t, u in admitted if start_ms <= t < start_ms + 2000) <= round(limit * 10**9)
    assert all(s.reserved == 0 for s in (await budget.status(TENANT)).limits)
    await budget.aclose()


@pytest.mark.slow
async def test_reject_mode_answers_429_with_retry_after_and_failures_refund(
    server_url: str, prefix: str, stub: StubProvider, tmp_path: Path
) -> None:
    budget = Budget.from_url(server_url, prefix=prefix)
    await budget.set_limits(TENANT, ["requests 2/hour"])
    proxy = await asyncio.to_thread(start, tmp_path, stub, server_url, prefix, SLOWBURN_MODE="reject")
    try:
        results: list[Any] = []
        for content in ("first", "please [fail]", "second", "third"):
            results.append(await asyncio.to_thread(post, proxy, content, "r"))
    finally:
        proxy.stop()
    statuses = [status for status, _, _ in results]
    assert statuses[0] == 200 and statuses[1] >= 400 and statuses[2] == 200, results
    status, headers, body = results[3]
    assert status == 429, results[3]
    assert int(headers.get("Retry-After") or headers.get("retry-after") or 0) > 60, headers
    assert b"is spent" in body
    entries = await ledger(budget)
    assert [e["outcome"] for e in entries] == ["ok", "error", "ok"]
    assert entries[1]["usd"] == "0"
    assert await ledger_by_agent(budget) == {"r": stub.bill()["proxy"]}
    await budget.aclose()


async def test_key_team_user_and_metadata_map_to_tenant_and_agent(budget: Budget, stub: StubProvider) -> None:
    """The hook class itself, with the proxy's own UserAPIKeyAuth and a real litellm call in between."""
    import litellm
    from litellm.proxy._types import UserAPIKeyAuth

    from slowburn_redis.integrations.litellm_proxy import BudgetHook

    for tenant in ("Team-Blue", "acme"):
        await budget.set_limits(tenant, ["usd 1/hour"])
    key = UserAPIKeyAuth(
        api_key="hashed", token="0123456789abcdef", key_alias="ci bot", team_alias="Team Blue", user_id="u@x.io"
    )
    data: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    cases = [
        ("team", "key", "Team-Blue", "ci-bot"),
        ("none", "user", "acme", "u@x.io"),
        ("none", "metadata:agent", "acme", "from-metadata"),
    ]
    for i, (tenant_from, agent_from, tenant, agent) in enumerate(cases):
        hook = BudgetHook(budget, tenant="acme", tenant_from=tenant_from, agent_from=agent_from)
        request = {**data, "litellm_call_id": f"call-{i}", "metadata": {"agent": "from-metadata"}}
        assert await hook.async_pre_call_hook(key, None, request, "acompletion") is request
        (call,) = hook.calls.values()
        assert (call.reservation.tenant, call.reservation.agent) == (tenant, agent)
        response = await litellm.acompletion(
            model=f"openai/{MODEL}", messages=data["messages"], max_tokens=20, api_base=stub.base_url, api_key="k"
        )
        kwargs = {"litellm_call_id": f"call-{i}", "response_cost": litellm.completion_cost(response), "model": MODEL}
        await hook.async_log_success_event(kwargs, response, None, None)
        assert hook.calls == {}
    by_tenant = {t: await ledger_by_agent(budget, t) for t in ("Team-Blue", "acme")}
    assert sum(sum(v.values()) for v in by_tenant.values()) == stub.bill()["k"]
    assert set(by_tenant["Team-Blue"]) == {"ci-bot"} and set(by_tenant["acme"]) == {"u@x.io", "from-metadata"}
