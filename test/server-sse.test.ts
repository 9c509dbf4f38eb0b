// Raw SSE framing over undici: `data: ` frames separated by blank lines, `[DONE]` last,
// include_usage, valid UTF-8 in every frame, headers.

import t from 'tap';
import { request } from 'undici';
import { MODEL_ID, startTestServer, tinyModelDir } from './helpers/server-harness.js';

const server = await startTestServer(t, tinyModelDir(t));

async function post(path: string, body: unknown) {
  const r = await request(`${server.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  const raw = Buffer.from(await r.body.arrayBuffer());
  return { status: r.statusCode, headers: r.headers, raw };
}

function frames(raw: Buffer): string[] {
  const text = new TextDecoder('utf-8', { fatal: true }).decode(raw); // throws on invalid UTF-8
  t.ok(text.endsWith('\n\n'), 'the stream ends with a complete frame');
  return text.slice(0, -2).split('\n\n');
}

t.test('chat stream framing, [DONE], no usage unless asked', async (t) => {
  const r = await post('/v1/chat/completions', { model: MODEL_ID, messages: [{ role: 'user', content: 'Hi' }], max_tokens: 20, stream: true, seed: 3 });
  t.equal(r.status, 200);
  t.match(String(r.headers['content-type']), /^text\/event-stream/);
  t.equal(r.headers['cache-control'], 'no-cache');
  const fs = frames(r.raw);
  t.equal(fs.at(-1), 'data: [DONE]');
  const objs = fs.slice(0, -1).map((f) => {
    t.ok(f.startsWith('data: '), 'every frame is a data line');
    t.notOk(f.slice(6).includes('\n'), 'one line per frame');
    return JSON.parse(f.slice(6));
  });
  t.same(objs[0].choices[0].delta, { role: 'assistant', content: '' }, 'the first chunk carries the role');
  t.equal(objs.at(-1).choices[0].finish_reason === 'length' || objs.at(-1).choices[0].finish_reason === 'stop', true);
  t.same(objs.at(-1).choices[0].delta, {});
  for (const o of objs) {
    t.notOk('usage' in o, 'no usage field without include_usage');
    t.equal(o.object, 'chat.completion.chunk');
    t.notOk(JSON.stringify(o).includes('\\ud8'), 'no lone surrogates');
  }
});

t.test('include_usage: usage null on every chunk, then a usage chunk with no choices', async (t) => {
  const r = await post('/v1/completions', { model: MODEL_ID, prompt: 'Hello', max_tokens: 7, stream: true, stream_options: { include_usage: true }, temperature: 0 });
  const fs = frames(r.raw);
  t.equal(fs.at(-1), 'data: [DONE]');
  const objs = fs.slice(0, -1).map((f) => JSON.parse(f.slice(6)));
  const last = objs.at(-1);
  t.same(last.choices, []);
  t.equal(last.usage.prompt_tokens, server.tokenizer.encode('Hello').length);
  t.equal(last.usage.completion_tokens, 7);
  t.equal(last.usage.total_tokens, last.usage.prompt_tokens + 7);
  for (const o of objs.slice(0, -1)) t.equal(o.usage, null);
});

t.test('streamed text is valid UTF-8 and never splits a character', async (t) => {
  // Random weights pick many byte tokens: sampled at high temperature, multi-byte characters get split across tokens.
  for (const seed of [1, 2, 3]) {
    const r = await post('/v1/completions', { model: MODEL_ID, prompt: 'ü€😀', max_tokens: 48, stream: true, temperature: 1.5, seed });
    const objs = frames(r.raw).slice(0, -1).map((f) => JSON.parse(f.slice(6)));
    const streamed = objs.map((o) => o.choices[0]?.text ?? '').join('');
    const whole = await post('/v1/completions', { model: MODEL_ID, prompt: 'ü€😀', max_tokens: 48, temperature: 1.5, seed });
    t.equal(streamed, JSON.parse(whole.raw.toString('utf8')).choices[0].text, `seed ${seed}: streamed = whole`);
    for (const o of objs) for (const c of o.choices) t.notOk(/[\uD800-\uDFFF]/.test(c.text.replace(/[\uD800-\uDBFF][\uDC00-\uDFFF]/g, '')), 'no broken surrogate pairs');
  }
});

t.test('n = 2 streams interleave by index, each choice finishes once', async (t) => {
  const r = await post('/v1/chat/completions', { model: MODEL_ID, messages: [{ role: 'user', content: 'Hi' }], max_tokens: 5, stream: true, n: 2, seed: 9 });
  const objs = frames(r.raw).slice(0, -1).map((f) => JSON.parse(f.slice(6)));
  const finishes = objs.flatMap((o) => o.choices).filter((c: { finish_reason: string | null }) => c.finish_reason !== null);
  t.same(finishes.map((c: { index: number }) => c.index).sort(), [0, 1]);
  const roles = objs.flatMap((o) => o.choices).filter((c: { delta: { role?: string } }) => c.delta.role === 'assistant');
  t.equal(roles.length, 2);
});
