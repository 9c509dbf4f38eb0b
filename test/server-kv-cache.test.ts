// The KV cache's element type as a setting (`kvCacheType`, --kv-cache-type,
// MOE_SERVE_KV_CACHE_TYPE): parsed and checked like every setting, carried to the engine,
// and a server holding its KV cache in float16 answers as the float32 one does.

import t from 'tap';
import { request } from 'undici';
import { loadSettings } from '../src/config.js';
import { engineOptions } from '../src/server/server.js';
import { MODEL_ID, startTestServer, tinyModelDir } from './helpers/server-harness.js';

t.test('kvCacheType: default f16, f32 from a flag or the environment, anything else refused', async (t) => {
  t.equal(loadSettings({ env: {} }).kvCacheType, 'f16');
  t.equal(loadSettings({ env: {}, flags: { kvCacheType: 'f32' } }).kvCacheType, 'f32');
  t.equal(loadSettings({ env: { MOE_SERVE_KV_CACHE_TYPE: 'f32' } }).kvCacheType, 'f32');
  t.throws(() => loadSettings({ env: { MOE_SERVE_KV_CACHE_TYPE: 'q8' } }), /setting kvCacheType \(from MOE_SERVE_KV_CACHE_TYPE\) must be one of f32, f16/);
  t.equal(engineOptions(loadSettings({ env: {} }), '/m', 'm').kvCacheType, 'f16');
  t.equal(engineOptions(loadSettings({ env: { MOE_SERVE_KV_CACHE_TYPE: 'f32' } }), '/m', 'm').kvCacheType, 'f32');
});

async function greedy(url: string, prompt: string): Promise<{ text: string; tokens: number }> {
  const r = await request(`${url}/v1/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: MODEL_ID, prompt, max_tokens: 24, temperature: 0, ignore_eos: true }),
  });
  const body = (await r.body.json()) as { choices: { text: string }[]; usage: { completion_tokens: number } };
  if (r.statusCode !== 200) throw new Error(`status ${r.statusCode}: ${JSON.stringify(body)}`);
  return { text: body.choices[0].text, tokens: body.usage.completion_tokens };
}

t.test('a server with a float16 KV cache gives the float32 server\'s greedy completions', async (t) => {
  const dir = tinyModelDir(t);
  const prompts = ['The quick brown fox', 'Once upon a time, in a land far away,', 'moe-serve'];
  const answers: Record<string, { text: string; tokens: number }[]> = {};
  for (const kvCacheType of ['f32', 'f16'] as const) {
    const server = await startTestServer(t, dir, { engine: { kvCacheType } });
    answers[kvCacheType] = [];
    for (const p of prompts) answers[kvCacheType].push(await greedy(server.url, p));
    await server.close();
  }
  for (let i = 0; i < prompts.length; i++) {
    t.equal(answers.f16[i].tokens, 24, `prompt ${i}: 24 tokens`);
    t.equal(answers.f16[i].text, answers.f32[i].text, `prompt ${i}: the same greedy text`);
  }
});
