// The server with expert offloading: real engine worker, native expert store, a tiny
// generated model. After real requests, /metrics has non-zero expert cache counters per
// layer and pre-gating quality, and GET /v1/internal/experts shows the cache; errors
// keep the OpenAI shape; bad settings fail clearly.

import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { request } from 'undici';
import { ConfigError, loadSettings } from '../src/config.js';
import { startEngine } from '../src/engine/engine-client.js';
import type { ExpertCacheState } from '../src/engine/protocol.js';
import { engineOptions, startServer } from '../src/server/server.js';
import { settingsFromArgv } from '../src/cli/serve-cmd.js';
import { UsageError } from '../src/cli/args.js';
import { tempDir, writeModel } from './helpers/models.js';
import { MODEL_ID, startTestServer, tinyModelDir, parseMetrics } from './helpers/server-harness.js';
import { NO_OFFLOAD_SKIP } from './helpers/offload.js';

const skip = NO_OFFLOAD_SKIP;

const headers = { 'content-type': 'application/json' };

/** Sum of a metric over its label sets. */
function sum(m: Map<string, number>, name: string): number {
  let s = 0;
  for (const [k, v] of m) if (k === name || k.startsWith(name + '{')) s += v;
  return s;
}

/** A 4-layer qwen3_moe (32 experts, top-8) checkpoint. */
const dir4 = writeModel(t, { arch: 'qwen3_moe', seed: 7, overrides: { numLayers: 4 } });

async function generate(url: string, n: number, extraHeaders: Record<string, string> = {}): Promise<number[]> {
  return Promise.all(
    Array.from({ length: n }, async (_, i) => {
      const r = await request(`${url}/v1/completions`, {
        method: 'POST',
        headers: { ...headers, ...extraHeaders },
        body: JSON.stringify({ model: MODEL_ID, prompt: `Request number ${i} about mixtures of experts`, max_tokens: 12, temperature: 0.7, seed: i, ignore_eos: true }),
      });
      await r.body.text();
      return r.statusCode;
    }),
  );
}

