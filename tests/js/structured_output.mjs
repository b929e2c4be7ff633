// Structured output and tools through the official openai npm SDK (issue 21). Run by
// tests/it/structured.rs (copied beside .ludus/js-tools/node_modules) with LUDUS_BASE_URL,
// LUDUS_KEY and LUDUS_MODEL set; throws on any mismatch.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.LUDUS_BASE_URL, apiKey: process.env.LUDUS_KEY, maxRetries: 2 });
const model = process.env.LUDUS_MODEL;
const check = (ok, what) => { if (!ok) throw new Error(what); };

// JSON schema replies at temperature 1: every one parses and keeps to its bounds.
const schema = {
  type: "object", additionalProperties: false, required: ["line", "mood", "gold"],
  properties: {
    line: { type: "string", maxLength: 50 },
    mood: { enum: ["friendly", "hostile", "neutral"] },
    gold: { type: "integer", minimum: 0, maximum: 99 },
  },
};
const replies = await Promise.all([...Array(8).keys()].map((i) => client.chat.completions.create({
  model, temperature: 1, seed: 100 + i, max_tokens: 80,
  messages: [{ role: "user", content: "Merchant, how is business? Answer in JSON." }],
  response_format: { type: "json_schema", json_schema: { name: "merchant", strict: true, schema } },
})));
for (const r of replies) {
  check(r.choices[0].finish_reason === "stop", `finish ${r.choices[0].finish_reason}`);
  const v = JSON.parse(r.choices[0].message.content);
  check(Object.keys(v).length === 3 && v.line.length <= 50, JSON.stringify(v));
  check(["friendly", "hostile", "neutral"].includes(v.mood) && v.gold >= 0 && v.gold <= 99, JSON.stringify(v));
}

// A tools round trip, not streamed: call, result, final answer.
const tools = [{ type: "function", function: {
  name: "open_door", description: "Open a door of the castle.",
  parameters: { type: "object", required: ["door"], additionalProperties: false,
                properties: { door: { enum: ["north", "south"] } } } } }];
const messages = [{ role: "user", content: "Please let me into the castle." }];
const first = await client.chat.completions.create({ model, messages, tools, tool_choice: "required", max_tokens: 40, seed: 1 });
const call = first.choices[0].message.tool_calls[0];
check(first.choices[0].finish_reason === "tool_calls" && call.function.name === "open_door", JSON.stringify(first));
check(["north", "south"].includes(JSON.parse(call.function.arguments).door), call.function.arguments);
const final = await client.chat.completions.create({
  model, tools, tool_choice: "none", max_tokens: 20, seed: 1,
  messages: [...messages, first.choices[0].message, { role: "tool", tool_call_id: call.id, content: "The door is open." }],
});
check(final.choices[0].message.content, "empty final answer");

// The same call streamed: id and name once, arguments in pieces.
const stream = await client.chat.completions.create({ model, messages, tools, tool_choice: "required", max_tokens: 40, seed: 1, stream: true });
let id = "", name = "", args = "", finish = null;
for await (const chunk of stream) {
  for (const c of chunk.choices[0]?.delta?.tool_calls ?? []) {
    id += c.id ?? "";
    name += c.function?.name ?? "";
    args += c.function?.arguments ?? "";
  }
  finish = chunk.choices[0]?.finish_reason ?? finish;
}
check(id.startsWith("call_") && name === "open_door", `${id} ${name}`);
// Same seed, same sampler: the streamed call is the call made above.
check(JSON.stringify(JSON.parse(args)) === JSON.stringify(JSON.parse(call.function.arguments)), args);
check(finish === "tool_calls", `finish ${finish}`);

// A tool_choice naming an unknown function is a 400 that names the field.
try {
  await client.chat.completions.create({ model, messages, tools, tool_choice: { type: "function", function: { name: "fly" } } });
  throw new Error("accepted an unknown function");
} catch (e) {
  check(e instanceof OpenAI.BadRequestError && e.param === "tool_choice", String(e));
}
console.log("all structured output checks passed (javascript)");
