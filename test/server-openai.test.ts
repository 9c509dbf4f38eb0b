// The official `openai` client against the server with the real engine (reference
// runner) on a tiny generated qwen3_moe model, over loopback.

import OpenAI from 'openai';
import t from 'tap';
import { MODEL_ID, startTestServer, tinyModelDir } from './helpers/server-harness.js';

const dir = tinyModelDir(t);
const server = await startTestServer(t, dir);
const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 60_000 });
const messages = [
  { role: 'system' as const, content: 'You are terse.' },
  { role: 'user' as const, content: 'Name three colours.' },
];

t.test('models list', async (t) => {
  const list = await client.models.list();
  t.equal(list.data.length, 1);
  const m = list.data[0] as OpenAI.Models.Model & { max_model_len: number };
  t.equal(m.id, MODEL_ID);
  t.equal(m.object, 'model');
  t.equal(m.owned_by, 'moe-serve');
  t.equal(m.max_model_len, 512);
  t.equal((await client.models.retrieve(MODEL_ID)).id, MODEL_ID);
});

t.test('chat completion, not streamed', async (t) => {
  const r = await client.chat.completions.create({ model: MODEL_ID, messages, max_tokens: 12, temperature: 0 });
  t.match(r.id, /^chatcmpl-/);
  t.equal(r.object, 'chat.completion');
  t.equal(r.model, MODEL_ID);
  t.match(r.system_fingerprint, /^fp_/);
  t.ok(Math.abs(r.created - Date.now() / 1000) < 60);
  t.equal(r.choices.length, 1);
  const c = r.choices[0];
  t.equal(c.index, 0);
  t.equal(c.message.role, 'assistant');
  t.type(c.message.content, 'string');
  t.ok(c.finish_reason === 'length' || c.finish_reason === 'stop');
  const prompt = server.tokenizer.encode(server.tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true }), { addSpecialTokens: false });
  t.equal(r.usage!.prompt_tokens, prompt.length, 'exact prompt token count');
  t.ok(r.usage!.completion_tokens >= 1 && r.usage!.completion_tokens <= 12);
  if (c.finish_reason === 'length') t.equal(r.usage!.completion_tokens, 12);
  t.equal(r.usage!.total_tokens, r.usage!.prompt_tokens + r.usage!.completion_tokens);
  const again = await client.chat.completions.create({ model: MODEL_ID, messages, max_tokens: 12, temperature: 0 });
  t.equal(again.choices[0].message.content, c.message.content, 'greedy is deterministic');
});