t.test('metrics and the expert cache endpoint after requests', { skip }, async (t) => {
  const s = await startTestServer(t, dir4, {
    engine: { offload: { capacity: '0.3125', policy: 'predictive', lookahead: 2, ioThreads: 2, dir: tempDir(t) } },
    app: { apiKeys: ['sekrit'] },
  });
  const auth = { authorization: 'Bearer sekrit' };
  t.same(await generate(s.url, 4, auth), [200, 200, 200, 200]);

  const m = parseMetrics(await (await request(`${s.url}/metrics`)).body.text());
  for (let l = 0; l < 4; l++) {
    t.ok((m.get(`moe_expert_cache_hits_total{layer="${l}"}`) ?? 0) + (m.get(`moe_expert_cache_misses_total{layer="${l}"}`) ?? 0) > 0, `layer ${l} has visits`);
  }
  t.ok(sum(m, 'moe_expert_cache_hits_total') > 0, 'hits');
  t.ok(sum(m, 'moe_expert_cache_misses_total') > 0, 'misses');
  t.ok(sum(m, 'moe_expert_prefetch_issued_total') > 0, 'prefetches issued');
  t.ok(sum(m, 'moe_expert_prefetch_used_total') + sum(m, 'moe_expert_prefetch_wasted_total') + sum(m, 'moe_expert_prefetch_cancelled_total') > 0, 'prefetch outcomes');
  const policy = '{policy="predictive"}';
  t.ok((m.get(`moe_expert_loads_total${policy}`) ?? 0) > 0, 'loads');
  t.ok((m.get(`moe_expert_slot_bytes${policy}`) ?? 0) > 0, 'slot bytes');
  t.ok((m.get(`moe_expert_loaded_bytes_total${policy}`) ?? 0) >= (m.get(`moe_expert_loads_total${policy}`) ?? 0) * (m.get(`moe_expert_slot_bytes${policy}`) ?? 0), 'bytes loaded');
  t.ok(sum(m, 'moe_expert_stall_seconds_total') >= 0);
  // The store's prefetch reads: the series are there (whether a read paused depends on timing).
  for (const name of ['moe_expert_prefetch_read_pauses_total', 'moe_expert_prefetch_reads_abandoned_total']) t.ok(m.has(`${name}${policy}`), name);
  // The runner's own decisions: every part is a series; the visits and the prefetches took time.
  for (const part of ['visit', 'prefetch', 'learn', 'idle']) t.ok(m.has(`moe_expert_policy_seconds_total{policy="predictive",part="${part}"}`), `policy seconds, ${part}`);
  t.ok((m.get('moe_expert_policy_seconds_total{policy="predictive",part="visit"}') ?? 0) > 0, 'the visits took policy time');
  t.ok((m.get('moe_expert_policy_seconds_total{policy="predictive",part="prefetch"}') ?? 0) > 0, 'the prefetch decisions took time');
  for (let l = 0; l < 4; l++) t.equal(m.get(`moe_expert_cache_slots{layer="${l}"}`), 10, `layer ${l}: 10 slots`);
  for (const d of [1, 2]) {
    const recall = m.get(`moe_expert_prediction_recall{distance="${d}"}`);
    const precision = m.get(`moe_expert_prediction_precision{distance="${d}"}`);
    t.ok(recall !== undefined && recall > 0 && recall <= 1, `recall at distance ${d}: ${recall}`);
    t.ok(precision !== undefined && precision > 0 && precision <= 1, `precision at distance ${d}: ${precision}`);
  }

  // The endpoint: authenticated like every /v1 route.
  const denied = await request(`${s.url}/v1/internal/experts`);
  t.equal(denied.statusCode, 401);
  t.equal(((await denied.body.json()) as { error: { code: string } }).error.code, 'invalid_api_key');
  const r = await request(`${s.url}/v1/internal/experts`, { headers: auth });
  t.equal(r.statusCode, 200);
  const state = (await r.body.json()) as ExpertCacheState & { object: string };
  t.equal(state.object, 'expert_cache');
  t.equal(state.policy, 'predictive');
  t.same(state.slotsByLayer, [10, 10, 10, 10]);
  t.equal(state.totalSlots, 40);
  t.equal(state.layers.length, 4);
  for (const l of state.layers) {
    t.equal(l.capacity, 10);
    t.ok(l.resident.length > 0, `layer ${l.layer}: ${l.resident.length} resident`);
    t.equal(l.resident.length + l.loading.length + l.freeSlots, 10);
    for (const x of l.resident) t.ok(x.expert >= 0 && x.expert < 32 && x.slot >= 0 && x.slot < 10);
    t.ok(l.counters.hits + l.counters.misses > 0);
    t.ok(l.counters.visits > 0);
  }
  t.ok(state.stats.loads > 0 && state.stats.bytesLoaded > 0);
  t.equal(state.stats.prediction.length, 2);
  // The engine's snapshot carries the same counters.
  t.ok((s.engine.stats().offload?.loads ?? 0) > 0);
});

