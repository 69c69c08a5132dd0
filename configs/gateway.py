"""The gateway config (configs/gateway.yaml): routes, tenants, limits, usage log, resilience, and
the state store every instance shares.

Secrets never appear here: tenant keys and the admin token are stored as sha256 hex digests
(`slipway keys new TENANT` prints a key once, with the hash to paste here).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from configs.loader import Strict, load_yaml
from configs.pricing import Chargeback, embedded_chargeback

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_STATE_SCHEMES = ("sqlite:///", "postgresql://", "postgres://", "redis://", "rediss://")

Audience = Literal["everyone", "opted_in"]
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# The bounds of the gateway's latency histograms (/metrics), in seconds: a loopback mock
# (sub-ms) up to long generations. SLO latency targets must be one of them (configs/slo.py).
LATENCY_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75),
    *(1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0),
)


def _base_url(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
        raise ValueError(f"'{value}' is not an http(s) base URL such as http://127.0.0.1:8001")
    return value.rstrip("/").removesuffix("/v1")


def _check_sha256_hex(value: str, what: str) -> str:
    if not _SHA256_HEX.match(value):
        raise ValueError(
            f"{what} must be the 64-character lowercase sha256 hex digest of the secret "
            "(never the secret itself); `slipway keys new NAME` prints one"
        )
    return value


class BackendSpec(Strict):
    """One upstream OpenAI-compatible server (a vLLM process) serving one registered model
    version."""

    version: str = Field(
        min_length=1, description="registered model version, unique within the route"
    )
    url: str = Field(description="base URL of the server, e.g. http://127.0.0.1:8001 (no /v1)")
    replicas: tuple[str, ...] = Field(
        (),
        description="base URLs of further servers of this version (the same weights): requests "
        "are balanced over `url` and these by least outstanding requests (the gateway's in "
        "flight plus what each engine reports waiting), each with its own circuit breaker",
    )
    served_model: str = Field(
        min_length=1, description="the model name the upstream server answers to"
    )
    digest: str = Field(description="sha256:<hex> digest of the loaded weights")
    attestation: dict[str, Any] = Field(
        description="the signed evaluation attestation of exactly `digest` (`slipway attestation "
        "show`); the gateway verifies it against its trust and serves nothing without it"
    )
    weight: float = Field(
        ge=0,
        allow_inf_nan=False,
        description="relative share of traffic; 0 takes it out of rotation",
    )
    role: Literal["stable", "canary"]
    max_concurrency: int = Field(
        256,
        ge=1,
        description="requests in flight at once per replica; more wait in the gateway's queue "
        "(`queue`), or get 503 + Retry-After without one",
    )
    priority_scheduling: bool = Field(
        False,
        description="the server runs vLLM's priority scheduling (--scheduling-policy priority): "
        "each request is sent with its tier's priority",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _base_url(value)

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_base_url(url) for url in value)

    @model_validator(mode="after")
    def _distinct(self) -> BackendSpec:
        if len(set(self.urls)) < len(self.urls):
            raise ValueError(f"version '{self.version}' names a server twice in url and replicas")
        return self

    @property
    def urls(self) -> tuple[str, ...]:
        """Every server of this version: `url`, then `replicas`."""
        return (self.url, *self.replicas)

    @field_validator("digest")
    @classmethod
    def _digest(cls, value: str) -> str:
        if not _DIGEST.match(value):
            raise ValueError("digest must look like sha256:<64 lowercase hex characters>")
        return value


class MirrorSpec(Strict):
    """Copies of stable's requests sent to one canary for analysis only (a rollout's shadow
    phase): the client gets stable's answer, the copy is never billed."""

    to: str = Field(min_length=1, description="the canary version that gets the copies")
    rate_rps: float = Field(
        gt=0, allow_inf_nan=False, description="at most this many copies per second"
    )
    share: float = Field(
        1.0, gt=0, le=1, description="the share of stable's requests copied, within rate_rps"
    )
    max_in_flight: int | None = Field(
        None,
        ge=1,
        description="no copy goes to a side already answering this many copies: an engine "
        "that falls behind sheds copies first instead of queueing them without end",
    )


