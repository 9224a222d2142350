"""``/metrics`` protection under attack: every wrong credential and every address off the allow-list
is refused (401 / 403) with an empty body, before the registry is read; credentials are compared
in constant time (every accepted credential, as equal-length digests, whatever was sent)."""

from __future__ import annotations

import asyncio
import base64
import hmac
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from crowdmon import MetricsApp, PrometheusInstrumentation, setup_monitoring
from tests.asgi import http_scope, run_asgi
from tests.support import scraped, uvicorn_in_thread

TOKEN = "tok-9f8e7d6c5b4a"
USER, PASSWORD = "prometheus", "pa55-w0rd"
BEARER = f"Bearer {TOKEN}".encode()
BASIC = b"Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode())
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)


class Protected:
    """A protected MetricsApp with traffic recorded, and a count of how often it rendered."""

    def __init__(self, **options: Any) -> None:
        self.registry = CollectorRegistry()
        instrumentation = PrometheusInstrumentation(self.registry)
        instrumentation.track_chat_message("authenticated")
        self.app = MetricsApp(instrumentation, **options)
        self.renders = 0
        render = self.app.render

        def counting_render(*args: Any) -> tuple[bytes, str]:
            self.renders += 1
            return render(*args)

        self.app.render = counting_render  # type: ignore[method-assign,assignment]

    def scrape(self, authorization: bytes | None = None, client: str | None = "127.0.0.1", method: str = "GET") -> tuple[int, dict[bytes, bytes], bytes]:
        headers = [(b"accept-encoding", b"gzip"), (b"accept", b"application/openmetrics-text")]
        if authorization is not None:
            headers.append((b"authorization", authorization))
        scope = http_scope("/metrics", method=method, headers=headers)
        scope["client"] = None if client is None else (client, 40000)
        sent = asyncio.run(run_asgi(self.app, scope))
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return sent[0]["status"], dict(sent[0]["headers"]), body


def assert_refused(answer: tuple[int, dict[bytes, bytes], bytes], status: int, protected: Protected) -> None:
    code, headers, body = answer
    assert code == status
    assert body == b"" and headers[b"content-length"] == b"0"
    assert b"content-encoding" not in headers
    assert protected.renders == 0


def near_misses(secret: bytes) -> st.SearchStrategy[bytes]:
    """``secret`` with one byte changed, cut short, lengthened, or its scheme swapped."""
    index = st.integers(0, len(secret) - 1)
    return st.one_of(
        st.tuples(index, st.integers(1, 255)).map(lambda c: secret[: c[0]] + bytes([(secret[c[0]] + c[1]) % 256]) + secret[c[0] + 1 :]),
        index.map(lambda i: secret[:i]),
        st.binary(min_size=1, max_size=8).map(lambda tail: secret + tail),
        st.sampled_from([b"Token ", b"Basic ", b"Bearer", b"Digest "]).map(lambda scheme: scheme + secret.partition(b" ")[2]),
    )


wrong_basic = st.tuples(st.text(max_size=12), st.text(max_size=12)).filter(lambda pair: pair != (USER, PASSWORD)).map(
    lambda pair: b"Basic " + base64.b64encode(f"{pair[0]}:{pair[1]}".encode())
)
wrong_credentials = st.one_of(
    near_misses(BEARER),
    near_misses(BASIC),
    wrong_basic,
    st.binary(max_size=200),
    st.just(f"Basic {USER}:{PASSWORD}".encode()),  # not base64
    st.just(b"Bearer " + TOKEN.upper().encode()),
)


def is_right(header: bytes) -> bool:
    scheme, _, credentials = header.strip().partition(b" ")
    if scheme.lower() == b"bearer":
        return credentials.strip() == TOKEN.encode()
    if scheme.lower() == b"basic":
        try:
            return base64.b64decode(credentials.strip(), validate=True) == f"{USER}:{PASSWORD}".encode()
        except ValueError:
            return False
    return False


@FUZZ
@given(authorization=st.none() | wrong_credentials, method=st.sampled_from(["GET", "HEAD", "POST"]))
def test_every_wrong_credential_is_refused_with_no_metric(authorization: bytes | None, method: str) -> None:
    if authorization is not None and is_right(authorization):
        return  # a near miss that is the credential after normalisation (case of the scheme, spaces)
    protected = Protected(bearer_token=TOKEN, basic_auth=(USER, PASSWORD))

    answer = protected.scrape(authorization, method=method)

    assert_refused(answer, 401, protected)
    assert answer[1][b"www-authenticate"] in (b'Bearer realm="metrics"', b'Basic realm="metrics", charset="UTF-8"')