t.test('serve --offload-split: each layer its own slots, at the endpoint and in /metrics', { skip }, async (t) => {
  // As a user starts it: flags → settings → the server.
  const settings = settingsFromArgv(
    ['--model', dir4, '--model-id', MODEL_ID, '--port', '0', '--offload-capacity', '0.3125', '--offload-split', '3,1,1,0', '--offload-policy', 'lru', '--offload-dir', tempDir(t), '--log-level', 'silent', '--kv-blocks', '64'],
    {},
  )!;
  t.equal(settings.offloadSplit, '3,1,1,0');
  const logs: string[] = [];
  const server = await startServer(settings, (l) => logs.push(l), { handleSignals: false });
  t.teardown(() => server.shutdown('test over'));
  t.ok(logs.some((l) => /capacity 0.3125 split across layers by the weights 3,1,1,0/.test(l)), 'the start-up log names the split');
  t.same(await generate(server.url, 3), [200, 200, 200]);
  // 10 slots per layer on average (40 in all): the weight-0 layer keeps one, 39 go 3:1:1.
  const slots = [23, 8, 8, 1];
  const state = (await (await request(`${server.url}/v1/internal/experts`)).body.json()) as ExpertCacheState;
  t.same(state.slotsByLayer, slots);
  t.equal(state.totalSlots, 40);
  state.layers.forEach((l, i) => {
    t.equal(l.capacity, slots[i], `layer ${i}: ${slots[i]} slots`);
    t.equal(l.resident.length + l.loading.length + l.freeSlots, slots[i]);
    t.ok([...l.resident, ...l.loading].every((x) => x.slot >= 0 && x.slot < slots[i]), `layer ${i}: slots below ${slots[i]}`);
  });
  t.ok(state.layers[0].resident.length > 8, `layer 0 holds more than the other layers could (${state.layers[0].resident.length})`);
  t.equal(state.layers[3].counters.streamedVisits, state.layers[3].counters.visits, 'the one-slot layer streams every visit');
  const m = parseMetrics(await (await request(`${server.url}/metrics`)).body.text());
  slots.forEach((n, l) => t.equal(m.get(`moe_expert_cache_slots{layer="${l}"}`), n, `metric: layer ${l} has ${n} slots`));
});

t.test('without offloading the endpoint answers 404 in the OpenAI error shape', async (t) => {
  const s = await startTestServer(t, tinyModelDir(t));
  const r = await request(`${s.url}/v1/internal/experts`);
  t.equal(r.statusCode, 404);
  const body = (await r.body.json()) as { error: { code: string; type: string; message: string } };
  t.equal(body.error.code, 'expert_offload_disabled');
  t.equal(body.error.type, 'invalid_request_error');
  t.match(body.error.message, /offloadCapacity/);
  const m = parseMetrics(await (await request(`${s.url}/metrics`)).body.text());
  t.same([...m.keys()].filter((k) => k.startsWith('moe_expert')), [], 'no offload samples');
});

t.test('routing replay through the server, resident and offloaded', { skip }, async (t) => {
  const d = tempDir(t);
  const trace = join(d, 'r.trace.csv');
  const lines = ['# moe-trace v1', '# model=t layers=2 experts=16 top_k=2 source=test', 'request,phase,position,layer,experts,weights'];
  for (let p = 0; p < 6; p++) for (let l = 0; l < 2; l++) lines.push(`0,${p < 3 ? 'prefill' : 'decode'},${p},${l},${(p + l) % 16} ${(p * 3 + l + 5) % 16},`);
  writeFileSync(trace, lines.join('\n') + '\n');
  for (const offload of [undefined, { capacity: '0.25', policy: 'lru', lookahead: 1, ioThreads: 1, dir: d }]) {
    const s = await startTestServer(t, dir4, { engine: { replayTrace: trace, ...(offload ? { offload } : {}) } });
    t.same(await generate(s.url, 3), [200, 200, 200], offload ? 'offloaded replay serves' : 'resident replay serves');
    if (offload) {
      // Replay routes 2 experts per token over 16 of the model's 32: every expert a visit
      // needed (not a pending prefetch, which pre-gating guesses from the model's router) is below 16.
      const state = (await (await request(`${s.url}/v1/internal/experts`)).body.json()) as ExpertCacheState;
      let n = 0;
      for (const l of state.layers) {
        for (const x of [...l.resident, ...l.loading]) {
          if (l.prefetched.includes(x.expert)) continue;
          n++;
          t.ok(x.expert < 16, `layer ${l.layer} expert ${x.expert} comes from the trace`);
        }
      }
      t.ok(n > 0);
    }
    await s.close();
  }
});

