// Expert-aware batching through the engine and the server (issue 6, points 5-6): the
// engine loop gives the policy live hints (each sequence's previous routing, the
// resident experts, the step time) only when the policy uses them; /metrics shows
// distinct experts per step, regrouping decisions, extra wait and the policy's cost.

import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { request } from 'undici';
import { loadSettings } from '../src/config.js';
import { EngineLoop } from '../src/engine/engine-loop.js';
import type { EngineEvent, GenerationRequest } from '../src/engine/protocol.js';
import { ReferenceRunner, type ModelRunner, type RoutingHint } from '../src/engine/runner.js';
import { createPolicy, type BatchPolicy, type PolicyCandidate, type StepBudget } from '../src/scheduler/policy.js';
import { engineOptions } from '../src/server/server.js';
import { memoryModel, tempDir, tinySpec, writeModel } from './helpers/models.js';
import { MODEL_ID, startTestServer, parseMetrics } from './helpers/server-harness.js';
import { NO_OFFLOAD_SKIP } from './helpers/offload.js';

const skip = NO_OFFLOAD_SKIP;

function req(id: string, prompt: number[], maxTokens: number): GenerationRequest {
  return {
    id,
    promptTokens: prompt,
    maxTokens,
    sampling: { temperature: 0, topP: 1, topK: 0, minP: 0 } as GenerationRequest['sampling'],
    seed: 1,
    penalties: { frequency: 0, presence: 0, repetition: 1 },
    stopTokenIds: [],
    logprobs: null,
  };
}

/** A reference runner with live-hint methods that count their calls. */
function spiedRunner(): { runner: ModelRunner; calls: { hints: number; resident: number } } {
  const spec = tinySpec('qwen3_moe');
  const base = new ReferenceRunner(memoryModel(spec, 3), { blockSize: 4, numBlocks: 256 });
  const calls = { hints: 0, resident: 0 };
  const E = spec.numExperts;
  const runner: ModelRunner = Object.assign(base, {
    routingHints(seqId: number): RoutingHint {
      calls.hints++;
      return { experts: Array.from({ length: spec.numLayers }, () => [seqId % E, (seqId * 3 + 1) % E]) };
    },
    residentExperts(): Uint8Array[] {
      calls.resident++;
      return Array.from({ length: spec.numLayers }, () => new Uint8Array(E).fill(1));
    },
  });
  return { runner, calls };
}

function runToEnd(loop: EngineLoop, events: EngineEvent[], n: number): void {
  for (let i = 0; i < 10_000 && events.filter((e) => e.type === 'finished').length < n; i++) loop.step();
}

t.test('engine loop: FCFS never asks for hints; expert-aware gets them every step', async (t) => {
  for (const policy of ['fcfs', 'expert-aware'] as const) {
    const { runner, calls } = spiedRunner();
    const seen: StepBudget[] = [];
    const inner = createPolicy(policy, { maxExtraWaitSteps: 2 });
    let hinted = 0;
    const pick = inner.pick.bind(inner);
    inner.pick = (c: readonly PolicyCandidate[], b: StepBudget) => {
      seen.push(b);
      hinted += c.filter((x) => x.hints?.predictedExperts).length;
      return pick(c, b);
    };
    const spy: BatchPolicy = inner;
    const events: EngineEvent[] = [];
    const loop = new EngineLoop(
      runner,
      { kvBlockSize: 4, kvBlocks: 256, maxBatchTokens: 3, maxRunning: 8, maxWaiting: 16, policy: spy, prefillFirst: true, vocabLimit: runner.spec.vocabSize, contextLength: 256 },
      (e) => events.push(e),
    );
    for (let i = 0; i < 6; i++) loop.submit(req(`r${i}`, [1 + i, 2, 3], 5));
    runToEnd(loop, events, 6);
    t.equal(events.filter((e) => e.type === 'finished' && e.reason === 'length').length, 6, `${policy}: every request finished`);
    const st = loop.stats().batching!;
    t.equal(st.policy, policy);
    // Every policy's scheduling time is counted, and it holds the expert-aware pick's.
    t.ok(st.scheduleSeconds > 0 && st.scheduleSeconds >= st.pickSeconds, `${policy}: scheduling ${st.scheduleSeconds} s >= pick ${st.pickSeconds} s`);
    if (policy === 'fcfs') {
      t.same(calls, { hints: 0, resident: 0 }, 'fcfs: no hint work');
      t.equal(hinted, 0);
      t.ok(seen.every((b) => b.resident === undefined && b.stepMs === undefined), 'fcfs: bare budgets');
      t.equal(st.regroupedPicks, 0);
      t.equal(st.pickCalls, 0, 'fcfs keeps no pick counters');
      // Prefill first: all 6 became runnable, took turns 3 at a time, round robin: no extra wait.
      t.ok(st.extraWaitTokens > 0);
      t.equal(st.extraWaitSum, 0, 'round-robin FCFS has no extra wait');
    } else {
      t.ok(calls.hints > 0 && calls.resident > 0, `expert-aware: ${calls.hints} hint calls, ${calls.resident} resident calls`);
      t.ok(hinted > 0, 'candidates carry predicted experts');
      t.ok(seen.some((b) => b.resident !== undefined && b.resident.length === runner.spec.numLayers));
      t.ok(seen.slice(1).every((b) => typeof b.stepMs === 'number' && b.stepMs >= 0), 'step time passed on');
      t.ok(st.pickCalls > 0 && st.pickSeconds > 0, 'pick cost measured');
      t.ok(st.regroupedPicks > 0, `regrouped ${st.regroupedPicks}`);
      t.ok(st.extraWaitTokens > 0);
    }
  }
});