class RouteSpec(Strict):
    """A public model name and the backends that serve it."""

    model: str = Field(min_length=1)
    backends: tuple[BackendSpec, ...] = Field(min_length=1)
    audience: Audience = Field(
        "everyone",
        description="'opted_in': only tenants with canary: in reach a canary (a rollout's "
        "tenant-first stage)",
    )
    mirror: MirrorSpec | None = Field(None, description="copy stable's requests to a canary")
    failover: bool = Field(
        False,
        description="when no stable backend can serve (every circuit open, or the last one failed "
        "before its answer began), serve the model from a healthy canary instead of 503; counted "
        "apart, never as canary evidence",
    )

    @model_validator(mode="after")
    def _consistent(self) -> RouteSpec:
        versions = [b.version for b in self.backends]
        if dupes := sorted({v for v in versions if versions.count(v) > 1}):
            raise ValueError(
                f"route '{self.model}': backend versions must be unique, repeated: {dupes}"
            )
        if not any(b.role == "stable" for b in self.backends):
            raise ValueError(f"route '{self.model}' needs at least one backend with role 'stable'")
        if sum(b.weight for b in self.backends) <= 0:
            raise ValueError(f"route '{self.model}': at least one backend needs a weight above 0")
        mirror = self.mirror
        if mirror and not any(b.version == mirror.to and b.role == "canary" for b in self.backends):
            raise ValueError(
                f"route '{self.model}': mirror.to '{mirror.to}' is not one of its canary backends"
            )
        return self


class Tenant(Strict):
    """A tenant: its tier, its limits and its choices. Limits left out are unlimited. Its keys are
    kept apart (serving/gateway/keyring.py): a tenant may hold several while one is rotated.

    The prompt is bounded in bytes, not tokens: the gateway holds no tokenizer, so it cannot count
    a prompt's tokens before the backend does. Refusing on an estimate would refuse some prompts
    within a token limit, and counting afterwards would refuse nothing; the UTF-8 byte length is
    exact, and since a byte-level tokenizer's token stands for at least one byte, N bytes also
    bound the prompt's text to at most N tokens (the chat template adds its own few).
    """

    name: str = Field(min_length=1, pattern=r"^[\w.-]+$")
    tier: str = Field(
        "standard",
        pattern=r"^[\w.-]+$",
        description="the service tier this tenant is scheduled by (e.g. premium, standard, batch)",
    )
    rpm: int | None = Field(None, ge=1, description="requests per sliding minute")
    tpm: int | None = Field(None, ge=1, description="prompt+completion tokens per sliding minute")
    monthly_token_budget: int | None = Field(
        None, ge=1, description="prompt+completion tokens per calendar month (UTC)"
    )
    monthly_budget_usd: float | None = Field(
        None,
        gt=0,
        description="dollars per calendar month (UTC), its tokens charged at its chargeback rate "
        "(limits.chargeback: its own, else its tier's)",
    )
    models: tuple[str, ...] | None = Field(
        None,
        min_length=1,
        description="the public model names this tenant may use (others answer 404 as if not "
        "served); None: all",
    )
    max_prompt_bytes: int | None = Field(
        None,
        ge=1,
        description="largest prompt, in UTF-8 bytes of its text (all prompts of a request "
        "together; token ids count one each; tool definitions and calls as their JSON)",
    )
    max_tokens_cap: int | None = Field(
        None,
        ge=1,
        description="largest max_tokens / max_completion_tokens; also the max_tokens of a "
        "request that names neither",
    )
    max_n: int | None = Field(None, ge=1, description="largest n (choices per prompt)")
    max_inflight: int | None = Field(
        None,
        ge=1,
        description="requests in flight at once, counted across every gateway sharing Redis; "
        "one more gets a 429 (retry after 1 s)",
    )
    canary: Literal["in", "out"] | None = Field(None, description="None follows canary_default")
    log_prompts: bool = Field(False, description="store prompt text in the usage log")
    cache: bool = Field(True, description="whether the response cache may answer this tenant")
    synthetic: bool = Field(
        False,
        description="load generated by Slipway (the rollout's traffic driver): its samples are "
        "kept apart from organic traffic in the per-backend statistics",
    )


