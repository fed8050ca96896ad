"""What the gateway spends on a paid teacher: usage counters, metrics, budgets, coalescing and the dry run.

The teacher is the remote client calling the fake paid API of ``fake_teacher`` on 127.0.0.1, which records
every call it receives, so each count the gateway reports is checked against what the teacher saw.
"""

from __future__ import annotations

import math
import threading

import httpx
import numpy as np
import pytest
from fake_teacher import FakeTeacher, Fault, fake_embedding
from gateway_helpers import block_tiles, gateway, metric, wait_for

from shared.cache import EmbeddingCache
from shared.imaging import encode_base64_png
from teacher_gateway.client import GatewayClient, GatewayResponseError
from teacher_gateway.usage import Budget, Caller, Reservation, Spent, UsageLedger, refusal
from unite_cli.main import main

DIM = 16


def _payload(tiles: list[np.ndarray]) -> dict:
    return {"input": [{"image": encode_base64_png(tile)} for tile in tiles]}


def _embeddings(response: httpx.Response) -> np.ndarray:
    return np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


def _identity(fake: FakeTeacher) -> str:
    return f"remote:{fake.url}#{fake.model}"


def test_usage_and_metrics_match_fake_record(tmp_path):
    fake = FakeTeacher(dim=DIM)
    tiles = block_tiles(14)
    # The first two requests the fake receives fail and are retried by the remote client.
    fake.script(Fault.error(503), Fault.error(429, retry_after="0"))
    with fake.serve(), gateway(tmp_path / "cache", fake=fake, remote={"max_batch_size": 4}) as http:
        first = http.post("/v1/embeddings", json=_payload(tiles[:10]))
        second = http.post("/v1/embeddings", json=_payload(tiles[5:14] + tiles[:2]))
        third = http.post("/v1/embeddings", json=_payload(tiles[:3]))
        usage = http.get("/v1/usage").json()
        page = http.get("/metrics").text
        identity = _identity(fake)
        calls = fake.calls

    assert [first.status_code, second.status_code, third.status_code] == [200, 200, 200]
    answered = [call for call in calls if call.status == 200]
    failed = [call for call in calls if call.status != 200]
    assert len(failed) == 2
    assert sorted(call.batch_size for call in answered) == [2, 4, 4, 4]
    assert sorted(fake.embed_counts.values()) == [1] * 14

    totals = usage["teachers"][identity]["totals"]
    assert totals["teacher_calls"] == len(answered)
    assert totals["teacher_tiles"] == sum(call.batch_size for call in answered)
    assert totals["requests"] == 3
    assert totals["tiles"] == 10 + 11 + 3
    assert totals["cache_hits"] == 0 + 7 + 3
    assert usage["teachers"][identity]["keys"] == {"anonymous": totals}
    assert usage["budget"]["tiles"] == {"limit": None, "spent": 14, "left": None}

    labels = {"teacher": identity, "key": "anonymous"}
    assert metric(page, "unite_gateway_teacher_calls_total", **labels) == len(answered)
    assert metric(page, "unite_gateway_teacher_tiles_total", **labels) == sum(call.batch_size for call in answered)
    assert metric(page, "unite_gateway_requests_total", **labels) == 3
    assert metric(page, "unite_gateway_tiles_total", **labels) == 24
    assert metric(page, "unite_gateway_cache_hits_total", **labels) == 10
    assert metric(page, "unite_gateway_backend_calls_total", teacher=identity) == len(calls)
    assert metric(page, "unite_gateway_backend_retries_total", teacher=identity) == len(failed)
    assert metric(page, "unite_gateway_teacher_call_duration_seconds_count", teacher=identity) == 2
    assert metric(page, "unite_gateway_request_duration_seconds_count", route="/v1/embeddings", status="200") == 3
    assert metric(page, "unite_gateway_budget_spent", teacher=identity, unit="tiles") == 14


