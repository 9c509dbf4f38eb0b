// Expert-aware batching benchmark (issue 6, point 5): `npm run bench:batching`.
//
// The server (in this process: Fastify app + engine worker, as bench:serve) on the
// synthetic Qwen3-30B-A3B-shaped checkpoint (8 of its 48 layers, 128 experts, top-8;
// Q8_0 in memory; bench/lib/bench-models.ts), routed experts offloaded with half of each
// layer's experts in the fast tier (capacity 0.5, demand-loaded LRU without prefetch by
// default, as in `moe-serve sim`, so the effect of grouping on loads is not mixed with
// prefetching; with the server's schedule-aware eviction, offloadPlanSteps, for both
// policies), and every token's experts replayed from a many-request trace synthesized
// from the real one (synthesizeTrace --like ../shared/traces/qwen3-30b-a3b.trace.csv,
// written to a temporary file): random weights route almost uniformly, real models do not.
//
// Workload: 64 streaming /v1/completions requests at once (undici, 64 connections), the
// same for every policy: one-token prompts (ids), ignore_eos, the same max_tokens and
// seeds. "64 runnable, steps of 8": maxRunning 64, maxBatchTokens 8 and prefillFirst (the
// 64 prompts are admitted first, 8 per step; then the 64 decoding sequences take turns,
// 8 tokens a step). Each policy runs on a fresh engine (cold cache, same sequence ids, so
// the same routing replay): FCFS (round robin) and expert-aware (each sequence's recent
// routing, src/scheduler/recent-routing.ts; the resident set; fairness bound
// BENCH_BATCHING_EXTRA_WAIT steps beyond FCFS: default 1, so that a token's gap is at most
// 9 steps where FCFS's is 8, inside the 1.2x p99 inter-token latency target).
//
// The yardstick, in the same run: the batching simulator (src/offload/batch-sim.ts) on
// exactly the routing the server replays (replayedRequests: the synthesized trace mapped
// onto the model's layers, BENCH_BATCHING_TOKENS positions per request), with the same
// lanes, step size, cache and fairness bound, for FCFS, the oracle (each token's true
// routing, which no policy knows) and expert-aware: what the oracle saves there is what
// any grouping can save on this workload. Both run LRU over the same visits: in the
// runs here the simulator's FCFS gave 3.83 loads per token and the server's 3.82-3.83.
//
// Measured per policy: generated tokens/s (client wall time from the first request to the
// last token), inter-token latency p50/p99 (client side, SSE), distinct experts per
// step (mean over layers; from /metrics, decode steps and the admission steps), expert
// loads per generated token (/metrics: cache misses), the policy's own cost (pick seconds
// / wall), regrouped picks and the extra-wait histogram.
//
// Options (environment): BENCH_BATCHING_TOKENS (max_tokens per request, default 12),
// BENCH_BATCHING_REQUESTS (64), BENCH_BATCHING_STEP (maxBatchTokens, 8),
// BENCH_BATCHING_CAPACITY ("0.5"), BENCH_BATCHING_CACHE (lru), BENCH_BATCHING_LOOKAHEAD (0),
// BENCH_BATCHING_PLAN_STEPS (the offloadPlanSteps setting, default 4: eviction keeps what the
// sequences due in the next steps used recently, src/offload/upcoming.ts; 0: plain LRU),
// BENCH_BATCHING_EXTRA_WAIT (1), BENCH_BATCHING_PASSES (2: fcfs, expert-aware, expert-aware,
// fcfs, to cancel a load drift on a shared machine; 1: fcfs then expert-aware),
// BENCH_BATCHING_WARMUP (1: one FCFS pass first, not counted; 0: none. The first engine
// of a process run can be much slower than the ones after it, seen here: 36.6 tok/s
// against 69.3 for the same FCFS pass at the end of the run; the ABBA order cancels only
// a drift linear in time, and credited that start to expert-aware as x1.42),
// BENCH_BATCHING_TRACE (real trace), BENCH_BATCHING_REQUEST_VARIATION and
// BENCH_BATCHING_TOPICS (synth-trace --request-variation/--topics: per-request expert
// preferences; default 0, every request routed like the real one), BENCH_THREADS (2),
// BENCH_OFFLOAD_DIR (expert file dir).
// The last line is JSON: distinct_experts_reduction, throughput_vs_fcfs, p99_itl_vs_fcfs,
// loads_per_token_vs_fcfs, and `figures`: [{name, value, unit, compared_to}], the
// simulator's among them (sim_*; distinct_reduction_share_of_oracle: the measured
// distinct-experts saving over the simulated oracle's).

