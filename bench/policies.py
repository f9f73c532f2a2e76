"""The configurations `make bench` runs: Sluice policies, nginx, LiteLLM.

Policies are written as JSON, which is YAML 1.2 (Sluice's policy parser reads it as it reads any
YAML), so a 100,000-tenant policy is one `json.dumps`. Every value here is what the bench says it
measures in BENCHMARKS.md's method section; change both together.
"""

import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The one request body of the non-streaming runs.
CHAT_BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}, separators=(",", ":")
)

# Limits high enough never to refuse a bench request, so every limit is still checked and
# charged (GCRA rate, daily request window, daily tokens with a prompt estimate, concurrency,
# monthly budget priced per model) on every request.
BENCH_LIMITS = {
    "rps": 1_000_000,
    "burst": 1_000_000,
    "requests_per_day": 1_000_000_000,
    "tokens_per_day": 1_000_000_000_000,
    "concurrent": 100_000,
    "budget_usd_per_month": 1_000_000_000,
}
PRICES = {"gpt-4o-mini": {"input": 0.15, "output": 0.60}}


def caller_key(index: int) -> str:
    """The Sluice key of bench tenant INDEX (only its hash goes into the policy)."""
    return f"sk-sluice-bench-{index}"


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def tenants(count: int, tier: str = "limited") -> list:
    return [
        {"name": f"tenant-{i}", "tier": tier, "keys": [{"hash": key_hash(caller_key(i))}]} for i in range(count)
    ]


def provider_keys(count: int, prefix: str) -> list:
    # Equal weights: the smooth weighted round robin walks all of them.
    return [{"key": f"{prefix}-{i}", "name": f"{prefix}-{i}"} for i in range(count)]


def upstream(mock_port: int, keys: list | None = None) -> dict:
    spec = {"provider": "openai_compatible", "base_url": f"http://127.0.0.1:{mock_port}"}
    if keys:
        spec["keys"] = keys
    return spec


CACHE = {"cache": {"when": "always", "ttl": "1h"}}
REQUEST_ID = {"request_id": {}}


def full_chain_route(name: str, prefix: str, targets: list) -> dict:
    """Auth (Sluice keys), limits (the tenant's tier), cache, key rotation over the first
    target's keys, fallback to the next target."""
    return {
        "name": name,
        "match": {"path_prefix": prefix},
        "targets": targets,
        "auth": "required",
        "filters": [REQUEST_ID, CACHE],
    }


def sluice_main(proxy: int, admin: int, mock_port: int, otlp_port: int | None) -> dict:
    """The Sluice of the side-by-side runs:
    - `/pass`: passthrough — no Sluice key (the caller's key goes through), no filters;
    - `/full`: the full chain (a request with `Cache-Control: no-cache` is a miss that goes
      upstream and is stored; without it, the same body is a cache hit);
    - with `otlp_port`, tracing on: every request sampled, spans exported over http/protobuf.
    """
    policy = {
        "listen": {"proxy": f"127.0.0.1:{proxy}", "admin": f"127.0.0.1:{admin}"},
        "server": {"threads": 2},
        "upstreams": {
            "mock": upstream(mock_port, [{"key": "sk-mock-a", "weight": 3}, {"key": "sk-mock-b", "weight": 1}]),
            "mock-fallback": upstream(mock_port, [{"key": "sk-mock-c"}]),
            "mock-open": upstream(mock_port),
        },
        "routes": [
            {
                "name": "pass",
                "match": {"path_prefix": "/pass"},
                "upstream": "mock-open",
                "auth": "passthrough",
                "filters": [],
            },
            full_chain_route("full", "/full", ["mock", "mock-fallback"]),
        ],
        "tiers": {"limited": {"limits": BENCH_LIMITS}},
        "prices": PRICES,
        "tenants": tenants(1),
    }
    if otlp_port is not None:
        policy["telemetry"] = {
            "otlp": {
                "endpoint": f"http://127.0.0.1:{otlp_port}",
                "protocol": "http/protobuf",
                "sampling_ratio": 1.0,
            }
        }
    return policy


def sluice_minimal(proxy: int, admin: int, mock_port: int) -> dict:
    """The least Sluice runs with: one passthrough route, no tenants, limits or telemetry export;
    its idle RSS is the process's own floor (no tokenizers, no exporter)."""
    return {
        "listen": {"proxy": f"127.0.0.1:{proxy}", "admin": f"127.0.0.1:{admin}"},
        "server": {"threads": 2},
        "upstreams": {"mock-open": upstream(mock_port)},
        "routes": [{"name": "pass", "match": {"path_prefix": "/pass"}, "upstream": "mock-open", "filters": []}],
    }