t.test('bad offload settings fail clearly', async (t) => {
  t.throws(() => loadSettings({ env: { MOE_SERVE_OFFLOAD_CAPACITY: 'lots' } }), ConfigError);
  t.throws(() => loadSettings({ env: { MOE_SERVE_OFFLOAD_CAPACITY: 'lots' } }), /setting offloadCapacity: expert cache capacity "lots": not a number/);
  t.throws(() => loadSettings({ env: { MOE_SERVE_OFFLOAD_CAPACITY: '0.5', MOE_SERVE_RUNNER: 'reference' } }), /offloadCapacity needs the native runner/);
  t.throws(() => loadSettings({ env: { MOE_SERVE_OFFLOAD_POLICY: 'belady' } }), /setting offloadPolicy \(from MOE_SERVE_OFFLOAD_POLICY\) must be one of lru, lfu, lfu-decay, predictive, forecast/);
  t.throws(() => loadSettings({ env: {}, flags: { offloadLookahead: '-1' } }), /offloadLookahead/);
  const s = loadSettings({ env: { MOE_SERVE_OFFLOAD_CAPACITY: '12GiB', MOE_SERVE_OFFLOAD_LOOKAHEAD: '3', MOE_SERVE_DEMO: '1' } });
  t.equal(s.offloadSplit, 'equal', 'the split is equal by default');
  const o = engineOptions(s, '/m', 'm');
  t.same(o.offload, { capacity: '12GiB', policy: 'forecast', lookahead: 3, prefetchMinProbability: 'auto', planSteps: 4, ioThreads: 2 });
  // The prefetch threshold: auto (measured at start-up) by default, or a probability; checked when the settings load.
  t.equal(engineOptions(loadSettings({ env: { MOE_SERVE_OFFLOAD_CAPACITY: '0.5', MOE_SERVE_OFFLOAD_PREFETCH_MIN_PROBABILITY: '0.55' } }), '/m', 'm').offload?.prefetchMinProbability, 0.55);
  t.equal(settingsFromArgv(['--demo', '--offload-capacity', '0.5', '--offload-prefetch-min-probability', '0.4'], {})!.offloadPrefetchMinProbability, '0.4');
  t.throws(() => loadSettings({ env: { MOE_SERVE_OFFLOAD_PREFETCH_MIN_PROBABILITY: 'often' } }), /setting offloadPrefetchMinProbability must be "auto" or a number in \[0, 1\], got "often"/);
  t.throws(() => settingsFromArgv(['--demo', '--offload-prefetch-min-probability', '1.2'], {}), UsageError);
  // The split: from the environment or the flag; its form is checked at start-up.
  const withSplit = loadSettings({ env: { MOE_SERVE_OFFLOAD_CAPACITY: '0.5', MOE_SERVE_OFFLOAD_SPLIT: '2,1,1,1' } });
  t.same(engineOptions(withSplit, '/m', 'm').offload, { capacity: '0.5', split: '2,1,1,1', policy: 'forecast', lookahead: 2, prefetchMinProbability: 'auto', planSteps: 4, ioThreads: 2 });
  t.equal(engineOptions(loadSettings({ env: { MOE_SERVE_OFFLOAD_CAPACITY: '0.5', MOE_SERVE_OFFLOAD_PLAN_STEPS: '0' } }), '/m', 'm').offload?.planSteps, 0, 'plan steps from the environment');
  t.throws(() => loadSettings({ env: {}, flags: { offloadPlanSteps: '-1' } }), /offloadPlanSteps/);
  t.equal(loadSettings({ env: { MOE_SERVE_OFFLOAD_CAPACITY: '0.5' }, flags: { offloadSplit: '1,2' } }).offloadSplit, '1,2');
  t.equal(settingsFromArgv(['--demo', '--offload-capacity', '0.5', '--offload-split', '4,1'], {})!.offloadSplit, '4,1');
  t.throws(() => loadSettings({ env: { MOE_SERVE_OFFLOAD_CAPACITY: '0.5', MOE_SERVE_OFFLOAD_SPLIT: '2,x' } }), ConfigError);
  t.throws(() => loadSettings({ env: { MOE_SERVE_OFFLOAD_CAPACITY: '0.5', MOE_SERVE_OFFLOAD_SPLIT: '2,x' } }), /setting offloadSplit: expert cache split "2,x": weight 2 \("x"\) is not a number; give equal, or one non-negative weight per layer/);
  t.throws(() => loadSettings({ env: { MOE_SERVE_OFFLOAD_CAPACITY: '0.5', MOE_SERVE_OFFLOAD_SPLIT: '1,-1' } }), /setting offloadSplit: .*weight 2 \("-1"\) is negative/);
  t.throws(() => loadSettings({ env: { MOE_SERVE_OFFLOAD_CAPACITY: '0.5', MOE_SERVE_OFFLOAD_SPLIT: '0,0' } }), /setting offloadSplit: .*every weight is 0/);
  t.throws(() => loadSettings({ env: { MOE_SERVE_OFFLOAD_SPLIT: '1,1' } }), /setting offloadSplit splits the expert cache of offloadCapacity across layers; set offloadCapacity too/);
  t.throws(() => settingsFromArgv(['--demo', '--offload-capacity', '0.5', '--offload-split', 'lots'], {}), UsageError);
  t.throws(() => settingsFromArgv(['--demo', '--offload-capacity', '0.5', '--offload-split', 'lots'], {}), /setting offloadSplit: expert cache split "lots"/);
  t.equal(o.replayTrace, undefined);
  t.equal(engineOptions(loadSettings({ env: {} }), '/m', 'm').offload, undefined, 'off by default');

  // Errors found when the engine loads reach `ready`.
  const base = { modelDir: tinyModelDir(t), modelId: MODEL_ID, runner: 'native' as const, kvBlockSize: 16, kvBlocks: 32, maxBatchTokens: 64, maxRunning: 2, maxWaiting: 2, policy: 'fcfs' };
  const small = startEngine({ ...base, offload: { capacity: '0.01', policy: 'lru', lookahead: 2, ioThreads: 1 } });
  await t.rejects(small.ready, /0.01 of 32 experts per layer gives no expert slot per layer; at least one slot per layer is needed/);
  await small.close();
  // The split's number of weights against the model's layers (2): a clear start-up error.
  const badSplit = startEngine({ ...base, offload: { capacity: '0.5', split: '2,1,1,1', policy: 'lru', lookahead: 2, ioThreads: 1, dir: tempDir(t) } });
  await t.rejects(badSplit.ready, /setting offloadSplit: expert cache split "2,1,1,1": 4 weights, but the model has 2 layers \(one weight per layer is needed\)/);
  await badSplit.close();
  // And through the server as a user starts it: the start fails with that message, nothing left listening.
  const logs: string[] = [];
  const argv = ['--model', base.modelDir, '--port', '0', '--offload-capacity', '0.5', '--offload-split', '1,1,1', '--offload-dir', tempDir(t), '--log-level', 'silent'];
  await t.rejects(startServer(settingsFromArgv(argv, {})!, (l) => logs.push(l), { handleSignals: false }), /3 weights, but the model has 2 layers/);
  t.ok(logs.some((l) => /the model failed to load: .*setting offloadSplit: .*3 weights, but the model has 2 layers .*; give equal, or 2 non-negative weights, one per layer, comma-separated \(e\.g\. 2,1\)/.test(l)), 'logged, with what to give');
  const noTrace = startEngine({ ...base, replayTrace: join(tempDir(t), 'missing.csv') });
  await t.rejects(noTrace.ready, /ENOENT|no such file/);
  await noTrace.close();
  const badDir = startEngine({ ...base, offload: { capacity: '0.5', policy: 'lru', lookahead: 2, ioThreads: 1, dir: '/nonexistent/x' } });
  await t.rejects(badDir.ready, /offload directory "\/nonexistent\/x" is not a writable directory/);
  await badDir.close();
});
