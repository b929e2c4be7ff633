"""Structured output and tools through the official OpenAI Python SDK (issue 21).

Run by tests/it/structured.rs with LUDUS_BASE_URL, LUDUS_KEY and LUDUS_MODEL set (a real
model: the server holds its tokenizer and checks every token against the grammar).

1. `chat.completions.parse` with ten Pydantic models, LUDUS_RUNS_PER_SCHEMA (default 20)
   generations each at temperature 1: every answer parses into its model.
2. A tools round trip (call -> tool result -> final answer), not streamed and streamed.
3. Bad requests get a 400 that names the field.
"""
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, List, Literal, Optional

import openai
from pydantic import BaseModel, Field

base, key, model = os.environ["LUDUS_BASE_URL"], os.environ["LUDUS_KEY"], os.environ["LUDUS_MODEL"]
runs = int(os.environ.get("LUDUS_RUNS_PER_SCHEMA", "20"))
client = openai.OpenAI(base_url=base, api_key=key, max_retries=2, timeout=600)


class Npc(BaseModel):
    line: str = Field(max_length=60)
    emotion: Literal["angry", "calm", "afraid", "happy"]
    action: Literal["draw_sword", "wave", "flee", "none"]


class Trade(BaseModel):
    item: str = Field(max_length=24)
    price: int = Field(ge=1, le=500)
    accept: bool


class Stats(BaseModel):
    strength: int = Field(ge=1, le=20)
    agility: int = Field(ge=1, le=20)
    wisdom: int = Field(ge=1, le=20)


class Position(BaseModel):
    x: int = Field(ge=-100, le=100)
    y: int = Field(ge=-100, le=100)


class Patrol(BaseModel):
    guard: str = Field(max_length=20)
    waypoints: List[Position] = Field(min_length=1, max_length=3)


class Inventory(BaseModel):
    items: List[Literal["sword", "shield", "potion", "bread", "rope"]] = Field(max_length=4)
    gold: int = Field(ge=0, le=999)


class Quest(BaseModel):
    title: str = Field(max_length=30)
    reward: int = Field(ge=10, le=1000)
    difficulty: Literal["easy", "medium", "hard"]
    giver: Optional[str] = Field(default=None, max_length=20)


class Mood(BaseModel):
    mood: Literal["friendly", "hostile", "neutral"]
    trust: float = Field(ge=0, le=1)


class Weather(BaseModel):
    sky: Literal["clear", "rain", "storm", "fog"]
    temperature: int = Field(ge=-30, le=45)
    windy: bool


class Dialogue(BaseModel):
    speaker: Literal["guard", "merchant", "witch"]
    lines: List[Annotated[str, Field(max_length=60)]] = Field(min_length=1, max_length=2)
    ends_conversation: bool


SCHEMAS = [Npc, Trade, Stats, Patrol, Inventory, Quest, Mood, Weather, Dialogue, Position]
ASK = "You are an NPC in a fantasy village. Reply in JSON. The player says: 'Hello there, what news?'"


def one(args):
    schema, i = args
    try:
        c = client.chat.completions.parse(
            model=model, messages=[{"role": "user", "content": ASK}], response_format=schema,
            temperature=1.0, seed=1000 + i, max_tokens=160)
    except openai.LengthFinishReasonError as e:
        raise AssertionError(f"{schema.__name__}: {e.completion.choices[0].message.content!r}")
    choice = c.choices[0]
    assert choice.finish_reason == "stop", (schema.__name__, choice)
    assert isinstance(choice.message.parsed, schema), (schema.__name__, choice.message)
    return schema.__name__


jobs = [(s, i) for s in SCHEMAS for i in range(runs)]
with ThreadPoolExecutor(max_workers=8) as pool:
    done = list(pool.map(one, jobs))
assert len(done) == len(SCHEMAS) * runs
print(f"{len(done)} structured answers under {len(SCHEMAS)} schemas all parsed")

