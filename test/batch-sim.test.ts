// Batch-formation simulator (issue 6): FCFS vs the expert-aware policy vs the oracle on
// a structured synthetic trace, fairness figures, and the CLI's --json keys.

import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { main } from '../src/cli/main.js';
import { fairnessVsFcfs, runBatchSim, type BatchSimOptions } from '../src/offload/batch-sim.js';
import type { TraceHeader, TraceRequest } from '../src/offload/trace.js';
import { tempDir } from './helpers/models.js';
import { topicTrace } from './helpers/topic-trace.js';

const L = 4;
const E = 32;
const K = 2;
const header: TraceHeader = { model: 'toy', layers: L, experts: E, topK: K, source: 'test' };

/** Requests on 4 topics, a token keeping its predecessor's experts with probability 0.7 (helpers/topic-trace.ts). */
function structured(requests: number, tokens: number, seed = 1): TraceRequest[] {
  return topicTrace(requests, tokens, { layers: L, topK: K, keep: 0.7, seed, varyLength: true });
}

function toCsv(reqs: TraceRequest[]): string {
  let s = `# moe-trace v1\n# model=toy layers=${L} experts=${E} top_k=${K} source=test\nrequest,phase,position,layer,experts,weights\n`;
  for (const r of reqs) for (const tok of r.tokens) for (let l = 0; l < L; l++) s += `${r.id},${tok.phase},${tok.position},${l},${tok.experts[l * K]} ${tok.experts[l * K + 1]},\n`;
  return s;
}

const reqs = structured(120, 20);
const src = { header, requests: reqs };
const base: Omit<BatchSimOptions, 'scheduler'> = { batch: 4, concurrency: 16, capacity: 12 };

t.test('oracle >= expert-aware >= fcfs in savings, within the fairness bound', async (t) => {
  const fcfs = await runBatchSim(src, { ...base, scheduler: 'fcfs' });
  const ours = await runBatchSim(src, { ...base, scheduler: 'expert-aware' });
  const oracle = await runBatchSim(src, { ...base, scheduler: 'oracle' });
  const total = reqs.reduce((a, r) => a + r.tokens.length, 0);
  for (const r of [fcfs, ours, oracle]) {
    t.equal(r.tokens, total, `${r.scheduler}: every token runs once`);
    t.equal(r.requests, reqs.length);
  }
  t.ok(oracle.distinctPerStep < ours.distinctPerStep, `distinct: oracle ${oracle.distinctPerStep} < ours ${ours.distinctPerStep}`);
  t.ok(ours.distinctPerStep < fcfs.distinctPerStep * 0.97, `distinct: ours ${ours.distinctPerStep} saves >= 3% of fcfs ${fcfs.distinctPerStep}`);
  t.ok(oracle.loadsPerToken <= ours.loadsPerToken, `loads: oracle ${oracle.loadsPerToken} <= ours ${ours.loadsPerToken}`);
  t.ok(ours.loadsPerToken < fcfs.loadsPerToken, `loads: ours ${ours.loadsPerToken} < fcfs ${fcfs.loadsPerToken}`);

  // FCFS round robin: 16 runnable, 4 per step -> a steady-state token waits 3 steps
  // (fewer only in the first round, when all 16 became ready at once).
  let three = 0;
  let steady = 0;
  for (let i = 0; i < fcfs.tokens; i++) {
    if (!fcfs.steady[i]) continue;
    steady++;
    if (fcfs.waits[i] === 3) three++;
    if (fcfs.waits[i] > 3) {
      t.fail(`fcfs token ${i} waited ${fcfs.waits[i]}`);
      break;
    }
  }
  t.ok(three > steady * 0.95, `${three} of ${steady} steady fcfs tokens waited 3 steps`);
  for (const r of [ours, oracle]) {
    const f = fairnessVsFcfs(r, fcfs);
    t.ok(f.maxExtraWaitSteady <= 4, `${r.scheduler}: steady-state max extra wait ${f.maxExtraWaitSteady} <= 4`);
    t.ok(f.p99ExtraWait <= 4, `${r.scheduler}: p99 extra wait ${f.p99ExtraWait} <= 4`);
    t.ok(r.maxWait <= 3 + 4, `${r.scheduler}: no token waits beyond FCFS's 3 + 4 steps (max ${r.maxWait})`);
    t.ok(f.p99GapVsFcfs <= (3 + 4 + 1) / (3 + 1), `${r.scheduler}: p99 gap ratio ${f.p99GapVsFcfs}`);
  }
  const f0 = fairnessVsFcfs(fcfs, fcfs);
  t.equal(f0.maxExtraWait, 0);

  // The gap factor: FCFS's gap is 4 steps, so 1.25 allows one extra step.
  const gap = await runBatchSim(src, { ...base, scheduler: 'expert-aware', policy: { maxGapFactor: 1.25 } });
  const fg = fairnessVsFcfs(gap, fcfs);
  t.ok(fg.maxExtraWaitSteady <= 1 && fg.p99GapVsFcfs <= 1.25, `gap factor 1.25: max extra ${fg.maxExtraWaitSteady}, p99 gap ratio ${fg.p99GapVsFcfs}`);

  // A tighter bound costs savings but holds.
  const tight = await runBatchSim(src, { ...base, scheduler: 'expert-aware', policy: { maxExtraWaitSteps: 1 } });
  t.ok(fairnessVsFcfs(tight, fcfs).maxExtraWaitSteady <= 1, 'bound 1 holds');
  t.ok(tight.maxWait <= 4);
});