def test_budget_stops_ingest_at_limit(tmp_path):
    fake = FakeTeacher(dim=DIM)
    tiles = block_tiles(25)
    cache_dir = tmp_path / "cache"
    with fake.serve():
        with gateway(cache_dir, fake=fake, budget_tiles=10) as http:
            with GatewayClient(str(http.base_url), batch_size=4) as client:
                with pytest.raises(GatewayResponseError) as raised:
                    client.embed(tiles)
                plan = client.dry_run(tiles)
            cached_again = http.post("/v1/embeddings", json=_payload(tiles[:10]))
            one_more = http.post("/v1/embeddings", json=_payload(tiles[10:11]))

        error = raised.value
        assert error.server_code == "budget_exhausted"
        assert "is 10 tiles (setting UNITE_GATEWAY_BUDGET_TILES) and 8 are used" in error.message
        assert "needed 4 teacher tiles, so 2 were sent to the teacher and cached and 2 were not" in error.message
        assert (error.limit, error.value) == (10, 12)
        assert sum(fake.embed_counts.values()) == 10
        assert (plan["cache_hits"], plan["tiles_to_embed"]) == (10, 15)
        assert plan["budget"]["tiles"] == {"limit": 10, "spent": 10, "left": 0}
        assert cached_again.status_code == 200
        assert one_more.status_code == 402
        assert one_more.json()["error"]["code"] == "budget_exhausted"
        with EmbeddingCache(cache_dir) as cache:
            assert cache.count() == 10

        # The budget is stored beside the cache, so a restarted gateway keeps it.
        with gateway(cache_dir, fake=fake, budget_tiles=10) as http:
            after_restart = http.post("/v1/embeddings", json=_payload(tiles[10:11]))
        assert after_restart.status_code == 402
        assert sum(fake.embed_counts.values()) == 10

        # A raised budget lets the same ingest finish without paying again for what is cached.
        with gateway(cache_dir, fake=fake, budget_tiles=25) as http:
            with GatewayClient(str(http.base_url), batch_size=4) as client:
                embeddings = client.embed(tiles)

    assert sorted(fake.embed_counts.values()) == [1] * 25
    np.testing.assert_array_equal(embeddings, fake_embedding(np.stack(tiles), DIM))


def test_calls_budget_counts_batches(tmp_path):
    fake = FakeTeacher(dim=DIM)
    with fake.serve(), gateway(tmp_path / "cache", fake=fake, remote={"max_batch_size": 4}, budget_calls=2) as http:
        response = http.post("/v1/embeddings", json=_payload(block_tiles(10)))
        stats = http.get("/v1/cache/stats").json()

    assert response.status_code == 402
    error = response.json()["error"]
    assert "is 2 teacher calls (setting UNITE_GATEWAY_BUDGET_CALLS) and 0 are used" in error["message"]
    assert (error["limit"], error["value"]) == (2, 3)
    assert sorted(call.batch_size for call in fake.calls) == [4, 4]
    assert stats["total"] == 8