t.test('settings: the policy and its fairness bounds reach the engine options', async (t) => {
  const s = loadSettings({ env: {}, flags: { policy: 'expert-aware', policyMaxExtraWaitSteps: '6', policyMaxExtraWaitMs: '250', policyMaxGapFactor: '1.2', policyMissPenalty: '1.5', prefillFirst: true } });
  const o = engineOptions(s, '/m', 'm');
  t.equal(o.policy, 'expert-aware');
  t.same(o.policyOptions, { maxExtraWaitSteps: 6, maxExtraWaitMs: 250, maxGapFactor: 1.2, missPenalty: 1.5 });
  t.equal((createPolicy('expert-aware', o.policyOptions) as unknown as { maxGapFactor?: number }).maxGapFactor, 1.2, 'the gap factor reaches the policy');
  t.equal(o.prefillFirst, true);
  const d = engineOptions(loadSettings({ env: {} }), '/m', 'm');
  t.equal(d.policy, 'fcfs');
  t.same(d.policyOptions, { maxExtraWaitSteps: 4, missPenalty: 2 });
  t.equal(d.prefillFirst, undefined);
  t.throws(() => loadSettings({ env: { MOE_SERVE_POLICY: 'greedy' } }), /setting policy \(from MOE_SERVE_POLICY\) must be one of fcfs, expert-aware/);
  t.throws(() => createPolicy('expert-aware', { maxExtraWaitSteps: -1 }), /maxExtraWaitSteps/);
  t.throws(() => loadSettings({ env: { MOE_SERVE_POLICY_MAX_GAP_FACTOR: '0.5' } }), /policyMaxGapFactor must be 0 \(off\) or >= 1, got 0.5/);
});

/** A 4-layer qwen3_moe (32 experts, top-8) checkpoint. */
const dir4 = writeModel(t, { arch: 'qwen3_moe', seed: 7, overrides: { numLayers: 4 } });

