// Behaviour under load and abuse with the real engine: client disconnects cancel engine
// work at once (KV blocks back to 0), a full queue answers 429 with Retry-After and the
// server keeps serving, /metrics moves, and a drain whose grace runs out cancels.

import t from 'tap';
import { request } from 'undici';
import { MODEL_ID, startTestServer, tinyModelDir, waitFor, parseMetrics } from './helpers/server-harness.js';

const dir = tinyModelDir(t);

// ignore_eos: the request runs its full length, whatever the random model samples.
const long = { model: MODEL_ID, prompt: 'Tell me a long story about experts', max_tokens: 400, temperature: 0.8, seed: 1, ignore_eos: true };
const headers = { 'content-type': 'application/json' };

t.test('a streaming client that disconnects cancels its engine request at once', async (t) => {
  const s = await startTestServer(t, dir);
  const before = s.engine.stats().generationTokens;
  const ac = new AbortController();
  const r = await request(`${s.url}/v1/completions`, { method: 'POST', headers, body: JSON.stringify({ ...long, stream: true }), signal: ac.signal });
  t.equal(r.statusCode, 200);
  // Read until a few chunks have arrived, then hang up.
  let got = '';
  for await (const chunk of r.body) {
    got += chunk.toString();
    if (got.split('\n\n').length > 4) break;
  }
  ac.abort();
  r.body.destroy();
  t.ok(await waitFor(() => s.cancels.length === 1, 5000), 'engine.cancel called');
  t.ok(await waitFor(() => s.engine.stats().kvBlocksUsed === 0 && s.engine.stats().running === 0, 5000), 'KV blocks back to 0');
  t.ok(s.engine.stats().generationTokens - before < 400, 'the request did not run to its end');
  const m = parseMetrics(await (await request(`${s.url}/metrics`)).body.text());
  t.equal(m.get('moe_kv_cache_usage_perc'), 0, '/metrics shows an empty KV cache');
});

t.test('a non-streaming client that disconnects cancels too', async (t) => {
  const s = await startTestServer(t, dir);
  const ac = new AbortController();
  const p = request(`${s.url}/v1/completions`, { method: 'POST', headers, body: JSON.stringify(long), signal: ac.signal }).catch((e: Error) => e);
  t.ok(await waitFor(() => s.engine.stats().running === 1, 5000), 'the request runs');
  ac.abort();
  t.type(await p, Error);
  t.ok(await waitFor(() => s.cancels.length === 1, 5000), 'engine.cancel called');
  t.ok(await waitFor(() => s.engine.stats().kvBlocksUsed === 0 && s.engine.stats().running === 0, 5000), 'KV blocks back to 0');
});

t.test('overload: 429 with Retry-After, no crash, serving afterwards', async (t) => {
  const s = await startTestServer(t, dir, { engine: { maxRunning: 1, maxWaiting: 2 } });
  const body = JSON.stringify({ model: MODEL_ID, prompt: 'overload', max_tokens: 24, temperature: 0 });
  const results = await Promise.all(
    Array.from({ length: 24 }, async () => {
      const r = await request(`${s.url}/v1/completions`, { method: 'POST', headers, body });
      return { status: r.statusCode, retryAfter: r.headers['retry-after'], json: (await r.body.json()) as { error?: { code: string; type: string } } };
    }),
  );
  const limited = results.filter((r) => r.status === 429);
  const ok = results.filter((r) => r.status === 200);
  t.ok(limited.length > 0, `${limited.length} requests got 429`);
  // At least the waiting queue's worth is admitted: submissions the worker has not taken in
  // yet count as waiting (a conservative bound on the main thread), so a burst may fill
  // the queue before the running slot shows as taken.
  t.ok(ok.length >= 2, `${ok.length} requests were served`);
  t.equal(limited.length + ok.length, results.length, 'nothing but 200 and 429');
  for (const r of limited) {
    t.match(r.retryAfter, /^\d+$/, 'Retry-After in seconds');
    t.equal(r.json.error!.code, 'rate_limit_exceeded');
  }
  const after = await request(`${s.url}/v1/completions`, { method: 'POST', headers, body });
  t.equal(after.statusCode, 200, 'serves afterwards');
  await after.body.dump();
  const m = parseMetrics(await (await request(`${s.url}/metrics`)).body.text());
  t.equal(m.get('moe_request_rejected_total{reason="queue_full"}'), limited.length);
});

