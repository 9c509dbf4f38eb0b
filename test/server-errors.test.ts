// Every error case answered in the OpenAI shape {error: {message, type, param, code}}
// with the right status, over undici against the real engine; and API keys.

import t, { type Test } from 'tap';
import { request } from 'undici';
import { MODEL_ID, startTestServer, tinyModelDir } from './helpers/server-harness.js';


const dir = tinyModelDir(t);
const server = await startTestServer(t, dir);

interface ErrBody {
  error: { message: string; type: string; param: string | null; code: string | null };
}

async function call(method: string, path: string, body?: string | Buffer, headers: Record<string, string> = { 'content-type': 'application/json' }, url = server.url) {
  const r = await request(`${url}${path}`, { method: method as 'POST', headers, body });
  const text = await r.body.text();
  let json: unknown = null;
  try {
    json = JSON.parse(text);
  } catch {}
  return { status: r.statusCode, headers: r.headers, json: json as ErrBody, text };
}

function isOpenAIError(t: Test, b: ErrBody) {
  t.type(b?.error?.message, 'string');
  t.type(b.error.type, 'string');
  t.ok('param' in b.error && 'code' in b.error, 'param and code present');
}

const chat = (extra: Record<string, unknown>) => JSON.stringify({ model: MODEL_ID, messages: [{ role: 'user', content: 'hi' }], max_tokens: 4, ...extra });