def test_budget_holds_under_concurrency(tmp_path):
    fake = FakeTeacher(dim=DIM, latency_s=0.05)
    tiles = block_tiles(24, seed=3)
    statuses: list[int] = []
    with fake.serve(), gateway(tmp_path / "cache", fake=fake, budget_tiles=7) as http:

        def send(part: list[np.ndarray]) -> None:
            statuses.append(http.post("/v1/embeddings", json=_payload(part)).status_code)

        threads = [threading.Thread(target=send, args=(tiles[start : start + 3],)) for start in range(0, 24, 3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = http.get("/v1/cache/stats").json()
        identity = _identity(fake)

    assert sum(fake.embed_counts.values()) == 7
    assert stats["total"] == 7
    assert statuses.count(402) >= 1
    assert set(statuses) <= {200, 402}
    with UsageLedger(tmp_path / "cache") as ledger:
        assert ledger.spent(identity).tiles == 7


def test_concurrent_requests_share_teacher_call(tmp_path):
    fake = FakeTeacher(dim=DIM, latency_s=1.0)
    tiles = block_tiles(6, seed=5)
    responses: dict[str, httpx.Response] = {}
    with fake.serve(), gateway(tmp_path / "cache", fake=fake, remote={"max_batch_size": 4}) as http:
        identity = _identity(fake)

        def send(name: str, part: list[np.ndarray]) -> None:
            responses[name] = http.post("/v1/embeddings", json=_payload(part))

        def gauge(name: str) -> float:
            return metric(http.get("/metrics").text, name, teacher=identity)

        first = threading.Thread(target=send, args=("first", tiles))
        first.start()
        wait_for(lambda: gauge("unite_gateway_inflight_tiles") == 6, what="the first request's teacher call")
        others = [
            threading.Thread(target=send, args=("reversed", tiles[::-1])),
            threading.Thread(target=send, args=("half", tiles[:3])),
        ]
        for thread in others:
            thread.start()
        wait_for(lambda: gauge("unite_gateway_coalesce_waiters") == 2, what="two requests waiting for the call in flight")
        for thread in [first, *others]:
            thread.join()
        page = http.get("/metrics").text

    assert sorted(fake.embed_counts.values()) == [1] * 6
    assert sorted(call.batch_size for call in fake.calls) == [2, 4]
    assert responses["first"].json()["usage"]["tiles_sent_to_teacher"] == 6
    assert responses["reversed"].json()["usage"] == {"tiles": 6, "cache_hits": 0, "coalesced": 6, "model_calls": 0, "tiles_sent_to_teacher": 0}
    assert responses["half"].json()["usage"]["coalesced"] == 3
    np.testing.assert_array_equal(_embeddings(responses["reversed"]), _embeddings(responses["first"])[::-1])
    np.testing.assert_array_equal(_embeddings(responses["half"]), _embeddings(responses["first"])[:3])
    assert metric(page, "unite_gateway_coalesced_tiles_total", teacher=identity, key="anonymous") == 9


def test_dry_run_spends_nothing(tmp_path):
    fake = FakeTeacher(dim=DIM)
    tiles = block_tiles(5, seed=9)
    with fake.serve(), gateway(tmp_path / "cache", fake=fake, remote={"max_batch_size": 4}, budget_tiles=4) as http:
        http.post("/v1/embeddings", json=_payload(tiles[:3]))
        calls_before = len(fake.calls)
        plan = http.post("/v1/embeddings/dry-run", json=_payload([*tiles, tiles[3]])).json()
        within = http.post("/v1/embeddings/dry-run", json=_payload(tiles[2:4])).json()
        usage = http.get("/v1/usage").json()
        calls_after = len(fake.calls)
        identity = _identity(fake)

    assert calls_after == calls_before
    assert plan["model"] == identity
    assert (plan["tiles"], plan["distinct_tiles"], plan["cache_hits"]) == (6, 5, 3)
    assert (plan["tiles_to_embed"], plan["teacher_calls"]) == (2, 1)
    assert plan["budget"]["tiles"] == {"limit": 4, "spent": 3, "left": 1}
    assert plan["within_budget"] is False
    assert (within["tiles_to_embed"], within["within_budget"]) == (1, True)
    assert usage["teachers"][identity]["totals"]["requests"] == 1


def test_partial_failure_keeps_paid_batches(tmp_path):
    fake = FakeTeacher(dim=DIM)
    tiles = block_tiles(8, seed=11)
    fake.script(Fault.error(400, message="bad batch"))
    with fake.serve(), gateway(tmp_path / "cache", fake=fake, remote={"max_batch_size": 4, "max_attempts": 1}) as http:
        failed = http.post("/v1/embeddings", json=_payload(tiles))
        stats = http.get("/v1/cache/stats").json()
        retried = http.post("/v1/embeddings", json=_payload(tiles))

    assert failed.status_code == 502
    assert failed.json()["error"]["code"] == "teacher_error"
    assert stats["total"] == 4
    assert retried.status_code == 200
    assert retried.json()["usage"]["cache_hits"] == 4
    assert retried.json()["usage"]["tiles_sent_to_teacher"] == 4
    assert sorted(fake.embed_counts.values()) == [1] * 8
    np.testing.assert_array_equal(_embeddings(retried), fake_embedding(np.stack(tiles), DIM))


def test_teach_dry_run_prints_plan(tmp_path, slides_dir, capsys):
    slide = slides_dir / "CMU-1-Small-Region.svs"
    fake = FakeTeacher(dim=DIM)
    with fake.serve(), gateway(tmp_path / "cache", fake=fake, remote={"max_batch_size": 4}, budget_tiles=10_000) as http:
        url = str(http.base_url)
        assert main(["teach", str(slide), "--gateway", url, "--dry-run", "--batch-size", "16"]) == 0
        before = capsys.readouterr().out
        calls_after_plan = len(fake.calls)
        assert (
            main(["teach", str(slide), "--gateway", url, "--cache-dir", str(tmp_path / "cache"), "--shards", str(tmp_path / "shards"), "--batch-size", "16"])
            == 0
        )
        capsys.readouterr()
        embedded = sum(fake.embed_counts.values())
        assert main(["teach", str(slide), "--gateway", url, "--dry-run", "--batch-size", "16"]) == 0
        after = capsys.readouterr().out

    assert calls_after_plan == 0
    assert embedded > 0
    calls = sum(math.ceil(min(16, embedded - start) / 4) for start in range(0, embedded, 16))
    assert f"to pay for             {embedded} tiles in {calls} teacher calls" in before
    assert "in the cache           0 distinct tiles" in before
    assert f"{10_000} left of 10000" in before
    assert f"in the cache           {embedded} distinct tiles" in after
    assert "to pay for             0 tiles in 0 teacher calls" in after
    assert f"{10_000 - embedded} left of 10000" in after
    assert len(fake.calls) == calls


def test_restart_after_402_pays_no_second_canary(tmp_path):
    fake = FakeTeacher(dim=DIM)
    tiles = block_tiles(9, seed=13)
    cache_dir = tmp_path / "cache"
    canary = {"canary_tiles": 3, "canary_interval_minutes": 60}
    with fake.serve():
        with gateway(cache_dir, fake=fake) as http:
            assert http.post("/v1/embeddings", json=_payload(tiles[:5])).status_code == 200

        # The canary check at start spends 3 tiles, so 2 of the 4 new tiles fit the budget of 10.
        with gateway(cache_dir, fake=fake, budget_tiles=10, **canary) as http:
            refused = http.post("/v1/embeddings", json=_payload(tiles[5:]))
        error = refused.json()["error"]

        # Raised by the shortfall only: the canary check passed minutes ago, so this start pays for none.
        with gateway(cache_dir, fake=fake, budget_tiles=12, **canary) as http:
            accepted = http.post("/v1/embeddings", json=_payload(tiles[5:]))
            usage = http.get("/v1/usage").json()
            identity = _identity(fake)

    assert refused.status_code == 402
    assert "is 10 tiles (setting UNITE_GATEWAY_BUDGET_TILES)" in error["message"]
    assert "and 8 are used, 3 of them by canary checks" in error["message"]
    assert "needed 4 teacher tiles, so 2 were sent to the teacher and cached and 2 were not" in error["message"]
    assert "Raise UNITE_GATEWAY_BUDGET_TILES (or pass a higher --budget-tiles to unite serve-gateway)" in error["message"]
    assert "UNITE_GATEWAY_CANARY_TILES" in error["message"]
    assert "UNITE_GATEWAY_CANARY_INTERVAL_MINUTES" in error["message"]
    assert accepted.status_code == 200
    assert accepted.json()["usage"]["cache_hits"] == 2
    assert usage["budget"]["tiles"] == {"limit": 12, "spent": 12, "left": 0}
    assert usage["teachers"][identity]["keys"]["canary"]["teacher_tiles"] == 3
    # The 5 tiles cached first, 3 of them embedded again by the one canary check, and the 4 new tiles.
    assert sum(fake.embed_counts.values()) == 5 + 3 + 4
    assert len(fake.embed_counts) == 9


@pytest.mark.parametrize(
    ("budget", "limited_by", "expected"),
    [
        (Budget(tiles=10), "budget_tiles", ["is 10 tiles (setting UNITE_GATEWAY_BUDGET_TILES)", "Raise UNITE_GATEWAY_BUDGET_TILES"]),
        (
            Budget(tiles=10, from_options=frozenset({"tiles"})),
            "budget_tiles",
            ["is 10 tiles (option --budget-tiles)", "Restart the gateway with a higher --budget-tiles to continue"],
        ),
        (
            Budget(calls=2, from_options=frozenset({"calls"})),
            "budget_calls",
            ["is 2 teacher calls (option --budget-calls) and 2 are used, 1 of them by canary checks", "with a higher --budget-calls"],
        ),
    ],
    ids=["tiles-setting", "tiles-option", "calls-option"],
)
def test_budget_message_names_its_source(budget, limited_by, expected):
    reservation = Reservation(
        requested=4, requested_calls=1, tiles=0, calls=0, limited_by=limited_by,
        spent=Spent(tiles=10, calls=2, canary_tiles=3, canary_calls=1),
    )

    error = refusal(reservation, teacher="t", caller=Caller("anonymous"), budget=budget)

    assert error.code == "budget_exhausted"
    for text in expected:
        assert text in error.message
    if "option" in expected[0]:
        assert "UNITE_GATEWAY_BUDGET" not in error.message