# Tools: the game offers actions; the NPC must act (required), gets the result, answers.
tools = [
    {"type": "function", "function": {
        "name": "draw_sword", "description": "Draw a sword to fight.",
        "parameters": {"type": "object", "properties": {"hand": {"type": "string", "enum": ["left", "right"]}},
                       "required": ["hand"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "give_item", "description": "Give the player an item.",
        "parameters": {"type": "object", "properties": {"item": {"type": "string", "maxLength": 20},
                                                        "count": {"type": "integer", "minimum": 1, "maximum": 5}},
                       "required": ["item", "count"], "additionalProperties": False}}},
]
messages = [{"role": "user", "content": "A bandit attacks the village! What do you do?"}]


def check_call(name, arguments):
    assert name in ("draw_sword", "give_item"), name
    args = json.loads(arguments)
    if name == "draw_sword":
        assert args["hand"] in ("left", "right"), args
    else:
        assert 1 <= args["count"] <= 5 and len(args["item"]) <= 20, args
    return args


call = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="required",
                                      temperature=0.7, seed=5, max_tokens=80)
choice = call.choices[0]
assert choice.finish_reason == "tool_calls", choice
assert choice.message.content is None, choice.message
[tc] = choice.message.tool_calls
assert tc.type == "function" and tc.id.startswith("call_"), tc
check_call(tc.function.name, tc.function.arguments)

follow = messages + [
    {"role": "assistant", "content": None, "tool_calls": [tc.model_dump()]},
    {"role": "tool", "tool_call_id": tc.id, "content": "The bandit flees into the forest."},
]
final = client.chat.completions.create(model=model, messages=follow, tools=tools, tool_choice="none",
                                       temperature=0, max_tokens=40)
assert final.choices[0].message.tool_calls in (None, []), final
assert final.choices[0].message.content, final

# A named function, streamed: the id and name first, then the arguments in pieces.
named = {"type": "function", "function": {"name": "give_item"}}
chunks = list(client.chat.completions.create(
    model=model, messages=messages, tools=tools, tool_choice=named, temperature=0.7, seed=9,
    max_tokens=80, stream=True))
pieces, ids, names, finish = [], set(), set(), None
for c in chunks:
    if not c.choices:
        continue
    d = c.choices[0].delta
    for t in d.tool_calls or []:
        assert t.index == 0, t
        if t.id:
            ids.add(t.id)
        if t.function and t.function.name:
            names.add(t.function.name)
        if t.function and t.function.arguments:
            pieces.append(t.function.arguments)
    finish = c.choices[0].finish_reason or finish
assert finish == "tool_calls", chunks[-1]
assert names == {"give_item"} and len(ids) == 1, (names, ids)
assert len(pieces) >= 2, pieces
check_call("give_item", "".join(pieces))

# The streamed round trip's final answer, streamed too.
follow = messages + [
    {"role": "assistant", "tool_calls": [{"id": ids.pop(), "type": "function",
                                          "function": {"name": "give_item", "arguments": "".join(pieces)}}]},
    {"role": "tool", "tool_call_id": "x", "content": "The player thanks you."},
]
text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
    model=model, messages=follow, tools=tools, tool_choice="none", max_tokens=30, temperature=0, stream=True)
    if c.choices)
assert text, "an empty final answer"

# A tool made from a Pydantic model with a nested one: its parameters use $defs/$ref.
class Target(BaseModel):
    name: str = Field(max_length=20)


class Attack(BaseModel):
    target: Target
    power: int = Field(ge=1, le=10)


attack = client.chat.completions.create(
    model=model, messages=messages, tools=[openai.pydantic_function_tool(Attack)], tool_choice="required",
    temperature=0.7, seed=2, max_tokens=80)
[tc] = attack.choices[0].message.tool_calls
assert tc.function.name == "Attack", tc
parsed = Attack.model_validate_json(tc.function.arguments)
assert 1 <= parsed.power <= 10, parsed

# Bad input: a 400 that names the field.
for kwargs, param in [
    (dict(tools=tools, tool_choice={"type": "function", "function": {"name": "cast_spell"}}), "tool_choice"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}, "required": ["a"]}}}), "response_format"),
    (dict(response_format={"type": "yaml"}), "response_format"),
    (dict(tools=tools, response_format={"type": "json_object"}), "tool_choice"),
]:
    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=5, **kwargs)
        raise AssertionError(f"accepted: {kwargs}")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == param, (e.body, param)

# n choices, generated side by side: one per index, each seeded apart, each valid.
many = client.chat.completions.parse(
    model=model, messages=[{"role": "user", "content": ASK}], response_format=Weather, n=4,
    temperature=1.0, seed=42, max_tokens=80)
assert [c.index for c in many.choices] == [0, 1, 2, 3], many
assert all(isinstance(c.message.parsed, Weather) for c in many.choices), many
assert len({c.message.content for c in many.choices}) > 1, "four seeds gave one answer"
assert many.system_fingerprint and many.system_fingerprint.startswith("fp_"), many

# Log probabilities, whole and streamed: one entry per token, best first, at most 0.
lp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                    logprobs=True, top_logprobs=3, max_tokens=12, temperature=0)
content = lp.choices[0].logprobs.content
assert len(content) == lp.usage.completion_tokens, (len(content), lp.usage)
for entry in content:
    assert entry.logprob <= 0 and len(entry.top_logprobs) == 3, entry
    assert entry.top_logprobs[0].token == entry.token, entry  # greedy picks the best
    assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
streamed = [e for c in client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Say hello."}], logprobs=True, top_logprobs=3,
    max_tokens=12, temperature=0, stream=True) if c.choices and c.choices[0].logprobs
    for e in c.choices[0].logprobs.content]
assert [e.token for e in streamed] == [e.token for e in content], (streamed, content)
try:
    client.chat.completions.create(model=model, messages=messages, logprobs=True, top_logprobs=21, max_tokens=2)
    raise AssertionError("top_logprobs 21 accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "top_logprobs", e.body

print("all structured output checks passed")