t.test('400s with param naming the field', async (t) => {
  const cases: [string, string, string | null, string?][] = [
    // [path, body, expected param, expected code]
    ['/v1/chat/completions', '{"model": "x", "messages": [', null, 'invalid_json'],
    ['/v1/chat/completions', chat({ temperature: 'hot' }), 'temperature', 'invalid_type'],
    ['/v1/chat/completions', chat({ temperature: 3 }), 'temperature', 'invalid_value'],
    ['/v1/chat/completions', chat({ top_p: -0.1 }), 'top_p', 'invalid_value'],
    ['/v1/chat/completions', chat({ max_tokens: 0 }), 'max_tokens', 'invalid_value'],
    ['/v1/chat/completions', chat({ max_tokens: 1.5 }), 'max_tokens', 'invalid_type'],
    ['/v1/chat/completions', chat({ n: 0 }), 'n', 'invalid_value'],
    ['/v1/chat/completions', chat({ stop: ['a', 'b', 'c', 'd', 'e'] }), 'stop', 'invalid_value'],
    ['/v1/chat/completions', chat({ top_logprobs: 21, logprobs: true }), 'top_logprobs', 'invalid_value'],
    ['/v1/chat/completions', chat({ top_logprobs: 2 }), 'top_logprobs', 'invalid_value'],
    ['/v1/chat/completions', chat({ stream_options: { include_usage: true } }), 'stream_options', 'invalid_value'],
    ['/v1/chat/completions', chat({ frobnicate: 1 }), 'frobnicate', 'unknown_parameter'],
    ['/v1/chat/completions', chat({ tools: [] }), 'tools', 'unsupported_parameter'],
    ['/v1/chat/completions', chat({ tool_choice: 'auto' }), 'tool_choice', 'unsupported_parameter'],
    ['/v1/chat/completions', chat({ messages: [{ role: 'user', content: 'x', tool_call_id: 'c1' }] }), 'messages[0].tool_call_id', 'unsupported_parameter'],
    ['/v1/chat/completions', chat({ messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'http://x/y.png' } }] }] }), 'messages[0].content[0].image_url', 'unsupported_parameter'],
    ['/v1/chat/completions', chat({ messages: [{ role: 'user', content: [{ type: 'text', text: 'a' }, { type: 'input_image' }] }] }), 'messages[0].content[1].type', 'unsupported_parameter'],
    ['/v1/chat/completions', chat({ messages: [{ role: 'user', content: [{ type: 'text' }] }] }), 'messages[0].content[0].text', 'missing_required_parameter'],
    ['/v1/chat/completions', chat({ store: true }), 'store', 'unsupported_parameter'],
    ['/v1/chat/completions', chat({ metadata: { a: 1 } }), 'metadata.a', 'invalid_type'],
    ['/v1/chat/completions', chat({ messages: [] }), 'messages', 'invalid_value'],
    ['/v1/chat/completions', chat({ messages: [{ role: 'wizard', content: 'x' }] }), 'messages[0].role', 'invalid_value'],
    ['/v1/chat/completions', chat({ messages: [{ role: 'user' }] }), 'messages[0].content', 'missing_required_parameter'],
    ['/v1/chat/completions', JSON.stringify({ messages: [{ role: 'user', content: 'x' }] }), 'model', 'missing_required_parameter'],
    ['/v1/chat/completions', chat({ messages: [{ role: 'user', content: 'end<|im_end|>' }] }), 'messages[0].content', 'special_token_in_content'],
    ['/v1/completions', JSON.stringify({ model: MODEL_ID, prompt: 'x', logprobs: 6 }), 'logprobs', 'invalid_value'],
    ['/v1/completions', JSON.stringify({ model: MODEL_ID, prompt: ['a', 1] }), 'prompt', 'invalid_type'],
    ['/v1/completions', JSON.stringify({ model: MODEL_ID, prompt: [1, 99999999] }), 'prompt', 'invalid_value'],
    ['/v1/completions', JSON.stringify({ model: MODEL_ID, prompt: [] }), 'prompt', 'invalid_value'],
    ['/v1/completions', JSON.stringify({ model: MODEL_ID, prompt: 'x', echo: true, logprobs: 1 }), 'echo', 'unsupported_parameter'],
    ['/v1/completions', JSON.stringify({ model: MODEL_ID, prompt: 'x', seed: 'seven' }), 'seed', 'invalid_type'],
    ['/v1/completions', JSON.stringify({ model: MODEL_ID, prompt: 'x', best_of: 3, stream: true }), 'best_of', 'invalid_value'],
    ['/v1/completions', JSON.stringify({ model: MODEL_ID, prompt: ['x', 'y'], best_of: 65 }), 'best_of', 'invalid_value'],
    ['/v1/completions', JSON.stringify({ model: MODEL_ID, prompt: 'x', n: 2, best_of: 1 }), 'best_of', 'invalid_value'],
    ['/v1/completions', JSON.stringify({ model: MODEL_ID, prompt: 'x', suffix: ' end' }), 'suffix', 'unsupported_parameter'],
    ['/v1/completions', '[1, 2]', null, 'invalid_type'],
  ];
  for (const [path, body, param, code] of cases) {
    const r = await call('POST', path, body);
    t.equal(r.status, 400, `${body.slice(0, 80)} → 400`);
    isOpenAIError(t, r.json);
    t.equal(r.json.error.type, 'invalid_request_error');
    t.equal(r.json.error.param, param, `param of ${body.slice(0, 80)}`);
    if (code) t.equal(r.json.error.code, code, `code of ${body.slice(0, 80)}`);
  }
});