import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Pool } from 'undici';
import { startEngine } from '../src/engine/engine-client.js';
import type { EngineOptions } from '../src/engine/protocol.js';
import { MoeTokenizer } from '../src/model/tokenizer.js';
import { batchReport } from '../src/cli/sim-cmd.js';
import { WEIGHT_FORMATS } from '../src/engine/native-runner.js';
import { readModelSpec } from '../src/model/hf-config.js';
import { BATCH_CACHES, runBatchSim, type BatchCacheName } from '../src/offload/batch-sim.js';
import { DEFAULT_PLAN_STEPS } from '../src/offload/upcoming.js';
import { expertSlotBytes, slotsPerLayer } from '../src/offload/capacity.js';
import { replayedRequests } from '../src/offload/replay.js';
import { DEFAULT_TIMING } from '../src/offload/simulator.js';
import { synthesizeTrace } from '../src/offload/synth-trace.js';
import { loadTrace } from '../src/offload/trace.js';
import { buildApp } from '../src/server/app.js';
import { BENCH_MODELS, ensureCheckpoint } from './lib/bench-models.js';
import type { Figure } from './lib/figures.js';
import { sseObjects } from './lib/sse.js';

const here = dirname(fileURLToPath(import.meta.url));
const env = process.env;
const TOKENS = Number(env.BENCH_BATCHING_TOKENS ?? 12);
const REQUESTS = Number(env.BENCH_BATCHING_REQUESTS ?? 64);
const STEP = Number(env.BENCH_BATCHING_STEP ?? 8);
const CAPACITY = env.BENCH_BATCHING_CAPACITY ?? '0.5';
const CACHE = env.BENCH_BATCHING_CACHE ?? 'lru';
const LOOKAHEAD = Number(env.BENCH_BATCHING_LOOKAHEAD ?? 0);
const PLAN_STEPS = Number(env.BENCH_BATCHING_PLAN_STEPS ?? DEFAULT_PLAN_STEPS);
const EXTRA_WAIT = Number(env.BENCH_BATCHING_EXTRA_WAIT ?? 1);
const PASSES = Number(env.BENCH_BATCHING_PASSES ?? 2);
const WARMUP = (env.BENCH_BATCHING_WARMUP ?? '1') !== '0';
const THREADS = Number(env.BENCH_THREADS ?? 2);
const VARIATION = Number(env.BENCH_BATCHING_REQUEST_VARIATION ?? 0);
const TOPICS = env.BENCH_BATCHING_TOPICS === undefined ? undefined : Number(env.BENCH_BATCHING_TOPICS);
const TRACE = resolve(env.BENCH_BATCHING_TRACE ?? join(here, '..', '..', 'shared', 'traces', 'qwen3-30b-a3b.trace.csv'));
if (!existsSync(TRACE)) throw new Error(`routing trace ${TRACE} not found; set BENCH_BATCHING_TRACE to a moe-trace v1 file (the default is ../shared/traces beside the project)`);
const MODEL_ID = 'qwen3-30b-a3b-8l';
type PolicyName = 'fcfs' | 'expert-aware';

const log = (s: string) => console.log(s);
const round = (v: number, d: number) => Math.round(v * 10 ** d) / 10 ** d;

function pct(xs: number[], p: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
}

function parseMetrics(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$/.exec(line);
    if (m) out.set(m[1], Number(m[2]));
  }
  return out;
}

function sum(m: Map<string, number>, name: string): number {
  let s = 0;
  for (const [k, v] of m) if (k === name || k.startsWith(name + '{')) s += v;
  return s;
}

interface RunResult {
  policy: PolicyName;
  wallS: number;
  tokens: number;
  tps: number;
  itl: number[];
  ttft: number[];
  distinctPerStep: number;
  steps: number;
  loadsPerToken: number;
  regrouped: number;
  duePicks: number;
  pickSeconds: number;
  /** Seconds in the scheduler's whole call (hints, resident set, pick, plan), every policy. */
  scheduleSeconds: number;
  extraWaitMean: number;
}