class TenantSpec(Tenant):
    """A tenant with one key, as configs/gateway.yaml names them for the state store."""

    key_sha256: str

    @field_validator("key_sha256")
    @classmethod
    def _hash(cls, value: str) -> str:
        return _check_sha256_hex(value, "key_sha256")


AdminRole = Literal["operator", "rollout", "auditor"]


class AdminSpec(Strict):
    """An admin identity: the audit log names it by `id`. operator: every admin route; rollout:
    routes, weights and statistics (what the rollout flow drives); auditor: reads only."""

    id: str = Field(min_length=1, pattern=r"^[\w.-]+$")
    token_sha256: str
    role: AdminRole

    @field_validator("token_sha256")
    @classmethod
    def _hash(cls, value: str) -> str:
        return _check_sha256_hex(value, "token_sha256")


class TimeoutsSpec(Strict):
    connect_s: float = Field(2.0, gt=0, description="TCP connect to a backend")
    read_s: float = Field(60.0, gt=0, description="longest silence between bytes from a backend")
    request_s: float | None = Field(
        None,
        gt=0,
        description="the most a request may take, streams included, unless its client asks for "
        "less (header x-slipway-timeout-s); past it the backend's request is stopped; None: no "
        "limit but the client's",
    )
    drain_s: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM: how long requests in flight (streams too) get to finish; new "
        "connections are refused at once",
    )


class BreakerSpec(Strict):
    failures: int = Field(5, ge=1, description="consecutive failures that open a backend's circuit")
    open_s: float = Field(10.0, gt=0, description="how long it stays open before one probe request")


