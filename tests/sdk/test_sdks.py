"""The official SDKs, pointed at the sidecar by base URL only, must not notice it."""

import anthropic
import openai
import pytest
from conftest import SLUICE_KEY, read_chat_stream


def test_openai_chat(sidecar, mock_requests):
    client = openai.OpenAI(base_url=f"{sidecar}/openai/v1", api_key="sk-caller-not-forwarded")
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello from the sdk"}]
    )
    assert completion.choices[0].message.content == "echo: hello from the sdk"
    assert completion.usage.total_tokens > 0
    (seen,) = mock_requests()
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == "Bearer sk-upstream-openai"
    assert "sk-caller-not-forwarded" not in str(seen)


def test_openai_streaming(sidecar, mock_requests):
    client = openai.OpenAI(base_url=f"{sidecar}/openai/v1", api_key="sk-caller")
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "stream to the sdk"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = read_chat_stream(stream)
    assert text == "echo: stream to the sdk"
    assert usage is not None and usage.completion_tokens > 0


def test_openai_embeddings_and_models(sidecar):
    client = openai.OpenAI(base_url=f"{sidecar}/openai/v1", api_key="sk-caller")
    embedding = client.embeddings.create(model="text-embedding-3-small", input="abc")
    assert len(embedding.data[0].embedding) == 8
    models = client.models.list()
    assert len(models.data) > 0


def test_openai_sdk_raises_on_sidecar_errors(sidecar):
    client = openai.OpenAI(base_url=f"{sidecar}/nowhere/v1", api_key="sk-caller", max_retries=0)
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert "no route" in str(raised.value)


def test_openai_sdk_sees_provider_errors(sidecar, mock_requests):
    client = openai.OpenAI(base_url=f"{sidecar}/limited/openai/v1", api_key="sk-caller", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-mock-status": "429", "x-mock-retry-after": "30"},
        )
    # The only key rests for the 30 s the provider asked: Sluice answers for it, in the same
    # shape, without bothering the provider.
    with pytest.raises(openai.RateLimitError) as resting:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert "rate limited" in str(resting.value)
    assert int(resting.value.response.headers["retry-after"]) > 20
    assert len(mock_requests()) == 1


# reset-mid-event: the connection drops inside an event, after half its JSON; Sluice's error
# event must still parse (no json.JSONDecodeError, no httpx.RemoteProtocolError instead).
@pytest.mark.parametrize("fault", ["reset-mid-stream", "reset-mid-event"])
def test_sdks_raise_when_a_stream_breaks(sidecar, fault):
    breaking = {"x-mock-fault": fault, "x-mock-chunks": "6", "x-mock-chunk-ms": "30"}
    client = openai.OpenAI(base_url=f"{sidecar}/openai/v1", api_key="sk-caller", max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "this stream breaks"}],
        stream=True,
        extra_headers=breaking,
    )
    text = ""
    with pytest.raises(openai.APIError) as raised:
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
    assert "broke mid-stream" in str(raised.value)
    assert text and text != "echo: this stream breaks", "a partial answer, then the error"

    claude = anthropic.Anthropic(base_url=f"{sidecar}/anthropic", api_key="sk-ant-caller", max_retries=0)
    with pytest.raises(anthropic.APIError) as raised:
        with claude.messages.stream(
            model="claude-haiku-4-5",
            max_tokens=64,
            messages=[{"role": "user", "content": "this stream breaks too"}],
            extra_headers=breaking,
        ) as stream:
            "".join(stream.text_stream)
    assert "broke mid-stream" in str(raised.value)


def test_anthropic_messages_and_stream(sidecar, mock_requests):
    client = anthropic.Anthropic(base_url=f"{sidecar}/anthropic", api_key="sk-ant-caller")
    message = client.messages.create(
        model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi claude"}]
    )
    assert message.content[0].text == "echo: hi claude"
    with client.messages.stream(
        model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "stream claude"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "echo: stream claude"
    assert final.usage.output_tokens > 0
    for seen in mock_requests():
        assert seen["headers"]["x-api-key"] == "sk-upstream-anthropic"


def test_sdks_with_a_sluice_key(sidecar, mock_requests):
    client = openai.OpenAI(base_url=f"{sidecar}/keyed/openai/v1", api_key=SLUICE_KEY, max_retries=0)
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "keyed"}]
    )
    assert completion.choices[0].message.content == "echo: keyed"
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert "model `gpt-4o` is not allowed" in str(denied.value)
    wrong = openai.OpenAI(base_url=f"{sidecar}/keyed/openai/v1", api_key="sk-sluice-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()

    claude = anthropic.Anthropic(base_url=f"{sidecar}/keyed/anthropic", api_key=SLUICE_KEY, max_retries=0)
    message = claude.messages.create(
        model="claude-haiku-4-5", max_tokens=16, messages=[{"role": "user", "content": "keyed claude"}]
    )
    assert message.content[0].text == "echo: keyed claude"
    with pytest.raises(anthropic.PermissionDeniedError):
        claude.messages.create(model="claude-opus-4", max_tokens=16, messages=[{"role": "user", "content": "x"}])
    for seen in mock_requests():
        assert SLUICE_KEY not in str(seen)


def test_cache_hits_look_like_provider_answers_to_the_sdks(sidecar, mock_requests):
    """A replayed answer — a stream included — reads the same to the SDKs as the original."""
    client = openai.OpenAI(base_url=f"{sidecar}/cached/openai/v1", api_key="sk-caller", max_retries=0)
    ask = dict(model="gpt-4o-mini", messages=[{"role": "user", "content": "cache this"}], temperature=0)
    outcomes, texts = [], []
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(**ask)
        outcomes.append(raw.headers["x-sluice-cache"])
        texts.append(raw.parse().choices[0].message.content)
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(**ask, stream=True)
        outcomes.append(raw.headers["x-sluice-cache"])
        texts.append("".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices))
    assert outcomes == ["miss", "hit", "miss", "hit"]
    assert texts == ["echo: cache this"] * 4

    claude = anthropic.Anthropic(base_url=f"{sidecar}/cached/anthropic", api_key="sk-ant-caller", max_retries=0)
    replies = []
    for _ in range(2):
        with claude.messages.stream(
            model="claude-haiku-4-5", max_tokens=32, messages=[{"role": "user", "content": "cache claude"}]
        ) as stream:
            replies.append(("".join(stream.text_stream), stream.get_final_message().usage.output_tokens))
    assert replies[0] == replies[1] and replies[0][0] == "echo: cache claude"
    assert len(mock_requests()) == 3, "each hit was answered without the provider"