@FUZZ
@given(
    client=st.one_of(
        st.ip_addresses(v=4).map(str).filter(lambda address: not address.startswith("10.")),
        st.ip_addresses(v=6).filter(lambda address: getattr(address, "ipv4_mapped", None) is None).map(str),
        st.sampled_from(["", "localhost", "/run/app.sock", "10.0.0.1.evil", "::ffff:192.168.0.1"]),
        st.none(),
    )
)
def test_every_address_off_the_allow_list_is_refused_with_no_metric(client: str | None) -> None:
    protected = Protected(bearer_token=TOKEN, allow_from=["10.0.0.0/8"])

    # The right credential does not help from the wrong address.
    assert_refused(protected.scrape(BEARER, client=client), 403, protected)


@pytest.mark.parametrize("client", ["10.1.2.3", "::ffff:10.9.9.9"])
@pytest.mark.parametrize("authorization", [BEARER, b"bearer   " + TOKEN.encode() + b"  ", BASIC, b"basic " + BASIC[6:]])
def test_the_right_credential_from_an_allowed_address_gets_the_metrics(client: str, authorization: bytes) -> None:
    protected = Protected(bearer_token=TOKEN, basic_auth=(USER, PASSWORD), allow_from=["10.0.0.0/8"])

    code, headers, body = protected.scrape(authorization, client=client)

    assert code == 200 and protected.renders == 1 and len(body) > 100
    assert headers[b"content-encoding"] == b"gzip"


def test_credentials_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every attempt, near or far, compares the same number of equal-length digests through
    ``hmac.compare_digest``: the time taken says nothing about how close the attempt was."""
    calls: list[tuple[int, int]] = []
    real_compare = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((len(a), len(b)))
        assert a != BEARER and b != BEARER and TOKEN.encode() not in (a, b)
        return real_compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    protected = Protected(bearer_token=TOKEN, basic_auth=(USER, PASSWORD))
    attempts = [
        BEARER[:-1] + b"X",  # one character off
        b"Bearer x",  # far off, short
        b"Bearer " + b"x" * 4000,  # far off, long
        b"Basic " + base64.b64encode(f"{USER}:{PASSWORD[:-1]}".encode()),
        b"Basic " + base64.b64encode(b"x:y"),
        BEARER,
        BASIC,
    ]
    per_attempt = []
    for attempt in attempts:
        calls.clear()
        protected.scrape(attempt)
        per_attempt.append(list(calls))

    assert all(compared == [(32, 32), (32, 32)] for compared in per_attempt)
    assert protected.renders == 2


def test_a_real_server_refuses_wrong_credentials_without_any_metric(registry: CollectorRegistry) -> None:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    instrumentation = PrometheusInstrumentation(registry)
    setup_monitoring(app, metrics_app=MetricsApp(instrumentation, bearer_token=TOKEN, allow_from=["127.0.0.1"]), instrumentation=instrumentation)
    with uvicorn_in_thread(app) as base_url, httpx.Client(base_url=base_url) as client:
        assert client.get("/items/1").status_code == 200
        refused = [
            client.get("/metrics"),
            client.get("/metrics", headers={"authorization": "Bearer wrong", "accept-encoding": "gzip"}),
            client.get("/metrics", headers={"authorization": f"Basic {TOKEN}"}),
            client.head("/metrics"),
        ]
        # The route takes GET and HEAD only: the router refuses any other method first.
        wrong_method = client.post("/metrics", headers={"authorization": f"Bearer {TOKEN}"})
        allowed = client.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"})

    for response in refused:
        assert response.status_code == 401
        assert response.content == b"" and response.headers["content-length"] == "0"
        assert response.headers["www-authenticate"] == 'Bearer realm="metrics"'
    assert wrong_method.status_code == 405 and b"crowdfunding" not in wrong_method.content
    assert allowed.status_code == 200
    assert scraped(allowed.text, "crowdfunding_api_requests_total", method="GET", handler="/items/{item_id}", status="200") == 1
