"""Property-based fuzzing of the gateway API: whatever a client or an operator sends, the gateway's
own code answers below 500, and every 4xx is an OpenAI-shaped error with a message.

The real app runs in process (Starlette's TestClient, lifespan included) in front of a healthy mock
upstream, so any 5xx would be the gateway's own. Bodies are valid-ish (right fields, some with the
wrong type, huge numbers, any unicode, fields missing or extra) or plain junk; headers and paths
are fuzzed too, and admin changes are followed by a request through the route they changed.
`make test` runs about 500 cases; `make stress` 20 times as many.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from evaluation.benchmarks.mock_upstream import MockUpstream, serve
from serving.gateway.app import build_app
from tests.conftest import make_home
from tests.serving.conftest import MODEL, SIGNER, Secrets, backend, digest

SPLIT = "fuzz-split"  # a stable/canary route whose weights the fuzzer changes
SCALES = [pytest.param(1, id="ci"), pytest.param(20, id="stress", marks=pytest.mark.stress)]


class Gateway:
    def __init__(self, client: TestClient, keys: Secrets, upstream_url: str) -> None:
        self.client = client
        self.keys = keys
        self.upstream_url = upstream_url

    def tenant(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys.key(name)}"}

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys.admin}"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[Gateway]:
    home = make_home(tmp_path_factory.mktemp("fuzz") / "slipway")
    keys = Secrets()
    upstream = MockUpstream()
    upstream.record = False
    with serve(upstream) as url:
        config = keys.config(
            [],  # the routes are given whole below
            [keys.tenant("alice", log_prompts=True), keys.tenant("careful", canary="out")],
            routes=[
                {"model": MODEL, "backends": [backend(url, "1")]},
                {
                    "model": SPLIT,
                    "backends": [
                        backend(url, "1", weight=90),
                        backend(url, "2", role="canary", weight=10),
                    ],
                },
            ],
        )
        with TestClient(build_app(config, home), raise_server_exceptions=False) as client:
            yield Gateway(client, keys, url)


def check(response) -> None:
    """No 5xx; a 4xx carries {"error": {message, type, param, code}} with a message."""
    status = response.status_code
    assert status < 500, (
        f"{status} from {response.request.method} {response.request.url}: {response.text[:500]}"
    )
    if status >= 400:
        error = response.json()["error"]
        assert {"message", "type", "param", "code"} <= set(error), error
        assert isinstance(error["message"], str) and error["message"], error


def fuzz(examples: int, strategy: st.SearchStrategy, one: Callable) -> None:
    @settings(
        max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(strategy)
    def run(case) -> None:
        one(case)

    run()


# ---- strategies ----------------------------------------------------------------------------------

TEXT = st.text(max_size=40)  # any unicode, lone surrogates excluded (they are not valid JSON text)
NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-3, 5000),
    st.floats(allow_nan=False, allow_infinity=False),
)
JSON = st.recursive(
    st.none() | st.booleans() | NUMBERS | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


def field(good: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly the right type, sometimes any JSON value."""
    return st.one_of(good, good, good, JSON)


def shapes(required: dict, optional: dict) -> st.SearchStrategy:
    """Bodies with the given fields, some with one required field dropped, some with junk extras."""
    body = st.fixed_dictionaries(required, optional=optional)
    dropped = body.flatmap(
        lambda d: st.sampled_from(sorted(d)).map(lambda k: {x: v for x, v in d.items() if x != k})
    )
    extra = st.tuples(body, st.dictionaries(TEXT, JSON, max_size=3)).map(lambda p: {**p[1], **p[0]})
    return st.one_of(body, body, body, dropped, extra, JSON)


SAMPLING = {
    "stream": field(st.booleans()),
    "stream_options": field(
        st.fixed_dictionaries({}, optional={"include_usage": field(st.booleans())})
    ),
    "max_tokens": field(st.integers(-2, 8) | NUMBERS),
    "max_completion_tokens": field(st.integers(0, 8)),
    "n": field(st.integers(-1, 3)),
    "seed": field(NUMBERS),
    "temperature": field(NUMBERS),
    "top_p": field(NUMBERS),
    "presence_penalty": field(NUMBERS),
    "frequency_penalty": field(NUMBERS),
    "stop": field(TEXT | st.lists(TEXT, max_size=3)),
    "user": field(TEXT),
    "logprobs": field(st.booleans() | st.integers(0, 5)),
}
MODELS = field(st.sampled_from([MODEL, SPLIT, "not-served"]) | TEXT)
MESSAGE = st.fixed_dictionaries(
    {"role": field(st.sampled_from(["user", "system", "assistant"]) | TEXT)},
    optional={"content": field(TEXT), "name": TEXT},
)
CHAT = shapes({"model": MODELS, "messages": field(st.lists(field(MESSAGE), max_size=3))}, SAMPLING)
PROMPT = (
    TEXT | st.lists(TEXT, max_size=3) | st.lists(st.integers(0, 50_000), min_size=1, max_size=8)
)
COMPLETIONS = shapes(
    {"model": MODELS, "prompt": field(PROMPT)}, {**SAMPLING, "echo": field(st.booleans())}
)
TENANTS = st.sampled_from(["alice", "careful"])
HEADER_BYTES = st.binary(max_size=60).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F))


# ---- the API -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(
    ("path", "bodies", "examples"),
    [
        ("/v1/chat/completions", CHAT, 150),
        ("/v1/completions", COMPLETIONS, 100),
    ],
    ids=["chat", "completions"],
)
def test_json_bodies(gateway, path, bodies, examples, scale):
    def one(case) -> None:
        body, tenant, session = case
        headers = gateway.tenant(tenant) | ({"X-Session-ID": session} if session else {})
        check(gateway.client.post(path, json=body, headers=headers))

    fuzz(
        examples * scale,
        st.tuples(bodies, TENANTS, st.none() | st.text(string.printable, max_size=20)),
        one,
    )


