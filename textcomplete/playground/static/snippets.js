// "View code": the page's exact request body as curl, Python (openai SDK) and Node (openai SDK) programs.
// Each prints the text the page shows: as it streams for one choice, choice by choice for several.

function pyLiteral(value) {
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) return `[${value.map(pyLiteral).join(", ")}]`;
  if (typeof value === "object") {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${pyLiteral(v)}`).join(", ")}}`;
  }
  return JSON.stringify(value);   // a JSON string or number is a Python literal too
}

function shellQuote(text) {
  return `'${text.replace(/'/g, "'\\''")}'`;
}

function choiceCount(body) {
  return body.n ?? 1;
}

export function curl(body, baseURL, key) {
  const auth = key ? shellQuote(`Authorization: Bearer ${key}`) : '"Authorization: Bearer $OPENAI_API_KEY"';
  return [
    `curl ${body.stream ? "-N " : ""}${shellQuote(`${baseURL}/completions`)} \\`,
    '  -H "Content-Type: application/json" \\',
    `  -H ${auth} \\`,
    `  -d ${shellQuote(JSON.stringify(body, null, 2))}`,
  ].join("\n");
}

export function python(body, baseURL, key) {
  const apiKey = key ? JSON.stringify(key) : 'os.environ.get("OPENAI_API_KEY", "unused")';
  const args = Object.entries(body).map(([k, v]) => `    ${k}=${pyLiteral(v)},`);
  const lines = [
    ...(key ? [] : ["import os", ""]),
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(baseURL)}, api_key=${apiKey})`,
    `${body.stream ? "stream" : "completion"} = client.completions.create(`,
    ...args,
    ")",
  ];
  const many = choiceCount(body) > 1;
  if (body.stream && !many) {
    lines.push("for chunk in stream:", "    for choice in chunk.choices:",
      '        print(choice.text, end="", flush=True)', "print()");
  } else if (body.stream) {
    lines.push("texts = {}", "for chunk in stream:", "    for choice in chunk.choices:",
      '        texts[choice.index] = texts.get(choice.index, "") + choice.text',
      "for index, text in sorted(texts.items()):", '    print(f"--- choice {index}")', "    print(text)");
  } else if (!many) {
    lines.push("print(completion.choices[0].text)");
  } else {
    lines.push("for choice in completion.choices:", '    print(f"--- choice {choice.index}")',
      "    print(choice.text)");
  }
  return lines.join("\n") + "\n";
}

export function node(body, baseURL, key) {
  const apiKey = key ? JSON.stringify(key) : 'process.env.OPENAI_API_KEY ?? "unused"';
  const fields = Object.entries(body).map(([k, v]) => `  ${k}: ${JSON.stringify(v)},`);
  const lines = [
    'import OpenAI from "openai";',
    "",
    `const client = new OpenAI({ baseURL: ${JSON.stringify(baseURL)}, apiKey: ${apiKey} });`,
    `const ${body.stream ? "stream" : "completion"} = await client.completions.create({`,
    ...fields,
    "});",
  ];
  const many = choiceCount(body) > 1;
  if (body.stream && !many) {
    lines.push("for await (const chunk of stream) {",
      "  for (const choice of chunk.choices) process.stdout.write(choice.text);", "}",
      'process.stdout.write("\\n");');
  } else if (body.stream) {
    lines.push("const texts = new Map();", "for await (const chunk of stream) {",
      "  for (const choice of chunk.choices) {",
      '    texts.set(choice.index, (texts.get(choice.index) ?? "") + choice.text);', "  }", "}",
      "for (const index of [...texts.keys()].sort((a, b) => a - b)) {",
      "  console.log(`--- choice ${index}`);", "  console.log(texts.get(index));", "}");
  } else if (!many) {
    lines.push("console.log(completion.choices[0].text);");
  } else {
    lines.push("for (const choice of completion.choices) {", "  console.log(`--- choice ${choice.index}`);",
      "  console.log(choice.text);", "}");
  }
  return lines.join("\n") + "\n";
}

export const LANGUAGES = { curl, python, node };