t.test('everything fits: the expert-aware run equals FCFS', async (t) => {
  const small = { ...base, batch: 16, concurrency: 16 };
  const fcfs = await runBatchSim(src, { ...small, scheduler: 'fcfs' });
  const ours = await runBatchSim(src, { ...small, scheduler: 'expert-aware' });
  t.equal(ours.distinctPerStep, fcfs.distinctPerStep);
  t.equal(ours.loads, fcfs.loads);
  t.same([...ours.waits], [...fcfs.waits]);
  t.equal(ours.maxWait, 0);
});

t.test('recent predictor and LFU cache run', async (t) => {
  const fcfs = await runBatchSim(src, { ...base, scheduler: 'fcfs', cache: 'lfu' });
  const r = await runBatchSim(src, { ...base, scheduler: 'expert-aware', predictor: 'recent', cache: 'lfu' });
  t.equal(r.tokens, fcfs.tokens);
  t.ok(r.distinctPerStep < fcfs.distinctPerStep);
  t.ok(fairnessVsFcfs(r, fcfs).maxExtraWaitSteady <= 4);
});

t.test('CLI: sim --scheduler ... --json', async (t) => {
  const dir = tempDir(t);
  const file = join(dir, 'toy.csv');
  writeFileSync(file, toCsv(structured(60, 12, 5)));
  const chunks: string[] = [];
  const orig = process.stdout.write.bind(process.stdout);
  process.stdout.write = ((s: string) => (chunks.push(String(s)), true)) as typeof process.stdout.write;
  let code: number;
  try {
    code = await main(['sim', '--scheduler', 'expert-aware', '--batch', '4', '--concurrency', '16', '--capacity', '12', '--trace', file, '--json']);
  } finally {
    process.stdout.write = orig;
  }
  t.equal(code, 0);
  const j = JSON.parse(chunks.join(''));
  for (const k of ['distinct_experts_per_step', 'loads_per_token', 'p99_extra_wait_steps', 'max_extra_wait_steps', 'p99_gap_vs_fcfs', 'distinct_vs_fcfs', 'loads_vs_fcfs', 'share_of_oracle_distinct_savings', 'pick_us_mean']) {
    t.ok(k in j, `key ${k}`);
  }
  t.equal(j.scheduler, 'expert-aware');
  t.equal(j.fcfs.scheduler, 'fcfs');
  t.equal(j.oracle.scheduler, 'oracle');
  t.ok(j.fcfs.distinct_experts_per_step > 0 && j.loads_per_token > 0);
  t.equal(j.capacity_per_layer, 12);
  t.equal(j.predictor, 'recent', 'default predictor: recent routing, as the server hints');

  const errs: string[] = [];
  const origErr = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((s: string) => (errs.push(String(s)), true)) as typeof process.stderr.write;
  try {
    t.equal(await main(['sim', '--scheduler', 'nope', '--trace', file]), 2);
    t.equal(await main(['sim', '--batch', '4', '--trace', file]), 2, '--batch needs --scheduler');
    t.equal(await main(['sim', '--scheduler', 'expert-aware', '--predictor', 'prev', '--recent-decay', '0.5', '--trace', file]), 2, '--recent-decay needs --predictor recent');
    t.equal(await main(['sim', '--scheduler', 'expert-aware', '--recent-decay', '1', '--trace', file]), 2, 'decay below 1');
    t.equal(await main(['synth-trace', '--like', file, '--requests', '2', '--out', join(dir, 'x.csv'), '--topics', '3']), 2, '--topics needs --request-variation');
    t.equal(await main(['synth-trace', '--like', file, '--requests', '2', '--out', join(dir, 'x.csv'), '--request-variation', '1.5']), 2, 'variation within [0, 1]');
  } finally {
    process.stderr.write = origErr;
  }
  t.match(errs.join(''), /--scheduler must be one of fcfs, oracle, expert-aware/);
});