@pytest.mark.parametrize("scale", SCALES)
def test_raw_bodies(gateway, scale):
    raw = st.binary(max_size=200) | TEXT.map(str.encode) | JSON.map(lambda v: repr(v).encode())
    paths = st.sampled_from(["/v1/chat/completions", "/v1/completions"])

    def one(case) -> None:
        path, body = case
        check(gateway.client.post(path, content=body, headers=gateway.tenant("alice")))

    fuzz(50 * scale, st.tuples(paths, raw), one)


@pytest.mark.parametrize("scale", SCALES)
def test_headers(gateway, scale):
    """Any authorization, session and content-type bytes on an otherwise good request."""
    keys = gateway.keys
    tokens = st.sampled_from([keys.key("alice"), keys.admin, ""]) | TEXT.map(
        lambda t: t.encode("utf-8", "replace").decode("latin-1")
    )
    auth = st.one_of(
        tokens.map(lambda t: b"Bearer " + t.encode("latin-1")),
        st.tuples(
            st.sampled_from([b"bearer", b"Basic", b"Bearer", b""]),
            st.sampled_from([b" ", b"  ", b"\t"]),
            tokens.map(lambda t: t.encode("latin-1")),
        ).map(b"".join),
        HEADER_BYTES,
    )
    header_sets = st.fixed_dictionaries(
        {},
        optional={
            "authorization": auth,
            "api-key": auth,
            "x-session-id": HEADER_BYTES,
            "content-type": HEADER_BYTES,
        },
    )
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    def one(headers: dict) -> None:
        check(gateway.client.post("/v1/chat/completions", json=body, headers=headers))

    fuzz(60 * scale, header_sets, one)


@pytest.mark.parametrize("scale", SCALES)
def test_paths_and_methods(gateway, scale):
    """Unknown paths and wrong methods, with and without keys: 401/403/404/405 in the OpenAI
    shape."""
    segment = st.text(max_size=12).map(lambda s: quote(s, safe=""))
    prefixes = st.sampled_from(
        ["/v1/", "/admin/", "/admin/routes/", "/admin/stats/", "/", "/v1/models/"]
    )
    paths = st.tuples(prefixes, st.lists(segment, max_size=3)).map(lambda p: p[0] + "/".join(p[1]))
    methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"])
    who = st.sampled_from(["alice", "admin", "nobody"])

    def one(case) -> None:
        method, path, caller = case
        headers = {"alice": gateway.tenant("alice"), "admin": gateway.admin, "nobody": {}}[caller]
        check(gateway.client.request(method, path, headers=headers))

    fuzz(40 * scale, st.tuples(methods, paths, who), one)


# ---- the admin API -------------------------------------------------------------------------------

# pydantic reads numbers from strings too, "NaN" and "inf" included.
WEIGHT = st.one_of(
    NUMBERS, st.sampled_from(["NaN", "nan", "inf", "-inf", "1e309", "-0", "5"]), JSON
)


@pytest.mark.parametrize("scale", SCALES)
def test_admin_route_bodies(gateway, scale):
    """PUT /admin/routes/{model} with fuzzed backends, then a request through that route."""
    url = gateway.upstream_url
    versions = st.sampled_from(["1", "2", "3"]) | TEXT
    spec = st.fixed_dictionaries(
        {
            "version": field(versions),
            "url": field(st.sampled_from([url, url + "/v1", url + "/", "ftp://x", "not a url"])),
            "served_model": field(TEXT),
            "digest": field(st.sampled_from([digest("1"), digest("2"), "sha256:xyz"])),
            "expected_digest": field(st.sampled_from([digest("1"), digest("2")])),
            "attestation": field(
                st.sampled_from(
                    [
                        SIGNER.attest(digest("1")),
                        SIGNER.attest(digest("2"), verdict="failed"),
                        {"dsseEnvelope": {"signatures": "x"}, "verificationMaterial": 1},
                        "not an attestation",
                    ]
                )
            ),
            "weight": WEIGHT,
            "role": field(st.sampled_from(["stable", "canary"])),
        },
        optional={"max_concurrency": field(st.integers(-1, 2**70))},
    )
    bodies = shapes({"backends": field(st.lists(field(spec), max_size=3))}, {})
    names = st.sampled_from(["fuzz-a", "fuzz-b"]) | st.text(
        string.ascii_letters + "-._~", min_size=1, max_size=20
    )

    def one(case) -> None:
        model, body = case
        check(gateway.client.put(f"/admin/routes/{model}", json=body, headers=gateway.admin))
        chat = {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        check(
            gateway.client.post("/v1/chat/completions", json=chat, headers=gateway.tenant("alice"))
        )
        check(gateway.client.get(f"/admin/stats/{model}", headers=gateway.admin))

    fuzz(50 * scale, st.tuples(names, bodies), one)


@pytest.mark.parametrize("scale", SCALES)
def test_admin_weight_bodies(gateway, scale):
    """POST /admin/routes/{model}/weights with fuzzed weights, then requests through the route."""
    versions = st.sampled_from(["1", "2"])
    weights = st.dictionaries(st.one_of(versions, versions, TEXT), WEIGHT, max_size=3)
    bodies = shapes({"weights": field(weights)}, {})

    def one(case) -> None:
        body, tenant = case
        check(
            gateway.client.post(f"/admin/routes/{SPLIT}/weights", json=body, headers=gateway.admin)
        )
        chat = {"model": SPLIT, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        check(
            gateway.client.post("/v1/chat/completions", json=chat, headers=gateway.tenant(tenant))
        )

    fuzz(50 * scale, st.tuples(bodies, TENANTS), one)