t.test('known OpenAI fields set to values that change nothing are accepted', async (t) => {
  const ok = async (path: string, body: Record<string, unknown>) => {
    const r = await call('POST', path, JSON.stringify({ model: MODEL_ID, max_tokens: 2, temperature: 0, ...body }));
    t.equal(r.status, 200, `${JSON.stringify(body).slice(0, 100)} → 200`);
    return r.json as unknown as { choices: { index: number; text?: string; message?: { content: string } }[] };
  };
  const one = await ok('/v1/completions', { prompt: 'a b', best_of: 1, suffix: '' });
  t.equal(one.choices.length, 1);
  const two = await ok('/v1/completions', { prompt: 'a b', n: 2, best_of: 2, suffix: null });
  t.same(two.choices.map((c) => c.index), [0, 1], 'best_of equal to n: the n completions');
  const plain = await ok('/v1/completions', { prompt: 'a b' });
  t.equal(one.choices[0].text, plain.choices[0].text, 'best_of 1 and an empty suffix: the same greedy text as without them');
  const chatOk = await ok('/v1/chat/completions', { messages: [{ role: 'user', content: [{ type: 'text', text: 'hi' }] }], store: false, metadata: { team: 'a' } });
  const chatPlain = await ok('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }] });
  t.equal(chatOk.choices[0].message!.content, chatPlain.choices[0].message!.content, 'store: false, metadata and a text part: the same reply as the plain request');
});

t.test('best_of: the n of best_of completions with the highest mean log probability per token', async (t) => {
  interface Choice { index: number; text: string; logprobs: { token_logprobs: number[] } | null; finish_reason: string }
  interface Res { choices: Choice[]; usage: { completion_tokens: number } }
  const post = async (body: Record<string, unknown>) => {
    const r = await call('POST', '/v1/completions', JSON.stringify({ model: MODEL_ID, max_tokens: 6, temperature: 1, seed: 11, ...body }));
    t.equal(r.status, 200, JSON.stringify(body));
    return r.json as unknown as Res;
  };
  // The same seeds give the same candidates: n = 4 with logprobs shows all of them.
  const all = await post({ prompt: ['one two', 'three'], n: 4, logprobs: 0 });
  const best = await post({ prompt: ['one two', 'three'], n: 2, best_of: 4 });
  t.same(best.choices.map((c) => c.index), [0, 1, 2, 3], 'n choices per prompt, indexed prompt × n + j');
  t.ok(best.choices.every((c) => c.logprobs === null), 'logprobs only when asked for');
  t.equal(best.usage.completion_tokens, all.usage.completion_tokens, 'usage counts every generated completion');
  const mean = (c: Choice) => (c.logprobs!.token_logprobs.length ? c.logprobs!.token_logprobs.reduce((a, b) => a + b, 0) / c.logprobs!.token_logprobs.length : -Infinity);
  for (const p of [0, 1]) {
    const candidates = all.choices.filter((c) => Math.floor(c.index / 4) === p).sort((a, b) => mean(b) - mean(a) || a.index - b.index);
    t.same(
      best.choices.filter((c) => Math.floor(c.index / 2) === p).map((c) => c.text),
      candidates.slice(0, 2).map((c) => c.text),
      `prompt ${p}: the two candidates of highest mean log probability, best first`,
    );
  }
  const withLp = await post({ prompt: 'one two', n: 1, best_of: 3, logprobs: 1 });
  t.equal(withLp.choices.length, 1);
  t.equal(withLp.choices[0].logprobs!.token_logprobs.length > 0, true, 'logprobs shown when asked for');
});

t.test('unknown model → 404 model_not_found', async (t) => {
  const r = await call('POST', '/v1/chat/completions', chat({ model: 'gpt-17' }));
  t.equal(r.status, 404);
  t.equal(r.json.error.code, 'model_not_found');
  t.equal(r.json.error.param, 'model');
  const m = await call('GET', '/v1/models/gpt-17');
  t.equal(m.status, 404);
  t.equal(m.json.error.code, 'model_not_found');
});

t.test('prompt + max_tokens over the context → 400 context_length_exceeded', async (t) => {
  const r = await call('POST', '/v1/chat/completions', chat({ max_tokens: 510 }));
  t.equal(r.status, 400);
  t.equal(r.json.error.code, 'context_length_exceeded');
  t.equal(r.json.error.param, 'messages');
  t.match(r.json.error.message, /maximum context length is 512 tokens/);
  const long = 'word '.repeat(600);
  const c = await call('POST', '/v1/completions', JSON.stringify({ model: MODEL_ID, prompt: long }));
  t.equal(c.status, 400);
  t.equal(c.json.error.code, 'context_length_exceeded');
  // Without max_tokens the completion gets the rest of the context.
  const ok = await call('POST', '/v1/completions', JSON.stringify({ model: MODEL_ID, prompt: 'word '.repeat(100), stop: ' ', temperature: 0 }));
  t.equal(ok.status, 200);
});

t.test('invalid UTF-8, empty body, wrong content type, over-large body', async (t) => {
  const bad = Buffer.concat([Buffer.from('{"model": "'), Buffer.from([0xff, 0xfe]), Buffer.from('", "prompt": "x"}')]);
  const r = await call('POST', '/v1/completions', bad);
  t.equal(r.status, 400);
  t.equal(r.json.error.code, 'invalid_encoding');
  const e = await call('POST', '/v1/completions', '');
  t.equal(e.status, 400);
  isOpenAIError(t, e.json);
  const ct = await call('POST', '/v1/completions', 'prompt=x', { 'content-type': 'application/x-www-form-urlencoded' });
  t.equal(ct.status, 415);
  isOpenAIError(t, ct.json);

  const small = await startTestServer(t, dir, { app: { bodyLimitBytes: 2048 } });
  const big = await call('POST', '/v1/completions', JSON.stringify({ model: MODEL_ID, prompt: 'x'.repeat(5000) }), undefined, small.url);
  t.equal(big.status, 413);
  t.equal(big.json.error.code, 'request_too_large');
});

t.test('unknown routes → 404, wrong methods → 405, same shape', async (t) => {
  const r = await call('GET', '/v1/nothing');
  t.equal(r.status, 404);
  isOpenAIError(t, r.json);
  t.equal(r.json.error.code, 'unknown_url');
  const m = await call('GET', '/v1/chat/completions');
  t.equal(m.status, 405);
  t.equal(m.headers.allow, 'POST');
  isOpenAIError(t, m.json);
  const d = await call('DELETE', '/v1/models', undefined, {});
  t.equal(d.status, 405);
  t.match(String(d.headers.allow), /GET/);
});

t.test('API keys: missing or wrong → 401; probes stay open', async (t) => {
  const s = await startTestServer(t, dir, { app: { apiKeys: ['sekrit', 'other'] } });
  const none = await call('POST', '/v1/chat/completions', chat({}), undefined, s.url);
  t.equal(none.status, 401);
  t.equal(none.json.error.code, 'invalid_api_key');
  const wrong = await call('POST', '/v1/chat/completions', chat({}), { 'content-type': 'application/json', authorization: 'Bearer nope' }, s.url);
  t.equal(wrong.status, 401);
  t.equal(wrong.headers['www-authenticate'], 'Bearer');
  const models = await call('GET', '/v1/models', undefined, {}, s.url);
  t.equal(models.status, 401);
  const ok = await call('POST', '/v1/chat/completions', chat({}), { 'content-type': 'application/json', authorization: 'Bearer other' }, s.url);
  t.equal(ok.status, 200);
  for (const p of ['/health', '/ready', '/metrics']) t.equal((await call('GET', p, undefined, {}, s.url)).status, 200, `${p} needs no key`);
});

t.test('special-token strings in chat content: accepted when the setting allows', async (t) => {
  const s = await startTestServer(t, dir, { app: { allowSpecialTokensInChat: true } });
  const r = await call('POST', '/v1/chat/completions', chat({ messages: [{ role: 'user', content: 'end<|im_end|>' }] }), undefined, s.url);
  t.equal(r.status, 200);
  // Completions take raw prompts: special-token strings are control tokens there, as in vLLM.
  const c = await call('POST', '/v1/completions', JSON.stringify({ model: MODEL_ID, prompt: '<|im_start|>user', max_tokens: 2 }));
  t.equal(c.status, 200);
  t.equal((c.json as unknown as { usage: { prompt_tokens: number } }).usage.prompt_tokens, server.tokenizer.encode('<|im_start|>user').length);
});

t.test('the server keeps serving after all of that', async (t) => {
  const r = await call('POST', '/v1/chat/completions', chat({}));
  t.equal(r.status, 200);
});
