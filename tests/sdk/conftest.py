"""Starts the mock provider and the real sidecar for the SDK tests."""

import contextlib
import hashlib
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SLUICE = os.environ.get("SLUICE_BIN", str(ROOT / "target/debug/sluice"))
MOCK = os.environ.get("SLUICE_MOCK_BIN", str(ROOT / "target/debug/sluice-mock"))
SLUICE_KEY = "sk-sluice-sdk-test-key"
SLUICE_KEY_HASH = "sha256:" + hashlib.sha256(SLUICE_KEY.encode()).hexdigest()
# The mock's AWS account (mock/src/bedrock.rs): it verifies Sluice's signatures with these.
MOCK_AWS_ACCESS_KEY_ID = "AKIDSLUICEMOCK000001"
MOCK_AWS_SECRET_ACCESS_KEY = "mock/Secret+Access/Key/0123456789abcdefgh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: all held at once while they are chosen (separate
    `free_port` calls may return one port twice)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def wait_http(url: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def mock_url():
    port = free_port()
    process = subprocess.Popen([MOCK, "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/_mock/health")
        yield url
    finally:
        process.kill()
        process.wait()


def bedrock_upstream(mock_url: str) -> str:
    """A bedrock upstream on the mock, signing with the mock account's credentials."""
    return (
        f'{{ provider: bedrock, region: us-east-1, base_url: "{mock_url}", '
        f'aws: {{ access_key_id: "{MOCK_AWS_ACCESS_KEY_ID}", '
        f'secret_access_key: "{MOCK_AWS_SECRET_ACCESS_KEY}" }} }}'
    )


def read_chat_stream(stream) -> tuple[str, object]:
    """The text of an openai chat-completion stream, and its usage chunk's usage (or None)."""
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    return text, usage


@dataclass
class RunningSidecar:
    proxy: str
    """The forward listener (HTTPS_PROXY mode), when started with one."""
    forward: str | None
    folder: Path

    @property
    def ca_file(self) -> Path:
        """The CA certificate the sidecar made at startup (`forward.ca.cert_file`'s default)."""
        return self.folder / "sluice-ca.pem"


@contextlib.contextmanager
def started_sidecar(policy_body: str, forward: bool = False):
    """The real sidecar on free ports with this policy (upstreams, routes, tenants), and the
    forward listener when asked."""
    proxy, admin, forward_port = free_ports(3)
    forward_listen = f", forward: 127.0.0.1:{forward_port}" if forward else ""
    policy = f"listen: {{ proxy: 127.0.0.1:{proxy}, admin: 127.0.0.1:{admin}{forward_listen} }}\n{policy_body}"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sluice.yaml"
        path.write_text(policy)
        env = dict(os.environ, SLUICE_LOG=os.environ.get("SLUICE_LOG", "warn"))
        process = subprocess.Popen([SLUICE, "run", "-c", str(path)], env=env)
        try:
            wait_http(f"http://127.0.0.1:{admin}/readyz")
            yield RunningSidecar(
                proxy=f"http://127.0.0.1:{proxy}",
                forward=f"http://127.0.0.1:{forward_port}" if forward else None,
                folder=Path(folder),
            )
        finally:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running_sidecar(policy_body: str):
    """The real sidecar on free ports with this policy; yields its proxy URL."""
    with started_sidecar(policy_body) as running:
        yield running.proxy


@pytest.fixture(scope="session")
def sidecar(mock_url):
    """The sidecar with provider keys of its own, so the SDK's key must never reach the mock."""
    policy = f"""
upstreams:
  openai: {{ provider: openai, base_url: "{mock_url}", keys: ["sk-upstream-openai"] }}
  anthropic: {{ provider: anthropic, base_url: "{mock_url}", keys: ["sk-upstream-anthropic"] }}
  bedrock: {bedrock_upstream(mock_url)}
  # A key of its own for the rate-limit test: a 429 rests the key it was sent with.
  limited: {{ provider: openai, base_url: "{mock_url}", keys: ["sk-upstream-limited"] }}
routes:
  - {{ name: limited, match: {{ path_prefix: /limited/openai }}, upstream: limited, auth: passthrough }}
  - {{ name: openai, match: {{ path_prefix: /openai }}, upstream: openai, auth: passthrough }}
  - {{ name: anthropic, match: {{ path_prefix: /anthropic }}, upstream: anthropic, auth: passthrough }}
  # The same upstreams behind Sluice keys (auth: required is the default with tenants).
  - {{ name: keyed-openai, match: {{ path_prefix: /keyed/openai }}, upstream: openai }}
  - {{ name: keyed-anthropic, match: {{ path_prefix: /keyed/anthropic }}, upstream: anthropic }}
  # Bedrock: boto3 signs with the Sluice key as its access key id; Sluice re-signs.
  - {{ name: bedrock, match: {{ path_prefix: /bedrock }}, upstream: bedrock }}
  # The response cache in front of both.
  - name: cached-openai
    match: {{ path_prefix: /cached/openai }}
    upstream: openai
    auth: passthrough
    filters: [{{ cache: {{ when: always }} }}]
  - name: cached-anthropic
    match: {{ path_prefix: /cached/anthropic }}
    upstream: anthropic
    auth: passthrough
    filters: [{{ cache: {{ when: always }} }}]
tiers:
  small: {{ models: ["gpt-4o-mini", "claude-haiku-*", "us.anthropic.claude-haiku-*"] }}
tenants:
  - name: sdk-team
    tier: small
    keys: [{{ hash: "{SLUICE_KEY_HASH}" }}]
"""
    with running_sidecar(policy) as url:
        yield url


def recorded_requests(mock_url: str):
    """Clears the mock's record, then returns a function that reads it."""
    urllib.request.urlopen(urllib.request.Request(f"{mock_url}/_mock/requests", method="DELETE"))

    def read():
        import json

        with urllib.request.urlopen(f"{mock_url}/_mock/requests") as response:
            return json.load(response)

    return read


@pytest.fixture
def mock_requests(mock_url):
    """Clears the mock's record, then returns a function that reads it."""
    return recorded_requests(mock_url)


def make_certificates(folder: Path, names: list[str]) -> None:
    """A test CA (ca.pem) and a certificate for `names` signed by it (leaf.pem, leaf.key), made
    with the openssl CLI as tests/common does for the Rust tests."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=Sluice SDK Test CA")
    openssl("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", f"/CN={names[0]}")
    (folder / "ext").write_text("subjectAltName=" + ",".join(f"DNS:{name}" for name in names) + "\n")
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "leaf.pem", "-days", "2", "-extfile", "ext")


@dataclass
class HttpsMock:
    """The mock provider serving HTTPS as the providers' real names (through Sluice's
    `resolve`), and plain HTTP for the tests' look at what it received."""
    url: str
    tls_port: int
    ca_file: Path


@pytest.fixture(scope="session")
def https_mock(tmp_path_factory):
    folder = tmp_path_factory.mktemp("https-mock")
    make_certificates(folder, ["api.openai.com", "api.anthropic.com"])
    port, tls_port = free_ports(2)
    process = subprocess.Popen(
        [MOCK, "--listen", f"127.0.0.1:{port}", "--tls-listen", f"127.0.0.1:{tls_port}",
         "--tls-cert", str(folder / "leaf.pem"), "--tls-key", str(folder / "leaf.key")],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/_mock/health")
        yield HttpsMock(url=url, tls_port=tls_port, ca_file=folder / "ca.pem")
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def https_mock_requests(https_mock):
    """As `mock_requests`, for the HTTPS mock."""
    return recorded_requests(https_mock.url)