class UsageSpec(Strict):
    url: str | None = Field(
        None,
        description="postgresql://... or sqlite:///path; default SQLite under $SLIPWAY_HOME/logs",
    )
    batch_interval_s: float = Field(
        1.0, gt=0, description="how often the writer flushes: also the loss window after kill -9"
    )
    batch_size: int = Field(1000, ge=1)
    queue_size: int = Field(100_000, ge=1, description="records held before new ones are dropped")
    meter_interval_s: float = Field(
        30.0,
        gt=0,
        description="how often each backend's own token counters are read into the usage log "
        "(engine_meter), the points at which the usage can be reconciled with them",
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(
            ("sqlite:///", "postgresql://", "postgres://")
        ):
            raise ValueError("usage.url must start with sqlite:///, postgresql:// or postgres://")
        return value


class TrustSpec(Strict):
    """Whose evaluation attestations the gateway accepts. It always trusts the keyring of its
    home ($SLIPWAY_HOME/keys/trusted: every key and CA chain that signed a release there) and the
    deny-list `slipway deny` keeps ($SLIPWAY_HOME/keys/denied.json, re-read while it runs); these
    add to them. Nothing turns the check off: a backend without a valid attestation is refused."""

    keys: tuple[Path, ...] = Field((), description="more PEM public keys (P-256) to trust")
    authorities: tuple[Path, ...] = Field(
        (), description="more PEM CA certificates whose issued certificates are trusted"
    )
    deny_digests: tuple[str, ...] = Field((), description="model digests never served")
    deny_keys: tuple[str, ...] = Field(
        (), description="signers never trusted: sha256:<hex> of a key's DER public key"
    )


class StateSpec(Strict):
    """The gateway's durable shared state (the routing table today): every instance pointed at one
    store serves the same routes, and a restart serves what the store holds."""

    url: str | None = Field(
        None,
        description="sqlite:///path, postgresql://user@host:5432/db or redis://host:6379/0; "
        "default SQLite at $SLIPWAY_HOME/state/gateway.sqlite (one machine only)",
    )
    redis_prefix: str = Field(
        "slipway:gateway:", min_length=1, description="Redis only: the prefix of every state key"
    )
    poll_interval_s: float = Field(
        0.25,
        ge=0.01,
        le=60,
        description="how often each instance checks the store's version: a change made through "
        "another instance is served here within about this long",
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(_STATE_SCHEMES):
            raise ValueError(
                f"state.url must start with {', '.join(_STATE_SCHEMES)}, e.g. "
                "postgresql://postgres@127.0.0.1:5432/slipway; leave it out for SQLite under "
                "$SLIPWAY_HOME"
            )
        return value


OnDown = Literal["open", "closed"]


class OutagePolicy(Strict):
    """What each limit does while Redis, which shares it between instances, cannot be reached:
    `open` admits (holding and charging nothing), `closed` refuses with a 503. A request is
    refused when any limit its tenant has fails closed."""

    rpm: OnDown = Field("open", description="a request-rate outage must not become a serving one")
    tpm: OnDown = "open"
    monthly_token_budget: OnDown = Field(
        "closed", description="money must not be spent that no one can count"
    )
    monthly_budget_usd: OnDown = "closed"


class LimitsSpec(Strict):
    """How a request's tokens are bounded at admission, for tenants with `tpm` or a
    `monthly_token_budget`: the bound is held against those limits while the request runs, then
    replaced by the tokens it used (serving/gateway/limits.py).

    The gateway has no tokenizer: a prompt's text is bounded by its UTF-8 bytes (a byte-level
    tokenizer's token stands for at least one byte), and what a chat template or the tokenizer adds
    around the text (role markers, BOS) by a fixed allowance per message.
    """

    template_tokens_per_message: int = Field(
        16,
        ge=0,
        description="tokens a chat template may add per message, and once more per request (the "
        "assistant's header); per prompt on /v1/completions (special tokens)",
    )
    default_max_tokens: int = Field(
        1024,
        ge=1,
        description="the max_tokens given to a request that names none, of a tenant with token "
        "limits and no max_tokens_cap (without one its completion would have no bound)",
    )
    hold_ttl_s: int = Field(
        900,
        ge=60,
        description="Redis only: a reservation not settled within this long (its gateway died "
        "mid-request) stops counting against the tenant's limits",
    )
    on_store_down: OutagePolicy = Field(
        OutagePolicy(), description="Redis only: each limit fails open or closed while it is down"
    )
    chargeback: Chargeback = Field(
        default_factory=embedded_chargeback,
        description="per-token rates money budgets are charged at; by default those of "
        "configs/pricing.yaml",
    )


class OIDCSpec(Strict):
    """Tenants may authenticate with a JWT from this identity provider instead of an API key. The
    token's signature is verified offline against the provider's key set, read once at start."""

    issuer: str = Field(min_length=1, description="the `iss` every token must carry")
    audience: str = Field(min_length=1, description="the `aud` every token must carry")
    jwks_file: Path | None = Field(None, description="the provider's key set (JWKS JSON)")
    jwks_url: str | None = Field(None, description="or where to fetch it, once, at start")
    tenant_claim: str = Field(
        "tenant", min_length=1, description="the claim that names the tenant (which must exist)"
    )
    algorithms: tuple[Literal["RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA"], ...] = Field(
        ("RS256", "ES256"),
        min_length=1,
        description="asymmetric only: a shared secret is no key set",
    )
    leeway_s: float = Field(30.0, ge=0, le=300, description="clock skew allowed on exp and nbf")

    @model_validator(mode="after")
    def _one_source(self) -> OIDCSpec:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("oidc needs exactly one of jwks_file and jwks_url")
        return self


class TierSpec(Strict):
    """How a tier's requests are scheduled when a backend is full (serving/gateway/queue.py)."""

    priority: int = Field(
        0, ge=-1000, le=1000, description="a higher priority is served first, whatever waits"
    )
    weight: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="each tenant's share within the tier"
    )
    max_wait_s: float = Field(
        10.0, gt=0, description="the longest a request waits for a slot before a 503"
    )
    reserved_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="the share of each backend's slots (max_concurrency) this tier keeps: other "
        "tiers may take them only while it has nothing in flight or waiting (lent while idle), "
        "and a slot freed goes to it first while it holds fewer",
    )