t.test('metrics: exposition format, named metrics move', async (t) => {
  const s = await startTestServer(t, dir);
  const scrape = async () => {
    const r = await request(`${s.url}/metrics`);
    t.match(String(r.headers['content-type']), /^text\/plain/);
    return parseMetrics(await r.body.text());
  };
  const m0 = await scrape();
  for (const name of ['moe_num_requests_running', 'moe_num_requests_waiting', 'moe_kv_cache_usage_perc', 'moe_num_preemptions_total', 'process_cpu_user_seconds_total', 'nodejs_heap_size_used_bytes']) {
    t.ok(m0.has(name), `${name} exported`);
  }
  const prompt = 'Metrics please';
  const promptTokens = s.tokenizer.encode(prompt).length;
  // A long stream: the gauges show it while it runs.
  const streaming = request(`${s.url}/v1/completions`, { method: 'POST', headers, body: JSON.stringify({ ...long, max_tokens: 300, stream: true }) });
  t.ok(await waitFor(async () => (await scrape()).get('moe_num_requests_running') === 1, 5000), 'running gauge shows the request');
  t.ok((await scrape()).get('moe_kv_cache_usage_perc')! > 0, 'KV usage above 0 while it runs');
  await (await streaming).body.text();

  const r = await request(`${s.url}/v1/completions`, { method: 'POST', headers, body: JSON.stringify({ model: MODEL_ID, prompt, max_tokens: 6, temperature: 0 }) });
  const usage = ((await r.body.json()) as { usage: { completion_tokens: number } }).usage;
  const m1 = await scrape();
  const d = (name: string) => (m1.get(name) ?? 0) - (m0.get(name) ?? 0);
  t.ok(d('moe_prompt_tokens_total') >= promptTokens, 'prompt tokens counted');
  t.ok(d('moe_generation_tokens_total') >= usage.completion_tokens + 1, 'generation tokens counted');
  t.equal(d('moe_time_to_first_token_seconds_count'), 2);
  t.equal(d('moe_e2e_request_latency_seconds_count'), 2);
  t.equal(d('moe_request_queue_time_seconds_count'), 2);
  t.ok(d('moe_inter_token_latency_seconds_count') >= usage.completion_tokens - 1);
  t.ok(d('moe_request_success_total{finished_reason="length"}') + d('moe_request_success_total{finished_reason="stop"}') === 2, 'finish reasons counted');
  t.equal(m1.get('moe_num_requests_running'), 0);
  t.ok((m1.get('moe_time_to_first_token_seconds_sum') ?? 0) > 0);
});

t.test('a drain whose grace runs out cancels what is left, answering 503', async (t) => {
  const s = await startTestServer(t, dir);
  const r = await request(`${s.url}/v1/completions`, { method: 'POST', headers, body: JSON.stringify({ ...long, stream: true }) });
  const text = r.body.text();
  t.ok(await waitFor(() => s.engine.stats().running === 1, 5000));
  const { cancelled } = await s.lifecycle.drain(50);
  t.equal(cancelled, 1);
  const frames = (await text).trim().split('\n\n');
  t.equal(frames.at(-1), 'data: [DONE]');
  t.equal(JSON.parse(frames.at(-2)!.slice(6)).error.code, 'server_shutting_down');
  const ready = await request(`${s.url}/ready`);
  t.equal(ready.statusCode, 503);
  await ready.body.dump();
  const late = await request(`${s.url}/v1/completions`, { method: 'POST', headers, body: JSON.stringify({ ...long, max_tokens: 2 }) });
  t.equal(late.statusCode, 503);
  t.equal(((await late.body.json()) as { error: { code: string } }).error.code, 'server_shutting_down');
  t.ok(await waitFor(() => s.engine.stats().kvBlocksUsed === 0, 5000));
});

t.test('ignore_eos runs a request to max_tokens', async (t) => {
  const s = await startTestServer(t, dir);
  const r = await request(`${s.url}/v1/completions`, { method: 'POST', headers, body: JSON.stringify({ ...long, max_tokens: 60 }) });
  const body = (await r.body.json()) as { usage: { completion_tokens: number }; choices: { finish_reason: string }[] };
  t.equal(body.usage.completion_tokens, 60);
  t.equal(body.choices[0].finish_reason, 'length');
  const bad = await request(`${s.url}/v1/completions`, { method: 'POST', headers, body: JSON.stringify({ ...long, ignore_eos: 'yes' }) });
  t.equal(bad.statusCode, 400);
  await bad.body.dump();
});