t.test('chat completion, streamed, matches the non-streamed text', async (t) => {
  const whole = await client.chat.completions.create({ model: MODEL_ID, messages, max_tokens: 16, temperature: 0 });
  const stream = await client.chat.completions.create({
    model: MODEL_ID,
    messages,
    max_tokens: 16,
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = '';
  let role: string | undefined;
  let finish: string | null = null;
  let usage: OpenAI.CompletionUsage | null | undefined;
  const ids = new Set<string>();
  for await (const chunk of stream) {
    ids.add(chunk.id);
    t.equal(chunk.object, 'chat.completion.chunk');
    if (chunk.usage) usage = chunk.usage;
    for (const ch of chunk.choices) {
      role ??= ch.delta.role;
      text += ch.delta.content ?? '';
      if (ch.finish_reason) finish = ch.finish_reason;
    }
  }
  t.equal(ids.size, 1, 'one id for all chunks');
  t.equal(role, 'assistant');
  t.equal(text, whole.choices[0].message.content);
  t.equal(finish, whole.choices[0].finish_reason);
  t.same(usage, whole.usage, 'the usage chunk has the same counts');
});

t.test('completions: string, strings, token ids; streamed and not; echo', async (t) => {
  const r = await client.completions.create({ model: MODEL_ID, prompt: 'The experts of a mixture', max_tokens: 10, temperature: 0 });
  t.match(r.id, /^cmpl-/);
  t.equal(r.object, 'text_completion');
  t.equal(r.choices.length, 1);
  const ids = server.tokenizer.encode('The experts of a mixture');
  t.equal(r.usage!.prompt_tokens, ids.length);
  const byIds = await client.completions.create({ model: MODEL_ID, prompt: ids, max_tokens: 10, temperature: 0 });
  t.equal(byIds.choices[0].text, r.choices[0].text, 'token-id prompt = string prompt');

  const two = await client.completions.create({ model: MODEL_ID, prompt: ['The experts of a mixture', 'Hello'], max_tokens: 4, temperature: 0 });
  t.equal(two.choices.length, 2);
  t.same(two.choices.map((c) => c.index), [0, 1]);
  t.equal(two.usage!.prompt_tokens, ids.length + server.tokenizer.encode('Hello').length);

  const echo = await client.completions.create({ model: MODEL_ID, prompt: 'Hello', max_tokens: 4, temperature: 0, echo: true });
  t.ok(echo.choices[0].text.startsWith('Hello'));
  t.equal(echo.choices[0].text, 'Hello' + two.choices[1].text);

  const stream = await client.completions.create({ model: MODEL_ID, prompt: 'The experts of a mixture', max_tokens: 10, temperature: 0, stream: true });
  let text = '';
  for await (const chunk of stream) for (const c of chunk.choices) text += c.text;
  t.equal(text, r.choices[0].text);
});

t.test('n > 1: separate choices, derived seeds, reproducible', async (t) => {
  const req = { model: MODEL_ID, messages, max_tokens: 8, temperature: 1, n: 3, seed: 11 };
  const a = await client.chat.completions.create(req);
  t.equal(a.choices.length, 3);
  t.same(a.choices.map((c) => c.index), [0, 1, 2]);
  t.ok(new Set(a.choices.map((c) => c.message.content)).size > 1, 'different choices');
  const b = await client.chat.completions.create(req);
  t.same(b.choices.map((c) => c.message.content), a.choices.map((c) => c.message.content), 'same seed, same choices');
  t.ok(a.usage!.completion_tokens >= 3 && a.usage!.completion_tokens <= 24, 'completion tokens summed over choices');
  t.equal(a.usage!.prompt_tokens, b.usage!.prompt_tokens, 'the prompt counts once, not per choice');
  const single = await client.chat.completions.create({ ...req, n: 1 });
  t.equal(single.choices[0].message.content, a.choices[0].message.content, 'choice 0 uses the seed itself');

  const streamed = await client.completions.create({ model: MODEL_ID, prompt: 'abc', max_tokens: 6, n: 2, seed: 5, stream: true });
  const texts = ['', ''];
  for await (const chunk of streamed) for (const c of chunk.choices) texts[c.index] += c.text;
  const whole = await client.completions.create({ model: MODEL_ID, prompt: 'abc', max_tokens: 6, n: 2, seed: 5 });
  t.same(texts, whole.choices.map((c) => c.text), 'streamed choices interleave correctly');
});

t.test('seed reproducibility with sampling', async (t) => {
  const req = { model: MODEL_ID, prompt: 'Once upon a time', max_tokens: 16, temperature: 1.0, top_p: 0.95, top_k: 50, min_p: 0.01, seed: 1234 };
  const a = await client.completions.create(req);
  const b = await client.completions.create(req);
  t.equal(a.choices[0].text, b.choices[0].text);
  const texts = new Set<string>();
  for (const seed of [1, 2, 3, 4]) texts.add((await client.completions.create({ ...req, seed })).choices[0].text);
  t.ok(texts.size > 1, 'other seeds give other samples');
});

t.test('logprobs: chat shape and completions shape', async (t) => {
  const r = await client.chat.completions.create({ model: MODEL_ID, messages, max_tokens: 6, temperature: 0, logprobs: true, top_logprobs: 3 });
  const content = r.choices[0].logprobs!.content!;
  t.equal(content.length, r.usage!.completion_tokens);
  for (const e of content) {
    t.type(e.token, 'string');
    t.ok(e.logprob <= 0);
    t.ok(Array.isArray(e.bytes));
    t.equal(e.top_logprobs.length, 3);
    // Greedy: the sampled token is the most likely one.
    t.ok(Math.abs(e.top_logprobs[0].logprob - e.logprob) < 1e-9);
  }
  const bytes = content.flatMap((e) => e.bytes!);
  t.equal(Buffer.from(bytes).toString('utf8'), r.choices[0].message.content, 'token bytes spell the text');

  const c = await client.completions.create({ model: MODEL_ID, prompt: 'Hello there', max_tokens: 5, temperature: 0, logprobs: 2 });
  const lp = c.choices[0].logprobs!;
  t.equal(lp.tokens!.length, 5);
  t.equal(lp.token_logprobs!.length, 5);
  t.equal(lp.top_logprobs!.length, 5);
  t.equal(lp.text_offset!.length, 5);
  t.equal(lp.text_offset![0], 0);
  for (const top of lp.top_logprobs!) t.ok(Object.keys(top).length >= 1 && Object.keys(top).length <= 2);
  for (let i = 1; i < 5; i++) t.ok(lp.text_offset![i] >= lp.text_offset![i - 1]);
});

t.test('stop strings never reach the output, also across token boundaries', async (t) => {
  const base = await client.completions.create({ model: MODEL_ID, prompt: 'The experts of a mixture', max_tokens: 24, temperature: 0, logprobs: 0 });
  const tokens = base.choices[0].logprobs!.tokens!;
  const full = base.choices[0].text;
  // A stop string made of the end of one token and the start of the next.
  let stop = '';
  let at = -1;
  for (let i = 2; i + 1 < tokens.length; i++) {
    const a = tokens[i];
    const b = tokens[i + 1];
    if (a.length >= 2 && b.length >= 1 && !a.includes('\uFFFD') && !b.includes('\uFFFD')) {
      stop = a.slice(-2) + b.slice(0, 1);
      at = full.indexOf(stop);
      if (at >= 0) break;
    }
  }
  t.ok(at >= 0, `found a cross-token stop string in ${JSON.stringify(full)}`);
  const expected = full.slice(0, at);
  const r = await client.completions.create({ model: MODEL_ID, prompt: 'The experts of a mixture', max_tokens: 24, temperature: 0, stop: [stop, 'never-appears'] });
  t.equal(r.choices[0].text, expected);
  t.equal(r.choices[0].finish_reason, 'stop');
  t.ok(r.usage!.completion_tokens < 24);

  const stream = await client.completions.create({ model: MODEL_ID, prompt: 'The experts of a mixture', max_tokens: 24, temperature: 0, stop, stream: true });
  let text = '';
  let finish = '';
  for await (const chunk of stream) {
    for (const c of chunk.choices) {
      t.notOk(c.text.includes(stop), 'no chunk carries the stop string');
      text += c.text;
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  t.equal(text, expected, 'streamed text stops before the stop string');
  t.equal(finish, 'stop');

  const chat = await client.chat.completions.create({ model: MODEL_ID, messages, max_tokens: 16, temperature: 0 });
  const ct = chat.choices[0].message.content!;
  if (ct.length > 4) {
    const s = ct.slice(2, 4);
    const cut = await client.chat.completions.create({ model: MODEL_ID, messages, max_tokens: 16, temperature: 0, stop: s });
    t.equal(cut.choices[0].message.content, ct.slice(0, ct.indexOf(s)));
    t.equal(cut.choices[0].finish_reason, 'stop');
  }
});

t.test('penalties and user are accepted', async (t) => {
  const r = await client.chat.completions.create({
    model: MODEL_ID,
    messages,
    max_completion_tokens: 8,
    frequency_penalty: 1.5,
    presence_penalty: 0.5,
    temperature: 0,
    user: 'someone',
    // vLLM extension
    ...({ repetition_penalty: 1.3 } as object),
  });
  t.equal(r.usage!.completion_tokens <= 8, true);
});

t.test('logit_bias: +100 forces a token, -100 bans one, logprobs stay raw; response_format text; bad values are 400s', async (t) => {
  const prompt = 'The experts of a mixture';
  // A plain word piece of the vocabulary (not special, not an end-of-sequence token).
  let forced = -1;
  for (let id = 300; id < 400; id++) {
    const text = server.tokenizer.decode([id]);
    if (/^[a-z]{3,}$/.test(text)) {
      forced = id;
      break;
    }
  }
  t.ok(forced >= 0, `token ${forced} (${JSON.stringify(server.tokenizer.decode([forced]))}) to force`);
  for (const sampling of [{ temperature: 0 }, { temperature: 1, seed: 7 }]) {
    const r = await client.completions.create({ model: MODEL_ID, prompt, max_tokens: 4, ...sampling, logit_bias: { [forced]: 100 } });
    t.equal(r.choices[0].text, server.tokenizer.decode([forced, forced, forced, forced]), `+100 forces the token (${JSON.stringify(sampling)})`);
  }
  const streamed = await client.chat.completions.create({ model: MODEL_ID, messages, max_tokens: 3, temperature: 0, logit_bias: { [forced]: 100 }, stream: true });
  let text = '';
  for await (const chunk of streamed) text += chunk.choices[0]?.delta?.content ?? '';
  t.equal(text, server.tokenizer.decode([forced, forced, forced]), 'streamed chat too');

  // -100 on the greedy first token: the runner-up comes first; the reported logprobs are
  // the raw logits' (the banned token still tops them).
  const base = await client.completions.create({ model: MODEL_ID, prompt, max_tokens: 1, temperature: 0, logprobs: 2 });
  const top = Object.entries(base.choices[0].logprobs!.top_logprobs![0]).sort((a, b) => b[1] - a[1]);
  const first = top[0][0];
  const ids = server.tokenizer.encode(first, { addSpecialTokens: false });
  t.equal(ids.length, 1, `the greedy token ${JSON.stringify(first)} is one token`);
  const banned = await client.completions.create({ model: MODEL_ID, prompt, max_tokens: 1, temperature: 0, logprobs: 2, logit_bias: { [ids[0]]: -100 } });
  t.equal(banned.choices[0].text, top[1][0], 'the runner-up is chosen');
  t.same(Object.keys(banned.choices[0].logprobs!.top_logprobs![0]).sort(), top.map((x) => x[0]).sort(), 'raw logprobs: the same top two');
  t.equal((await client.completions.create({ model: MODEL_ID, prompt, max_tokens: 1, temperature: 0, logit_bias: {} })).choices[0].text, first, 'an empty map changes nothing');

  const text200 = await client.chat.completions.create({ model: MODEL_ID, messages, max_tokens: 2, temperature: 0, response_format: { type: 'text' } });
  t.equal(text200.choices.length, 1, 'response_format text is accepted');
  const bad = async (body: Record<string, unknown>, param: RegExp, message: RegExp) => {
    const e = await client.chat.completions.create({ model: MODEL_ID, messages, max_tokens: 2, ...body } as never).then(
      () => null,
      (err: unknown) => err as InstanceType<typeof OpenAI.APIError>,
    );
    t.equal(e?.status, 400, `${JSON.stringify(body)}: 400`);
    t.match(e?.param, param);
    t.match((e?.error as { message?: string } | undefined)?.message, message);
  };
  await bad({ logit_bias: { '999999': 1 } }, /^logit_bias$/, /Token id 999999 in 'logit_bias' is out of range/);
  await bad({ logit_bias: { abc: 1 } }, /^logit_bias$/, /keys are token ids/);
  await bad({ logit_bias: { '-3': 1 } }, /^logit_bias$/, /keys are token ids/);
  await bad({ logit_bias: { [forced]: 101 } }, /^logit_bias/, /must be <= 100/);
  await bad({ logit_bias: { [forced]: 'x' } }, /^logit_bias/, /expected number/);
  await bad({ response_format: { type: 'json_object' } }, /^response_format$/, /not supported/);
});