class QueueSpec(Strict):
    """Requests that find a backend at max_concurrency wait here, by tier priority and, within a
    tier, by weighted fair queuing on their token cost; none wait while `max_waiting` is 0."""

    max_waiting: int = Field(
        0, ge=0, description="requests waiting per backend; one more gets a 503 at once"
    )
    tiers: dict[str, TierSpec] = Field(
        default_factory=dict, description="by tier name; a tier not named is scheduled as `default`"
    )
    default: TierSpec = TierSpec()
    _reserved: dict[str, float] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any, /) -> None:
        self._reserved = {n: t.reserved_share for n, t in self.tiers.items() if t.reserved_share}

    @model_validator(mode="after")
    def _reservable(self) -> QueueSpec:
        if self.default.reserved_share:
            raise ValueError("queue.default.reserved_share: only a named tier may reserve slots")
        if sum(t.reserved_share for t in self.tiers.values()) > 1:
            shares = {n: t.reserved_share for n, t in self.tiers.items() if t.reserved_share}
            raise ValueError(f"queue.tiers reserve more than every slot in all: {shares}")
        return self

    @property
    def reserved(self) -> dict[str, float]:
        """The tiers that keep a share of the slots, and their shares."""
        return self._reserved

    def tier(self, name: str) -> TierSpec:
        return self.tiers.get(name, self.default)


class CacheSpec(Strict):
    """The response cache (serving/gateway/cache.py): exact-match answers for requests that are
    deterministic by rule (temperature 0, or a seed) or that the client marks cacheable."""

    enabled: bool = False
    store: Literal["memory", "redis"] = Field(
        "memory",
        description="memory: this gateway's own LRU; redis: shared by every gateway on redis_url",
    )
    ttl_s: float = Field(300.0, gt=0, description="how long an answer may be replayed")
    max_entries: int = Field(10_000, ge=1, description="memory: answers kept")
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="memory: bytes kept in all")
    max_entry_bytes: int = Field(
        1024 * 1024, ge=1, description="a larger answer is not stored (either store)"
    )
    scope: Literal["tenant", "shared"] = Field(
        "tenant", description="tenant: a tenant only ever gets its own cached answers"
    )
    billing: Literal["free", "full"] = Field(
        "free", description="what a hit costs the tenant: nothing, or the tokens of the answer"
    )


class BalanceSpec(Strict):
    """How a request is placed among a version's replicas (serving/gateway/routing.py)."""

    poll_s: float = Field(
        1.0,
        ge=0,
        le=60,
        description="how often each replica's /metrics is read for the requests its engine holds "
        "waiting (and its prefix-cache hits); one that does not answer counts a failure on its "
        "breaker; 0: never read, balance on the gateway's in-flight counts alone",
    )
    session_load_bound: float = Field(
        1.25,
        ge=1,
        le=10,
        description="a session stays on its replica (consistent hashing) while that replica's "
        "load is under this multiple of the version's mean load, then moves to the next one",
    )


class TracingSpec(Strict):
    """OpenTelemetry spans of each API request, sent by OTLP/HTTP (serving/gateway/tracing.py);
    off unless `endpoint` is set, and then free: no span is made."""

    endpoint: str | None = Field(
        None,
        description="the collector's OTLP/HTTP traces URL, e.g. http://127.0.0.1:4318/v1/traces; "
        "None: tracing off",
    )
    service_name: str = Field("slipway-gateway", min_length=1, description="the service.name")
    sample_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="the share of new traces recorded; a request whose client sent a traceparent "
        "is recorded as that parent was",
    )

    @field_validator("endpoint")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
            raise ValueError(f"tracing.endpoint '{value}' is not an http(s) URL")
        return value


