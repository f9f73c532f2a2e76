"""boto3's bedrock-runtime client, pointed at the sidecar by `endpoint_url` with the Sluice key as
its access key id, must not notice the sidecar: the mock verifies the signature Sluice makes with
its own AWS credentials."""

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, EventStreamError
from conftest import (
    MOCK_AWS_ACCESS_KEY_ID,
    SLUICE_KEY,
    SLUICE_KEY_HASH,
    bedrock_upstream,
    running_sidecar,
)

# An inference profile id: boto3 percent-encodes its `:` in the path.
MODEL = "us.anthropic.claude-haiku-4-5-20251001-v1:0"


def bedrock(endpoint_url, access_key_id=SLUICE_KEY, headers=None):
    client = boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key_id,
        aws_secret_access_key="any-secret-at-all",
        config=Config(retries={"total_max_attempts": 1}),
    )
    if headers:

        def add_headers(request, **_):
            for name, value in headers.items():
                request.headers[name] = value

        client.meta.events.register("before-sign.bedrock-runtime.*", add_headers)
    return client


def read_until_error(response):
    """The events of a ConverseStream read until boto3 raises the stream's error."""
    received = []
    with pytest.raises(EventStreamError) as raised:
        for event in response["stream"]:
            received.append(event)
    return received, raised


def messages(text):
    return [{"role": "user", "content": [{"text": text}]}]


def test_converse(sidecar, mock_requests):
    client = bedrock(f"{sidecar}/bedrock")
    answer = client.converse(
        modelId=MODEL, messages=messages("hello bedrock"), inferenceConfig={"maxTokens": 64}
    )
    assert answer["output"]["message"]["content"][0]["text"] == "echo: hello bedrock"
    assert answer["stopReason"] == "end_turn"
    assert answer["usage"]["outputTokens"] == 5
    (seen,) = mock_requests()
    assert seen["path"] == "/model/us.anthropic.claude-haiku-4-5-20251001-v1%3A0/converse"
    assert seen["headers"]["authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={MOCK_AWS_ACCESS_KEY_ID}/"
    )
    assert SLUICE_KEY not in str(seen)


def test_converse_stream(sidecar):
    client = bedrock(f"{sidecar}/bedrock")
    response = client.converse_stream(modelId=MODEL, messages=messages("stream from bedrock"))
    text, usage, stop = "", None, None
    for event in response["stream"]:
        if "contentBlockDelta" in event:
            text += event["contentBlockDelta"]["delta"]["text"]
        if "messageStop" in event:
            stop = event["messageStop"]["stopReason"]
        if "metadata" in event:
            usage = event["metadata"]["usage"]
    assert text == "echo: stream from bedrock"
    assert stop == "end_turn"
    assert usage["outputTokens"] == 5 and usage["inputTokens"] > 0


def test_sluice_and_provider_errors_raise_as_bedrock_errors(sidecar):
    unknown = bedrock(f"{sidecar}/bedrock", access_key_id="sk-sluice-unknown")
    with pytest.raises(ClientError) as raised:
        unknown.converse(modelId=MODEL, messages=messages("x"))
    error = raised.value.response
    assert error["Error"]["Code"] == "UnrecognizedClientException"
    assert error["Error"]["Message"] == "invalid Sluice key"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 401

    client = bedrock(f"{sidecar}/bedrock")
    with pytest.raises(client.exceptions.AccessDeniedException) as denied:
        client.converse(modelId="amazon.nova-pro-v1:0", messages=messages("x"))
    assert "not allowed for tier `small`" in str(denied.value)

    throttled = bedrock(f"{sidecar}/bedrock", headers={"x-mock-status": "429"})
    with pytest.raises(throttled.exceptions.ThrottlingException):
        throttled.converse(modelId=MODEL, messages=messages("x"))


def test_a_cut_stream_raises_in_boto3(mock_url):
    policy = f"""
upstreams:
  bedrock: {bedrock_upstream(mock_url)}
routes:
  - {{ name: bedrock, match: {{ path_prefix: /bedrock }}, upstream: bedrock }}
tiers:
  tight: {{ limits: {{ tokens_per_day: 40, reserve_output_tokens: 10, cut_streams_over_tokens: true }} }}
tenants:
  - {{ name: sdk-team, tier: tight, keys: [{{ hash: "{SLUICE_KEY_HASH}" }}] }}
"""
    with running_sidecar(policy) as url:
        client = bedrock(f"{url}/bedrock", headers={"x-mock-chunks": "60"})
        response = client.converse_stream(modelId=MODEL, messages=messages("x"))
        received, raised = read_until_error(response)
        assert raised.value.response["Error"]["Code"] == "throttlingException"
        assert "token limit reached mid-stream" in raised.value.response["Error"]["Message"]
        assert 0 < len(received) < 60


# The connection drops, or the stream ends cleanly, inside an event-stream frame: Sluice drops
# the half frame, so boto3 reads Sluice's exception frame instead of failing a CRC on a frame
# run into it.
@pytest.mark.parametrize("fault", ["reset-mid-stream", "reset-mid-event", "end-mid-event"])
def test_a_broken_upstream_stream_raises_a_bedrock_error_in_boto3(sidecar, fault):
    client = bedrock(
        f"{sidecar}/bedrock", headers={"x-mock-chunks": "8", "x-mock-fault": fault}
    )
    response = client.converse_stream(modelId=MODEL, messages=messages("break it"))
    received, raised = read_until_error(response)
    assert raised.value.response["Error"]["Code"] == "serviceUnavailableException"
    assert "incomplete" in raised.value.response["Error"]["Message"]
    assert 0 < len(received)
