// Smoke test with the official Node SDK: a completion, a stream, the model list and a typed error.
// Usage: node smoke.mjs BASE_URL MODEL   (prints one JSON line with what it saw)
import OpenAI from "openai";

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "sk-node", maxRetries: 0 });

const completion = await client.completions.create({ model, prompt: "Once upon a time", max_tokens: 8, temperature: 0 });
let streamed = "";
let usage = null;
const stream = await client.completions.create({
  model, prompt: "Once upon a time", max_tokens: 8, temperature: 0, stream: true,
  stream_options: { include_usage: true },
});
for await (const chunk of stream) {
  for (const choice of chunk.choices) streamed += choice.text;
  if (chunk.usage) usage = chunk.usage;
}
const models = [];
for await (const m of client.models.list()) models.push(m.id);
let error = null;
try {
  await client.completions.create({ model, prompt: "x", temperature: 5 });
} catch (e) {
  error = { name: e.constructor.name, status: e.status, param: e.param, requestID: e.requestID ?? null };
}
console.log(JSON.stringify({ text: completion.choices[0].text, requestID: completion._request_id ?? null,
  streamed, usage, models, error }));