async function streamMany(url: string, n: number): Promise<number[]> {
  return Promise.all(
    Array.from({ length: n }, async (_, i) => {
      const r = await request(`${url}/v1/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: MODEL_ID, prompt: `Request ${i}`, max_tokens: 10, temperature: 0.7, seed: i, ignore_eos: true, stream: true }),
      });
      const text = await r.body.text();
      if (!text.includes('[DONE]')) throw new Error(`request ${i}: stream did not end: ${text.slice(-200)}`);
      return r.statusCode;
    }),
  );
}

for (const policy of ['expert-aware', 'fcfs'] as const) {
  t.test(`/metrics with policy ${policy}, offloading, 12 concurrent streams in steps of 4`, { skip }, async (t) => {
    const s = await startTestServer(t, dir4, {
      engine: {
        policy,
        policyOptions: { maxExtraWaitSteps: 4, missPenalty: 2 },
        prefillFirst: true,
        maxBatchTokens: 4,
        maxRunning: 16,
        offload: { capacity: '0.5', policy: 'lru', lookahead: 0, ioThreads: 1, dir: tempDir(t) },
      },
    });
    t.same(await streamMany(s.url, 12), new Array(12).fill(200));
    const m = parseMetrics(await (await request(`${s.url}/metrics`)).body.text());
    const l = `{policy="${policy}"}`;
    const steps = m.get(`moe_batch_distinct_experts_per_step_count${l}`) ?? 0;
    const distinct = (m.get(`moe_batch_distinct_experts_per_step_sum${l}`) ?? 0) / steps;
    t.ok(steps > 0, `${steps} steps observed`);
    t.ok(distinct > 0 && distinct <= 32, `distinct experts per step ${distinct.toFixed(2)}`);
    t.equal(m.get(`moe_batch_distinct_experts_per_step_bucket{le="+Inf",policy="${policy}"}`), steps);
    t.ok((m.get(`moe_batch_extra_wait_steps_count${l}`) ?? 0) > 0, 'extra-wait histogram observed');
    const regrouped = m.get(`moe_batch_regrouped_picks_total${l}`) ?? 0;
    const pickSeconds = m.get(`moe_batch_policy_pick_seconds_total${l}`) ?? 0;
    const scheduleSeconds = m.get(`moe_batch_schedule_seconds_total${l}`) ?? 0;
    t.ok(scheduleSeconds > 0 && scheduleSeconds >= pickSeconds, `scheduling ${scheduleSeconds} s on /metrics, pick ${pickSeconds} s`);
    if (policy === 'expert-aware') {
      t.ok(regrouped > 0, `regrouped picks ${regrouped}`);
      t.ok(pickSeconds > 0, `policy cost ${pickSeconds} s`);
      t.ok((m.get(`moe_batch_policy_picks_total${l}`) ?? 0) > 0);
      const bound = 4;
      const over = (m.get(`moe_batch_extra_wait_steps_count${l}`) ?? 0) - (m.get(`moe_batch_extra_wait_steps_bucket{le="8",policy="${policy}"}`) ?? 0);
      t.ok(over >= 0, `tokens waiting more than 8 steps beyond FCFS: ${over} (bound ${bound})`);
    } else {
      t.equal(regrouped, 0, 'FCFS regroups nothing');
      t.equal(pickSeconds, 0, 'FCFS keeps no pick timer');
      t.equal(m.get(`moe_batch_extra_wait_steps_sum${l}`), 0, 'round-robin FCFS: no extra wait');
    }
  });
}

t.test('routing replay without offloading: the native runner gives hints and distinct experts', { skip }, async (t) => {
  const d = tempDir(t);
  const trace = join(d, 'r.trace.csv');
  const lines = ['# moe-trace v1', '# model=t layers=4 experts=32 top_k=4 source=test', 'request,phase,position,layer,experts,weights'];
  // 6 requests, 24 positions; requests of even and odd ids favour different experts.
  for (let r = 0; r < 6; r++) {
    for (let p = 0; p < 24; p++) {
      for (let l = 0; l < 4; l++) {
        const base = (r % 2) * 16 + ((p + l) % 4);
        lines.push(`${r},${p < 2 ? 'prefill' : 'decode'},${p},${l},${base} ${base + 4} ${base + 8} ${(base + 12) % 32},`);
      }
    }
  }
  writeFileSync(trace, lines.join('\n') + '\n');
  const s = await startTestServer(t, dir4, { engine: { policy: 'expert-aware', prefillFirst: true, maxBatchTokens: 3, maxRunning: 16, replayTrace: trace } });
  t.same(await streamMany(s.url, 12), new Array(12).fill(200));
  const m = parseMetrics(await (await request(`${s.url}/metrics`)).body.text());
  const l = '{policy="expert-aware"}';
  const steps = m.get(`moe_batch_distinct_experts_per_step_count${l}`) ?? 0;
  t.ok(steps > 0, `${steps} steps with routing seen`);
  const mean = (m.get(`moe_batch_distinct_experts_per_step_sum${l}`) ?? 0) / steps;
  t.ok(mean >= 4 && mean <= 12, `distinct experts per step ${mean.toFixed(2)} (k = 4, at most 3 tokens)`);
  t.ok((m.get(`moe_batch_regrouped_picks_total${l}`) ?? 0) > 0, 'regrouped with the replayed routing as hints');
  t.same([...m.keys()].filter((k) => k.startsWith('moe_expert_cache')), [], 'no offload samples');
});
