"""Drives a running Ludus server with the official OpenAI Python SDK.

Run by tests/it/network_api.rs with LUDUS_BASE_URL, LUDUS_KEY and LUDUS_MODEL set.
Exits non-zero (with the failing assertion) on any mismatch.
"""
import os

import openai

base, key, model = os.environ["LUDUS_BASE_URL"], os.environ["LUDUS_KEY"], os.environ["LUDUS_MODEL"]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
messages = [{"role": "user", "content": "Tell the traveller about the forest."}]

# Non-streaming chat.
full = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, seed=3)
text = full.choices[0].message.content
assert full.object == "chat.completion", full
finish = full.choices[0].finish_reason
n = full.usage.completion_tokens
assert (finish == "length" and n == 12) or (finish == "stop" and 0 < n <= 12), (finish, full.usage)
assert full.usage.prompt_tokens > 0, full.usage
assert isinstance(text, str) and text, full

# Streaming chat: the same greedy text, chunk by chunk, with a usage chunk at the end.
chunks = list(client.chat.completions.create(
    model=model, messages=messages, max_tokens=12, temperature=0, seed=3,
    stream=True, stream_options={"include_usage": True}))
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert streamed == text, (streamed, text)
assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == n, chunks[-1]
assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish

# Seeded sampling is reproducible.
a = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0.9, seed=77)
b = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0.9, seed=77)
assert a.choices[0].message.content == b.choices[0].message.content

# Legacy completions.
comp = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0)
assert comp.object == "text_completion" and 0 < comp.usage.completion_tokens <= 5, comp

# Models list.
assert model in [m.id for m in client.models.list().data]

# Errors surface as the SDK's exception types.
try:
    openai.OpenAI(base_url=base, api_key="ludus-wrong", max_retries=0).chat.completions.create(model=model, messages=messages)
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError:
    pass
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError:
    pass
try:
    client.chat.completions.create(model=model, messages=messages, temperature=7)
    raise AssertionError("temperature 7 was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "temperature", e.body

print("all openai SDK checks passed")
