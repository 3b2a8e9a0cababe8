"""The LiteLLM callback end to end on the real stack (meterline.shell.runtime.Runtime: API, credit agent,
pricing workers, Tansu, chDB), driven by the real ``litellm`` package with its mock responses (no
network): every successful call (sync, async, streamed) becomes one usage event; the pre-call
authorization reserves, the event settles, a customer without credit is refused before the call."""

from __future__ import annotations

import asyncio
import os
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from meterline.core.config import Settings
from meterline.core.pricing import PricingEngine, load_price_book
from meterline.shell.runtime import Runtime
from pipeline.publish import publish_records
from schemas.codec import event_to_record

pytestmark = pytest.mark.broker

SEED = Path(__file__).resolve().parents[2] / "infra" / "prices" / "seed.yaml"


def wait_for(what: str, predicate: Any, timeout: float = 90.0, show: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}" + (f": last seen {show()}" if show else ""))


def test_litellm_callback_meters_every_call_and_authorizes(
    kafka_bootstrap: str, topics: dict[str, str], topic_prefix: str, clickhouse_dsn: str, tmp_path: Path
) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm
    from litellm.proxy._types import UserAPIKeyAuth
    from litellm.types.utils import ModelResponse, Usage

    from meterline.integrations.litellm import MeterlineCallback, MeterlineDenied

    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        partitions=4,
        broker_flavor="tansu",
        data_dir=tmp_path,
        clickhouse_dsn=clickhouse_dsn,
        api_port=0,
    )
    runtime = Runtime(settings).start()
    saved = litellm.callbacks
    try:
        book = load_price_book(SEED)
        publish_records(kafka_bootstrap, settings.topic("prices"), book.to_records())
        api = runtime.api_server.url
        admin = {"Authorization": f"Bearer {runtime.admin_key}"}
        http = httpx.Client(base_url=api, timeout=30)
        for customer in ("acme", "hooli"):
            assert (
                http.put(f"/v1/customers/{customer}/policy", json={"overage": "block"}, headers=admin).status_code
                == 202
            )
        assert (
            http.post(
                "/v1/credits/grants",
                headers=admin,
                json={"customer_id": "acme", "grant_id": "g1", "amount": "1.00", "currency": "usd"},
            ).status_code
            == 202
        )

        def available() -> Decimal | None:
            r = http.get("/v1/customers/acme/balance", headers=admin)
            return Decimal(r.json()["available"]) if r.status_code == 200 else None

        wait_for("acme's grant", lambda: available() == Decimal("1.00"))

        callback = MeterlineCallback(api_url=api, api_key=runtime.admin_key, authorize=True)
        litellm.callbacks = [callback]
        usage = Usage(
            prompt_tokens=2000, completion_tokens=100, total_tokens=2100, prompt_tokens_details={"cached_tokens": 500}
        )

        def mock(i: int) -> ModelResponse:
            return ModelResponse(
                id=f"chatcmpl-{i}",
                model="gpt-4o-2024-05-13",
                created=int(time.time()),
                choices=[{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hello"}}],
                usage=usage,
            )

        msgs = [{"role": "user", "content": "hi"}]
        # 1. SDK, sync, authorized first: reserve, call, the event settles the hold
        meta = callback.authorize_call("acme", "openai/gpt-4o-2024-05-13", msgs, max_tokens=200)
        litellm.completion(model="openai/gpt-4o-2024-05-13", messages=msgs, mock_response=mock(1), metadata=meta)

        # 2. async: LiteLLM logs on the caller's event loop, so keep it running until the event left
        async def async_call() -> None:
            await litellm.acompletion(
                model="openai/gpt-4o-2024-05-13",
                messages=msgs,
                mock_response=mock(2),
                metadata={"meterline_customer_id": "acme"},
            )
            deadline = time.monotonic() + 60
            while not any(e.event_id == "litellm:chatcmpl-2" for e in callback.sent) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)

        asyncio.run(async_call())
        # 3. streamed (LiteLLM reports the whole stream's usage once, at its end)
        stream = litellm.completion(
            model="openai/gpt-4o-2024-05-13",
            messages=msgs,
            stream=True,
            mock_response="a streamed answer",
            metadata={"meterline_customer_id": "acme"},
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "a streamed answer"

        events = wait_for(
            "three usage events", lambda: len(callback.sent) >= 3 and list(callback.sent), show=lambda: callback.sent
        )
        assert len(events) == 3 and len({e.event_id for e in events}) == 3
        assert all(
            (e.customer_id, e.provider, e.model, e.model_version, e.gateway)
            == ("acme", "openai", "gpt-4o", "2024-05-13", "litellm")
            for e in events
        )
        by_id = {e.event_id: e for e in events}
        assert {by_id[f"litellm:chatcmpl-{i}"].cached_input_tokens for i in (1, 2)} == {500}
        assert by_id["litellm:chatcmpl-1"].request_id == meta["meterline_request_id"]  # settles its hold
        streamed = [e for e in events if e.input_tokens != 1500]
        assert len(streamed) == 1 and streamed[0].output_tokens > 0

        engine = PricingEngine.from_book(book)
        charge = sum(engine.price(event_to_record(e)).charge_picos for e in events)
        expected = Decimal("1.00") - Decimal(charge) / 10**12
        wait_for(
            "the charges settled",
            lambda: available() == expected,
            show=lambda: (available(), expected, http.get("/v1/customers/acme/balance", headers=admin).text),
        )

        # 4. no credit: refused before the provider is called (SDK helper and the proxy hook)
        with pytest.raises(MeterlineDenied) as denied:
            callback.authorize_call("hooli", "openai/gpt-4o", msgs)
        assert (denied.value.status_code, denied.value.code) == (402, "credit_exhausted")
        with pytest.raises(MeterlineDenied) as hook_denied:
            asyncio.run(
                callback.async_pre_call_hook(
                    UserAPIKeyAuth(team_id="hooli"), None, {"model": "openai/gpt-4o", "messages": msgs}, "completion"
                )
            )
        assert hook_denied.value.status_code == 402
        data = asyncio.run(
            callback.async_pre_call_hook(
                UserAPIKeyAuth(team_id="acme"), None, {"model": "openai/gpt-4o", "messages": msgs}, "completion"
            )
        )
        assert data["metadata"]["meterline_customer_id"] == "acme"
        assert data["metadata"]["meterline_request_id"].startswith("litellm_")
    finally:
        litellm.callbacks = saved
        runtime.stop()