class InstancesSpec(Strict):
    """Several gateway processes serving as one (README: Several gateways, one address)."""

    reuse_port: bool = Field(
        False,
        description="bind `port` with SO_REUSEPORT: gateways on one machine share the address and "
        "the kernel spreads connections among them",
    )
    peer_host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="this instance's address for the others, announced in the state store, "
        "where they find it to read its statistics: `port` on it, or with reuse_port a free port "
        "it also listens on (in Kubernetes the pod's IP: --peer-host)",
    )
    heartbeat_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="how often an instance renews its announcement; one silent for three "
        "heartbeats is left out of the statistics",
    )


class StatsSpec(Strict):
    samples: int = Field(
        4096, ge=16, description="raw samples kept per backend and measure since the last reset"
    )


class GatewayConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    admin_token_sha256: str
    canary_default: Literal["in", "out"] = Field(
        "in", description="whether tenants without a `canary` choice get canary traffic"
    )
    redis_url: str | None = Field(None, description="share limits between instances through Redis")
    redis_prefix: str = "slipway:gateway:"
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    timeouts: TimeoutsSpec = TimeoutsSpec()
    breaker: BreakerSpec = BreakerSpec()
    usage: UsageSpec = UsageSpec()
    stats: StatsSpec = StatsSpec()
    instances: InstancesSpec = InstancesSpec()
    cache: CacheSpec = CacheSpec()
    queue: QueueSpec = QueueSpec()
    balance: BalanceSpec = BalanceSpec()
    limits: LimitsSpec = LimitsSpec()
    state: StateSpec = StateSpec()
    trust: TrustSpec = TrustSpec()
    tracing: TracingSpec = TracingSpec()
    routes: tuple[RouteSpec, ...] = Field(
        (), description="seeds an empty state store; once it holds routes, the store's win"
    )
    tenants: tuple[TenantSpec, ...] = Field(
        (),
        description="added to the state store where it does not hold them (a tenant by name, a "
        "key by hash); the admin API manages them from there",
    )
    oidc: OIDCSpec | None = Field(None, description="tenants may also sign in with a JWT")
    admins: tuple[AdminSpec, ...] = Field(
        (),
        description="admin identities besides admin_token_sha256 (which is the operator 'admin')",
    )

    @field_validator("admin_token_sha256")
    @classmethod
    def _admin_hash(cls, value: str) -> str:
        return _check_sha256_hex(value, "admin_token_sha256")

    @model_validator(mode="after")
    def _unique(self) -> GatewayConfig:
        for what, values in (
            ("route models", [r.model for r in self.routes]),
            ("tenant names", [t.name for t in self.tenants]),
            ("tenant key hashes", [t.key_sha256 for t in self.tenants]),
            ("admin ids", ["admin", *(a.id for a in self.admins)]),
            (
                "admin token hashes",
                [self.admin_token_sha256, *(a.token_sha256 for a in self.admins)],
            ),
        ):
            if dupes := sorted({v for v in values if values.count(v) > 1}):
                raise ValueError(f"{what} must be unique, repeated: {dupes}")
        admin_hashes = {self.admin_token_sha256, *(a.token_sha256 for a in self.admins)}
        if admin_hashes & {t.key_sha256 for t in self.tenants}:
            raise ValueError("admin tokens must differ from every tenant key")
        for tenant in self.tenants:
            if why := unpriced(tenant, self.limits.chargeback):
                raise ValueError(why)
        if self.cache.enabled and self.cache.store == "redis" and not self.redis_url:
            raise ValueError(
                "cache.store is 'redis' but redis_url is not set: set it, or use 'memory'"
            )
        return self


def unpriced(tenant: Tenant, chargeback: Chargeback) -> str | None:
    """Why a tenant's money budget cannot be charged (no rate for it or its tier), or None."""
    if tenant.monthly_budget_usd is None or chargeback.rate(tenant.name, tenant.tier):
        return None
    return (
        f"tenant '{tenant.name}' has a monthly_budget_usd but no chargeback rate: add one for "
        f"it or for its tier '{tenant.tier}' under limits.chargeback (by default configs/"
        "pricing.yaml's chargeback: tiers or tenants)"
    )


def load_gateway_config(path: str | Path) -> GatewayConfig:
    return load_yaml(path, GatewayConfig)