async function runPolicy(policy: PolicyName, modelDir: string, tokenizer: MoeTokenizer, trace: string, expertDir: string): Promise<RunResult> {
  const opts: EngineOptions = {
    modelDir,
    modelId: MODEL_ID,
    runner: 'native',
    weights: 'q8',
    threads: THREADS,
    kvBlockSize: 16,
    kvBlocks: Math.max(256, Math.ceil(((TOKENS + 16) * REQUESTS) / 16) + 16),
    maxBatchTokens: STEP,
    maxRunning: REQUESTS,
    maxWaiting: REQUESTS * 2,
    policy,
    policyOptions: { maxExtraWaitSteps: EXTRA_WAIT, missPenalty: 2 },
    prefillFirst: true,
    offload: { capacity: CAPACITY, policy: CACHE, lookahead: LOOKAHEAD, planSteps: PLAN_STEPS, ioThreads: 2, dir: expertDir },
    replayTrace: trace,
  };
  const t0 = performance.now();
  const engine = startEngine(opts);
  await engine.ready;
  log(`  ${policy}: engine ready in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  const app = buildApp({ engine, tokenizer });
  const url = await app.listen({ host: '127.0.0.1', port: 0 });
  const pool = new Pool(url, { connections: REQUESTS, pipelining: 1 });
  try {
    const itl: number[] = [];
    const ttft: number[] = [];
    let tokens = 0;
    const start = performance.now();
    let end = start;
    await Promise.all(
      Array.from({ length: REQUESTS }, async (_, i) => {
        const sent = performance.now();
        const r = await pool.request({
          path: '/v1/completions',
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ model: MODEL_ID, prompt: [100 + i], max_tokens: TOKENS, temperature: 0.8, seed: i, ignore_eos: true, stream: true, stream_options: { include_usage: true } }),
        });
        if (r.statusCode !== 200) throw new Error(`HTTP ${r.statusCode}: ${await r.body.text()}`);
        let last = 0;
        for await (const obj of sseObjects(r.body)) {
          if (obj.usage) tokens += obj.usage.completion_tokens;
          if (!obj.choices?.[0]?.text) continue;
          const now = performance.now();
          if (last === 0) ttft.push(now - sent);
          else itl.push(now - last);
          last = now;
          if (now > end) end = now;
        }
      }),
    );
    const wallS = (end - start) / 1000;
    const m = parseMetrics(await (await pool.request({ path: '/metrics', method: 'GET' })).body.text());
    const l = `{policy="${policy}"}`;
    const steps = m.get(`moe_batch_distinct_experts_per_step_count${l}`) ?? 0;
    const misses = sum(m, 'moe_expert_cache_misses_total');
    const extraTokens = m.get(`moe_batch_extra_wait_steps_count${l}`) ?? 0;
    return {
      policy,
      wallS,
      tokens,
      tps: tokens / wallS,
      itl,
      ttft,
      distinctPerStep: steps > 0 ? (m.get(`moe_batch_distinct_experts_per_step_sum${l}`) ?? 0) / steps : NaN,
      steps,
      loadsPerToken: misses / Math.max(1, tokens),
      regrouped: m.get(`moe_batch_regrouped_picks_total${l}`) ?? 0,
      duePicks: m.get(`moe_batch_due_picks_total${l}`) ?? 0,
      pickSeconds: m.get(`moe_batch_policy_pick_seconds_total${l}`) ?? 0,
      scheduleSeconds: m.get(`moe_batch_schedule_seconds_total${l}`) ?? 0,
      extraWaitMean: extraTokens > 0 ? (m.get(`moe_batch_extra_wait_steps_sum${l}`) ?? 0) / extraTokens : 0,
    };
  } finally {
    await pool.close();
    await app.close();
    await engine.close();
  }
}

function mergeRuns(rs: RunResult[]): RunResult {
  const a = rs[0];
  if (rs.length === 1) return a;
  const wallS = rs.reduce((s, r) => s + r.wallS, 0);
  const tokens = rs.reduce((s, r) => s + r.tokens, 0);
  const steps = rs.reduce((s, r) => s + r.steps, 0);
  return {
    ...a,
    wallS,
    tokens,
    tps: tokens / wallS,
    itl: rs.flatMap((r) => r.itl),
    ttft: rs.flatMap((r) => r.ttft),
    steps,
    distinctPerStep: rs.reduce((s, r) => s + r.distinctPerStep * r.steps, 0) / steps,
    loadsPerToken: rs.reduce((s, r) => s + r.loadsPerToken * r.tokens, 0) / tokens,
    regrouped: rs.reduce((s, r) => s + r.regrouped, 0),
    duePicks: rs.reduce((s, r) => s + r.duePicks, 0),
    pickSeconds: rs.reduce((s, r) => s + r.pickSeconds, 0),
    scheduleSeconds: rs.reduce((s, r) => s + r.scheduleSeconds, 0),
    extraWaitMean: rs.reduce((s, r) => s + r.extraWaitMean, 0) / rs.length,
  };
}

/** Simulator figures of one scheduler against FCFS (batchReport's shape). */
interface SimFigures {
  distinct: number;
  loads: number;
  p99GapVsFcfs: number;
  throughputVsFcfs: number;
}

/**
 * The yardstick in the same run: the batching simulator on exactly the routing the server
 * replays (the synthesized trace mapped onto the model's layers, TOKENS positions per
 * request), with the bench's step size, lanes, cache and fairness bound, for FCFS, the
 * oracle (true routing, which no policy knows) and expert-aware (recent routing, as the
 * server predicts). What the oracle saves is what any grouping can save here.
 */
async function simulateYardstick(trace: string, modelDir: string): Promise<{ fcfs: SimFigures; oracle: SimFigures; ours: SimFigures; slots: number } | string> {
  if (!(BATCH_CACHES as readonly string[]).includes(CACHE)) return `the simulator has no ${CACHE} cache (it has ${BATCH_CACHES.join(', ')})`;
  if (LOOKAHEAD > 0) return 'the simulator does not prefetch (lookahead > 0)';
  const spec = readModelSpec(modelDir);
  const slots = slotsPerLayer(CAPACITY, { layers: spec.numLayers, experts: spec.numExperts, slotBytes: expertSlotBytes(WEIGHT_FORMATS.q8, spec.hiddenSize, spec.expertIntermediateSize).slotBytes });
  const { header, requests } = await loadTrace(trace);
  // Sequences beyond the file's requests would replay them again (i mod R): the
  // simulator's lanes take each request once, so it needs one request per stream.
  if (requests.length < REQUESTS) return `the trace holds ${requests.length} requests for ${REQUESTS} streams`;
  const src = replayedRequests(header, requests.slice(0, REQUESTS), { layers: spec.numLayers, experts: spec.numExperts }, TOKENS);
  const base = { batch: STEP, concurrency: REQUESTS, capacity: slots, cache: CACHE as BatchCacheName, planSteps: PLAN_STEPS, policy: { maxExtraWaitSteps: EXTRA_WAIT, missPenalty: 2 } };
  const fcfs = await runBatchSim(src, { ...base, scheduler: 'fcfs' });
  const oracle = await runBatchSim(src, { ...base, scheduler: 'oracle' });
  const ours = await runBatchSim(src, { ...base, scheduler: 'expert-aware' });
  const pick = (r: typeof fcfs): SimFigures => {
    const o = batchReport(trace, r, fcfs, null) as Record<string, number>;
    return { distinct: o.distinct_experts_per_step, loads: o.loads_per_token, p99GapVsFcfs: o.p99_gap_vs_fcfs, throughputVsFcfs: o.throughput_vs_fcfs };
  };
  return { fcfs: pick(fcfs), oracle: pick(oracle), ours: pick(ours), slots };
}

async function main(): Promise<void> {
  const t0 = performance.now();
  const modelDir = ensureCheckpoint(BENCH_MODELS.qwen, log);
  const work = mkdtempSync(join(env.BENCH_OFFLOAD_DIR ?? tmpdir(), 'moe-bench-batching-'));
  try {
    const trace = join(work, 'synth.trace.csv');
    const ts = performance.now();
    const synth = await synthesizeTrace({ like: TRACE, out: trace, requests: REQUESTS, tokensPerRequest: Math.max(32, TOKENS + 8), seed: 1, requestVariation: VARIATION, topics: TOPICS });
    log(
      `batching bench: synthesized ${REQUESTS} requests like ${TRACE} (${synth.header.layers} layers, ${synth.header.experts} experts, top-${synth.header.topK}; request variation ${VARIATION}, ${TOPICS ?? REQUESTS} topics) in ${((performance.now() - ts) / 1000).toFixed(1)} s`,
    );
    log(
      `  model ${modelDir} (q8, ${THREADS} threads), experts offloaded: capacity ${CAPACITY}, cache ${CACHE}, lookahead ${LOOKAHEAD}, plan steps ${PLAN_STEPS}; ` +
        `${REQUESTS} concurrent streams, 1-token prompts, ${TOKENS} tokens each (ignore_eos), maxRunning ${REQUESTS}, maxBatchTokens ${STEP}, prefillFirst; expert-aware extra-wait bound ${EXTRA_WAIT} step(s)`,
    );
    const yard = await simulateYardstick(trace, modelDir);
    if (typeof yard === 'string') log(`  simulator yardstick skipped: ${yard}`);
    else {
      const line = (name: string, r: SimFigures) =>
        `    ${name.padEnd(13)} distinct/step ${r.distinct.toFixed(2)} (${((r.distinct / yard.fcfs.distinct - 1) * 100).toFixed(1)}%), loads/token ${r.loads.toFixed(2)} (x${(r.loads / yard.fcfs.loads).toFixed(3)}), ` +
        `p99 gap x${r.p99GapVsFcfs.toFixed(3)}, simulated throughput x${r.throughputVsFcfs.toFixed(3)}`;
      log(
        `  simulator on the routing the server replays (${TOKENS} positions per request), ${REQUESTS} lanes in steps of ${STEP}, ${CACHE} cache of ${yard.slots} experts per layer, ` +
          `extra wait <= ${EXTRA_WAIT} step(s); simulated time: loads at ${DEFAULT_TIMING.loadBandwidth / 1e9} GB/s, experts at ${DEFAULT_TIMING.computeBandwidth / 1e9} GB/s, ${DEFAULT_TIMING.layerBaseSeconds * 1e3} ms per layer:\n` +
          [line('fcfs', yard.fcfs), line('oracle', yard.oracle), line('expert-aware', yard.ours)].join('\n'),
      );
    }
    const tokenizer = await MoeTokenizer.load(modelDir);
    const order: PolicyName[] = PASSES >= 2 ? ['fcfs', 'expert-aware', 'expert-aware', 'fcfs'] : ['fcfs', 'expert-aware'];
    const runs: RunResult[] = [];
    const warmupTps: number[] = [];
    const warmups: PolicyName[] = WARMUP ? ['fcfs'] : [];
    for (const [i, p] of [...warmups, ...order].entries()) {
      const warm = i < warmups.length;
      const r = await runPolicy(p, modelDir, tokenizer, trace, work);
      log(
        `  ${warm ? `warm-up, not counted: ${p}` : p.padEnd(12)} ${r.tps.toFixed(2)} tok/s (${r.tokens} tokens in ${r.wallS.toFixed(1)} s), itl p50 ${pct(r.itl, 50).toFixed(0)} p99 ${pct(r.itl, 99).toFixed(0)} ms, ` +
          `distinct experts/step ${r.distinctPerStep.toFixed(2)} over ${r.steps} steps, loads/token ${r.loadsPerToken.toFixed(2)}, regrouped ${r.regrouped}, due ${r.duePicks}, ` +
          `extra wait mean ${r.extraWaitMean.toFixed(2)} steps, policy cost ${((r.pickSeconds / r.wallS) * 100).toFixed(3)}% of wall (scheduling in all ${((r.scheduleSeconds / r.wallS) * 100).toFixed(3)}%)`,
      );
      if (warm) warmupTps.push(r.tps);
      else runs.push(r);
    }
    const fcfs = mergeRuns(runs.filter((r) => r.policy === 'fcfs'));
    const ours = mergeRuns(runs.filter((r) => r.policy === 'expert-aware'));
    const figures: Figure[] = [];
    const fig = (name: string, value: number, unit: string, compared_to: string | null = null) =>
      figures.push({ name, value: round(value, unit === 'ratio' || unit === 'fraction' ? 4 : 3), unit, compared_to });
    for (const r of [fcfs, ours]) {
      const n = r.policy === 'fcfs' ? 'fcfs' : 'expert_aware';
      const vs = r.policy === 'fcfs' ? null : (x: string) => `fcfs_${x}`;
      fig(`${n}_throughput`, r.tps, 'tokens/s', vs ? vs('throughput') : null);
      fig(`${n}_itl_p50`, pct(r.itl, 50), 'ms', vs ? vs('itl_p50') : null);
      fig(`${n}_itl_p99`, pct(r.itl, 99), 'ms', vs ? vs('itl_p99') : null);
      fig(`${n}_ttft_p99`, pct(r.ttft, 99), 'ms', vs ? vs('ttft_p99') : null);
      fig(`${n}_distinct_experts_per_step`, r.distinctPerStep, 'experts', vs ? vs('distinct_experts_per_step') : null);
      fig(`${n}_loads_per_token`, r.loadsPerToken, 'loads', vs ? vs('loads_per_token') : null);
      fig(`${n}_extra_wait_mean`, r.extraWaitMean, 'steps', null);
    }
    for (const [i, v] of warmupTps.entries()) fig(`warmup_run${i + 1}_throughput`, v, 'tokens/s', 'not counted: the first engine of the run');
    fig('expert_aware_regrouped_picks', ours.regrouped, 'picks', null);
    fig('expert_aware_policy_cost', ours.pickSeconds / ours.wallS, 'fraction', 'expert_aware_wall_time');
    fig('expert_aware_schedule_cost', ours.scheduleSeconds / ours.wallS, 'fraction', `expert_aware_wall_time (fcfs: ${round(fcfs.scheduleSeconds / fcfs.wallS, 5)})`);
    const distinctReduction = 1 - ours.distinctPerStep / fcfs.distinctPerStep;
    const throughputVs = ours.tps / fcfs.tps;
    const p99Vs = pct(ours.itl, 99) / pct(fcfs.itl, 99);
    const loadsVs = ours.loadsPerToken / fcfs.loadsPerToken;
    if (typeof yard !== 'string') {
      const timing = 'simulated time (DEFAULT_TIMING)';
      fig('sim_fcfs_distinct_experts_per_step', yard.fcfs.distinct, 'experts', null);
      fig('sim_fcfs_loads_per_token', yard.fcfs.loads, 'loads', null);
      for (const [n, r] of [['oracle', yard.oracle], ['expert_aware', yard.ours]] as const) {
        fig(`sim_${n}_distinct_experts_reduction`, 1 - r.distinct / yard.fcfs.distinct, 'fraction', 'sim_fcfs_distinct_experts_per_step');
        fig(`sim_${n}_loads_per_token_vs_fcfs`, r.loads / yard.fcfs.loads, 'ratio', 'sim_fcfs_loads_per_token');
        fig(`sim_${n}_p99_gap_vs_fcfs`, r.p99GapVsFcfs, 'ratio', 'sim_fcfs p99 inter-token gap (steps)');
        fig(`sim_${n}_throughput_vs_fcfs`, r.throughputVsFcfs, 'ratio', timing);
      }
      const oracleSaves = 1 - yard.oracle.distinct / yard.fcfs.distinct;
      if (oracleSaves > 0) fig('distinct_reduction_share_of_oracle', distinctReduction / oracleSaves, 'ratio', 'sim_oracle_distinct_experts_reduction');
      log(
        `  measured distinct-experts saving ${(distinctReduction * 100).toFixed(1)}% against the simulated oracle's ${(oracleSaves * 100).toFixed(1)}% on the same routing and bounds; ` +
          `the oracle's simulated throughput x${yard.oracle.throughputVsFcfs.toFixed(3)} is what grouping alone can reach here`,
      );
    }
    fig('distinct_experts_reduction', distinctReduction, 'fraction', 'fcfs_distinct_experts_per_step');
    fig('throughput_vs_fcfs', throughputVs, 'ratio', 'fcfs_throughput');
    fig('p99_itl_vs_fcfs', p99Vs, 'ratio', 'fcfs_itl_p99');
    fig('loads_per_token_vs_fcfs', loadsVs, 'ratio', 'fcfs_loads_per_token');
    log(
      `  expert-aware vs FCFS: distinct experts/step ${distinctReduction >= 0 ? '-' : '+'}${Math.abs(distinctReduction * 100).toFixed(1)}%, loads/token x${loadsVs.toFixed(3)}, throughput x${throughputVs.toFixed(3)} (target >= 1.15), ` +
        `p99 ITL x${p99Vs.toFixed(3)} (target <= 1.2); total ${((performance.now() - t0) / 1000).toFixed(0)} s`,
    );
    console.log(
      JSON.stringify({
        distinct_experts_reduction: round(distinctReduction, 4),
        throughput_vs_fcfs: round(throughputVs, 4),
        p99_itl_vs_fcfs: round(p99Vs, 4),
        loads_per_token_vs_fcfs: round(loadsVs, 4),
        trace: { request_variation: VARIATION, topics: TOPICS ?? REQUESTS },
        cache: { policy: CACHE, plan_steps: PLAN_STEPS },
        figures,
      }),
    );
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

await main();