# The filter ladder: one route per step, each adding one piece to the one before. The caller key
# decides the tenant, and so whether limits apply (tenant 0: tier `limited`; the last tenant:
# tier `open`, no limits).
LADDER = (
    ("none", "no filters (passthrough)"),
    ("request-id", "+ request id"),
    ("auth", "+ auth (Sluice key, 1 provider key)"),
    ("limits", "+ limits (rate, day, tokens, concurrency, budget)"),
    ("cache", "+ cache (miss: no-cache, stored)"),
    ("rotation", "+ key rotation (2 keys) and a fallback target"),
)


def sluice_scaling(
    proxy: int, admin: int, mock_port: int, tenant_count: int, key_counts: list[int], keys_file: Path
) -> dict:
    """A Sluice with TENANT_COUNT tenants (each one key) for the scaling runs: `/full` as in the
    main runs (tracing off), `/keys-N` the full chain over one upstream with N provider keys,
    and the filter ladder's routes `/ladder-STEP`. The tenants' keys are written to KEYS_FILE
    (`keys_file`, as a large deployment keeps them): 100,000 tenants with their key hashes are
    13 MB, and both files are JSON, as a tool exporting them would write them."""
    open_tenant = tenant_count  # index of the extra tenant whose tier has no limits
    ladder_filters = {
        "none": [],
        "request-id": [REQUEST_ID],
        "auth": [REQUEST_ID],
        "limits": [REQUEST_ID],
        "cache": [REQUEST_ID, CACHE],
        "rotation": [REQUEST_ID, CACHE],
    }
    routes = [full_chain_route("full", "/full", ["mock", "mock-fallback"])]
    for count in key_counts:
        routes.append(full_chain_route(f"keys-{count}", f"/keys-{count}", [f"keys-{count}"]))
    for step, _ in LADDER:
        route = {"name": f"ladder-{step}", "match": {"path_prefix": f"/ladder-{step}"}, "filters": ladder_filters[step]}
        if step in ("none", "request-id"):
            route.update(upstream="mock-open", auth="passthrough")
        elif step == "rotation":
            route.update(targets=["mock", "mock-fallback"], auth="required")
        else:
            route.update(upstream="mock-one-key", auth="required")
        routes.append(route)
    upstreams = {
        "mock": upstream(mock_port, [{"key": "sk-mock-a", "weight": 3}, {"key": "sk-mock-b", "weight": 1}]),
        "mock-fallback": upstream(mock_port, [{"key": "sk-mock-c"}]),
        "mock-open": upstream(mock_port),
        "mock-one-key": upstream(mock_port, [{"key": "sk-mock-a"}]),
    }
    for count in key_counts:
        upstreams[f"keys-{count}"] = upstream(mock_port, provider_keys(count, f"sk-mock-pool{count}"))
    everyone = [{"name": f"t{i}", "tier": "limited"} for i in range(tenant_count)]
    everyone.append({"name": "open", "tier": "open"})
    keys = [{"tenant": f"t{i}", "hash": key_hash(caller_key(i))} for i in range(tenant_count)]
    keys.append({"tenant": "open", "hash": key_hash(caller_key(open_tenant))})
    keys_file.write_text(json.dumps({"keys": keys}, separators=(",", ":")) + "\n")
    return {
        "keys_file": str(keys_file),
        "listen": {"proxy": f"127.0.0.1:{proxy}", "admin": f"127.0.0.1:{admin}"},
        "server": {"threads": 2},
        "upstreams": upstreams,
        "routes": routes,
        "tiers": {"limited": {"limits": BENCH_LIMITS}, "open": {}},
        "prices": PRICES,
        "tenants": everyone,
    }


def write_policy(path: Path, policy: dict) -> None:
    path.write_text(json.dumps(policy, indent=None, separators=(",", ":")) + "\n")


def nginx_conf(work: Path, listen: int, mock_port: int) -> str:
    template = (ROOT / "bench" / "nginx.conf.tmpl").read_text()
    return template.replace("@WORK@", str(work)).replace("@MOCK_PORT@", str(mock_port)).replace(
        "@NGINX_PORT@", str(listen)
    )


# LiteLLM's uvicorn logs a line per request at INFO; Sluice and nginx run without access logs,
# so LiteLLM does too.
LITELLM_LOGGING = json.dumps(
    {"version": 1, "disable_existing_loggers": False, "loggers": {"uvicorn.access": {"level": "WARNING"}}}
)


def litellm_config(mock_port: int) -> str:
    """LiteLLM proxy: one model name routed to the mock as an OpenAI-compatible server; no
    master key (no auth), no database, no callbacks — its lightest configuration."""
    return json.dumps(
        {
            "model_list": [
                {
                    "model_name": "gpt-4o-mini",
                    "litellm_params": {
                        "model": "openai/gpt-4o-mini",
                        "api_base": f"http://127.0.0.1:{mock_port}/v1",
                        "api_key": "sk-mock-litellm",
                    },
                }
            ],
            "litellm_settings": {"telemetry": False, "drop_params": True},
        }
    )
