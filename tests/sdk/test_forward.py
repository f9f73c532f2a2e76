"""HTTPS_PROXY mode: the official openai SDK keeps its default base URL (https://api.openai.com)
and only gets a proxy and a CA to trust; Sluice intercepts, and auth, limits and cache apply as in
base-URL mode. The provider is the HTTPS mock, reached by its real name through the policy's
`resolve` (no hosts file)."""

import hashlib
import ssl

import httpx
import openai
import pytest
from conftest import SLUICE_KEY, SLUICE_KEY_HASH, read_chat_stream, started_sidecar

LIMITED_KEY = "sk-sluice-sdk-limited"
LIMITED_KEY_HASH = "sha256:" + hashlib.sha256(LIMITED_KEY.encode()).hexdigest()


@pytest.fixture(scope="module")
def forward_sidecar(https_mock):
    """Routes by host for intercepted calls, by path for base-URL calls, to one upstream."""
    upstream = (
        f'{{ provider: openai, base_url: "https://api.openai.com", keys: ["sk-upstream-openai"], '
        f'tls: {{ ca_file: "{https_mock.ca_file}" }} }}'
    )
    policy = f"""
upstreams:
  openai: {upstream}
routes:
  - name: openai-by-host
    match: {{ hosts: [api.openai.com] }}
    upstream: openai
    filters: [{{ cache: {{ ttl: 1h }} }}]
  - {{ name: openai-by-path, match: {{ path_prefix: /openai }}, upstream: openai }}
tiers:
  small: {{ models: ["gpt-4o-mini"] }}
  tiny: {{ limits: {{ requests_per_minute: 2 }} }}
tenants:
  - {{ name: sdk-team, tier: small, keys: [{{ hash: "{SLUICE_KEY_HASH}" }}] }}
  - {{ name: limited-team, tier: tiny, keys: [{{ hash: "{LIMITED_KEY_HASH}" }}] }}
resolve:
  api.openai.com: "127.0.0.1:{https_mock.tls_port}"
"""
    with started_sidecar(policy, forward=True) as running:
        yield running


def proxied_client(sidecar, key: str) -> openai.OpenAI:
    """The SDK with its default base URL, through the proxy, trusting Sluice's CA."""
    trust = ssl.create_default_context(cafile=str(sidecar.ca_file))
    http_client = httpx.Client(proxy=sidecar.forward, verify=trust)
    return openai.OpenAI(api_key=key, http_client=http_client, max_retries=0)


def test_chat_and_stream_through_https_proxy(forward_sidecar, https_mock_requests):
    client = proxied_client(forward_sidecar, SLUICE_KEY)
    assert str(client.base_url).startswith("https://api.openai.com/")
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello via proxy"}]
    )
    assert completion.choices[0].message.content == "echo: hello via proxy"
    (seen,) = https_mock_requests()
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == "Bearer sk-upstream-openai"
    assert SLUICE_KEY not in str(seen)

    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "stream via proxy"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = read_chat_stream(stream)
    assert text == "echo: stream via proxy"
    assert usage is not None and usage.completion_tokens > 0


def test_auth_and_tier_apply_to_intercepted_calls(forward_sidecar, https_mock_requests):
    stranger = proxied_client(forward_sidecar, "sk-not-a-sluice-key")
    with pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    member = proxied_client(forward_sidecar, SLUICE_KEY)
    with pytest.raises(openai.PermissionDeniedError) as raised:
        member.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert "gpt-4o" in str(raised.value)
    assert https_mock_requests() == []


def test_cache_answers_intercepted_calls(forward_sidecar, https_mock_requests):
    client = proxied_client(forward_sidecar, SLUICE_KEY)
    ask = dict(model="gpt-4o-mini", messages=[{"role": "user", "content": "cache via proxy"}], temperature=0)
    outcomes, texts = [], []
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(**ask)
        outcomes.append(raw.headers["x-sluice-cache"])
        texts.append(raw.parse().choices[0].message.content)
    assert outcomes == ["miss", "hit"]
    assert texts == ["echo: cache via proxy"] * 2
    assert len(https_mock_requests()) == 1


def test_limits_count_base_url_and_proxied_calls_together(forward_sidecar):
    proxied = proxied_client(forward_sidecar, LIMITED_KEY)
    direct = openai.OpenAI(base_url=f"{forward_sidecar.proxy}/openai/v1", api_key=LIMITED_KEY, max_retries=0)
    ask = dict(model="gpt-4o-mini", messages=[{"role": "user", "content": "count me"}])
    direct.chat.completions.create(**ask)
    proxied.chat.completions.create(**ask)
    with pytest.raises(openai.RateLimitError):
        proxied.chat.completions.create(**ask)
    with pytest.raises(openai.RateLimitError):
        direct.chat.completions.create(**ask)


def test_the_environment_alone_is_enough(forward_sidecar, monkeypatch):
    """What an app in the pod does: HTTPS_PROXY and SSL_CERT_FILE set, the SDK built with its
    defaults."""
    monkeypatch.setenv("HTTPS_PROXY", forward_sidecar.forward)
    monkeypatch.setenv("SSL_CERT_FILE", str(forward_sidecar.ca_file))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    client = openai.OpenAI(api_key=SLUICE_KEY, max_retries=0)
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "env only"}]
    )
    assert completion.choices[0].message.content == "echo: env only"
