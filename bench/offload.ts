// Offload benchmark (issue "Expert offloading", point 6): `npm run bench:offload`.
//
// A synthetic checkpoint shaped like Qwen3-30B-A3B (8 of its 48 layers, the engine
// benchmark's model, Q8_0 in memory) with each token's experts replayed from a real
// routing trace (../shared/traces/qwen3-30b-a3b.trace.csv by default: random weights
// route almost uniformly, real models do not). The fast tier holds a quarter of the
// experts (the experts are 4x its capacity); the rest live in the expert file, read with
// direct I/O. In one process run:
//   - the memory read bandwidth (streaming probe) and the slow tier's read bandwidth
//     (every slot of the fast tier filled through the expert store's own I/O threads,
//     O_DIRECT, cold), measured before and after the decode runs;
//   - single-stream decode tokens/s with every expert resident (same replayed routing);
//   - offloaded decode on demand (LRU, no prefetch) and with our policy (the project's
//     default policy with pre-gating prefetch, at the server's default prefetch threshold:
//     offloadPrefetchMinProbability auto, measured as read-cost.ts does when a model
//     loads), each from a cold cache, in the order
//     on-demand, ours, ours, on-demand (figures: the means of each policy's two runs);
//   - the offload limit: Belady's loads for the decode steps' expert visits as they were
//     recorded, read at the slow tier's bandwidth (the best of the cold fill, the re-read
//     and what the runs' reads got: bytes over the time reads were in flight), overlapped
//     with the resident compute time (the larger of the two), as tokens/s;
//   - cache figures: hit rate, loads (demand + prefetch) against Belady's, prefetches
//     used / wasted, stall-free fraction of layer visits, pre-gating recall/precision;
//   - what reads cost the compute: a decode-sized matmul from memory alone and while the
//     store reads a fill of experts (on a virtual disk served on the guest's CPU budget
//     the compute slows while reads are in flight), and the offload limit with that cost;
//     that limit over on-demand's speed is the most any policy could gain over on-demand
//     in the run (offload_vs_ondemand_ceiling).
// Options (environment): BENCH_THREADS (2), BENCH_OFFLOAD_DECODE (96 decode tokens),
// BENCH_OFFLOAD_TRACE (trace file), BENCH_OFFLOAD_CAPACITY ("0.25": fraction of experts),
// BENCH_OFFLOAD_DIR (expert file directory; default the OS temporary directory),
// BENCH_OFFLOAD_IO_THREADS (the store's I/O threads; default the runner's).
// The last line is JSON: offload_vs_ondemand, offload_limit_fraction (and
// offload_limit_fraction_in_runs: the limit at the runs' own read bandwidth), offload_vs_resident,
// stall_free_fraction, loads_vs_belady, and `figures`: [{name, value, unit, compared_to}].

import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { NativeRunner, packBatch, WEIGHT_FORMATS, type NativeRunnerOptions } from '../src/engine/native-runner.js';
import { loadNative, type NativeEngine } from '../src/engine/native.js';
import type { OffloadStats } from '../src/engine/protocol.js';
import type { ModelRunner, RoutingEvent, StepSequence } from '../src/engine/runner.js';
import { openModel } from '../src/model/checkpoint.js';
import type { ModelSpec } from '../src/model/spec.js';
import { BeladyPolicy } from '../src/offload/belady.js';
import { OffloadRunner } from '../src/offload/offload-runner.js';
import { measureReadCost, PREFETCH_MIN_PROBABILITY_FLOOR, prefetchThreshold } from '../src/offload/read-cost.js';
import { DEFAULT_ONLINE_POLICY } from '../src/offload/policies.js';
import { measurePregating, type PredictionStats } from '../src/offload/prediction.js';
import { RoutingReplay } from '../src/offload/replay.js';
import { BENCH_MODELS, ensureCheckpoint } from './lib/bench-models.js';
import { probeBandwidth, tokenIds } from './lib/engine-bench-common.js';
import type { Figure } from './lib/figures.js';

const here = dirname(fileURLToPath(import.meta.url));
const THREADS = Number(process.env.BENCH_THREADS ?? 2);
const DECODE = Number(process.env.BENCH_OFFLOAD_DECODE ?? 96);
const CAPACITY = process.env.BENCH_OFFLOAD_CAPACITY ?? '0.25';
const TRACE = resolve(process.env.BENCH_OFFLOAD_TRACE ?? join(here, '..', '..', 'shared', 'traces', 'qwen3-30b-a3b.trace.csv'));
const DIR = process.env.BENCH_OFFLOAD_DIR;
const IO_THREADS = process.env.BENCH_OFFLOAD_IO_THREADS ? Number(process.env.BENCH_OFFLOAD_IO_THREADS) : undefined;
const KV_BLOCK_SIZE = 16;
const PREGATING_STEPS = 48;
const PREGATING_LOOKAHEAD = 3;

const log = (s: string) => console.log(s);
const figures: Figure[] = [];
const round = (v: number, d: number) => Math.round(v * 10 ** d) / 10 ** d;
function figure(name: string, value: number, unit: string, compared_to: string | null = null): number {
  figures.push({ name, value: round(value, unit === 'ratio' || unit === 'fraction' ? 4 : 3), unit, compared_to });
  return value;
}

/** Every layer visit of the decode steps: the distinct experts each layer needed, step after step. */
class VisitLog {
  /** (step, layer) -> distinct experts, steps in order. */
  readonly steps: number[][][] = [];
  private current: number[][] | null = null;
  constructor(private readonly layers: number) {}
  onRouting = (e: RoutingEvent): void => {
    if (e.layer === 0) {
      this.current = Array.from({ length: this.layers }, () => []);
      this.steps.push(this.current);
    }
    const seen = new Set<number>();
    for (let i = 0; i < e.ids.length; i++) seen.add(e.ids[i]);
    this.current![e.layer] = [...seen];
  };
}

/**
 * Belady's loads over the recorded visits at `slots[l]` slots of layer l, counted from step
 * `from` on (the steps before it warm the cache the same way for every policy).
 */
function beladyLoads(v: VisitLog, layers: number, experts: number, slots: readonly number[], from: number): number {
  const policy = new BeladyPolicy({ layers, experts, capacity: slots }, { visits: v.steps.length, set: (l, t) => v.steps[t][l] });
  let loads = 0;
  v.steps.forEach((step, t) => {
    for (let l = 0; l < layers; l++) {
      const d = policy.request(l, step[l]);
      if (t >= from) loads += d.loads.length;
    }
  });
  return loads;
}

interface DecodeRun {
  seconds: number;
  tokensPerSecond: number;
  visits: VisitLog;
  tokens: number[];
}

/** Prompt in one step, then DECODE greedy tokens one per step; the decode steps are timed. */
function decode(runner: ModelRunner, visits: VisitLog, prompt: number[], limit: number, afterPrompt?: () => void): DecodeRun {
  const V = runner.spec.vocabSize;
  const positions = prompt.length + DECODE;
  const blocks = Int32Array.from({ length: Math.ceil(positions / KV_BLOCK_SIZE) }, (_, i) => i);
  const entry = (tokens: number[], startPos: number): StepSequence => ({
    seqId: 0,
    tokens: Uint32Array.from(tokens),
    startPos,
    blockTable: blocks.subarray(0, Math.ceil((startPos + tokens.length) / KV_BLOCK_SIZE)),
    wantLogits: true,
  });
  const argmax = (l: Float32Array) => {
    let b = 0;
    for (let i = 1; i < Math.min(V, limit); i++) if (l[i] > l[b]) b = i;
    return b;
  };
  let last = argmax(runner.step([entry(prompt, 0)]).logits);
  afterPrompt?.();
  const tokens: number[] = [];
  const t0 = performance.now();
  for (let i = 0; i < DECODE; i++) {
    tokens.push(last);
    last = argmax(runner.step([entry([last], prompt.length + i)]).logits);
  }
  const seconds = (performance.now() - t0) / 1000;
  return { seconds, tokensPerSecond: DECODE / seconds, visits, tokens };
}

/** Fills every slot of every layer from the expert file through the store (cold, direct I/O); bytes/s. */
function slowTierBandwidth(engine: NativeEngine, spec: ModelSpec, slots: readonly number[], round: number): number {
  const bytesBefore = engine.storeStats().bytesRead;
  const t0 = performance.now();
  for (let l = 0; l < spec.numLayers; l++) {
    // A different expert set per round, so that no read repeats one the disk may have cached.
    for (let s = 0; s < slots[l]; s++) engine.loadExpert(l, (s + round * slots[l]) % spec.numExperts, s);
  }
  for (let l = 0; l < spec.numLayers; l++) for (let s = 0; s < slots[l]; s++) engine.waitExpert(l, (s + round * slots[l]) % spec.numExperts);
  const seconds = (performance.now() - t0) / 1000;
  const bytes = engine.storeStats().bytesRead - bytesBefore;
  for (let l = 0; l < spec.numLayers; l++) for (let s = 0; s < slots[l]; s++) engine.evictSlot(l, s);
  return bytes / seconds;
}

/**
 * What slow-tier reads cost the compute on this host: a decode-sized matmul streamed from
 * memory (the experts' gate/up shape, every thread) timed alone and while the store reads
 * a full fill of experts through its I/O threads, alternately, REPS times each; medians in
 * GB/s of weights, with the slow tier's rate during the timed window. On a machine whose
 * disk reads cost CPU time (a virtual disk served by the host on the guest's budget) the
 * second is lower, and the compute of offloaded decode slows while reads are in flight.
 */
function readInterference(engine: NativeEngine, spec: ModelSpec, slots: readonly number[]): { quiet: number; reading: number; readRate: number } {
  const native = loadNative();
  const REPS = 3;
  const SECONDS = 0.2;
  const rows = 2 * spec.expertIntermediateSize;
  const cols = spec.hiddenSize;
  const rate = () => {
    const r = native.kernelBench('q8_0', rows, cols, 1, THREADS, 512 << 20, SECONDS);
    return r.bytesPerCall / r.seconds / 1e9;
  };
  const quiet: number[] = [];
  const reading: number[] = [];
  const readRate: number[] = [];
  for (let k = 0; k < REPS; k++) {
    quiet.push(rate());
    const expertOf = (l: number, s: number) => (s + (k + 2) * slots[l]) % spec.numExperts;
    for (let l = 0; l < spec.numLayers; l++) for (let s = 0; s < slots[l]; s++) engine.loadExpert(l, expertOf(l, s), s);
    const b0 = engine.storeStats().bytesRead;
    const t0 = performance.now();
    reading.push(rate());
    readRate.push((engine.storeStats().bytesRead - b0) / ((performance.now() - t0) / 1000) / 1e9);
    for (let l = 0; l < spec.numLayers; l++) for (let s = 0; s < slots[l]; s++) engine.waitExpert(l, expertOf(l, s));
    for (let l = 0; l < spec.numLayers; l++) for (let s = 0; s < slots[l]; s++) engine.evictSlot(l, s);
  }
  const med = (v: number[]) => [...v].sort((a, b) => a - b)[v.length >> 1];
  return { quiet: med(quiet), reading: med(reading), readRate: med(readRate) };
}

function cacheFigures(prefix: string, st: OffloadStats, decodeLoadsFrom: { loads: number }): { hitRate: number; loads: number; stallFree: number } {
  let hits = 0;
  let misses = 0;
  let issued = 0;
  let used = 0;
  let wasted = 0;
  let visits = 0;
  let stalled = 0;
  for (const l of st.layers) {
    hits += l.hits;
    misses += l.misses;
    issued += l.prefetchIssued - l.prefetchCancelled;
    used += l.prefetchUsed;
    wasted += l.prefetchWasted;
    visits += l.visits;
    stalled += l.stalledVisits;
  }
  const loads = st.loads - decodeLoadsFrom.loads;
  figure(`${prefix}_hit_rate`, hits / Math.max(1, hits + misses), 'fraction');
  figure(`${prefix}_prefetch_reads`, issued, 'experts');
  figure(`${prefix}_prefetch_used`, used, 'experts');
  figure(`${prefix}_prefetch_wasted`, wasted, 'experts');
  const stallFree = visits > 0 ? 1 - stalled / visits : 1;
  return { hitRate: hits / Math.max(1, hits + misses), loads, stallFree };
}

async function main(): Promise<void> {
  if (!existsSync(TRACE)) throw new Error(`routing trace ${TRACE} not found; set BENCH_OFFLOAD_TRACE to a moe-trace v1 file`);
  const modelDir = ensureCheckpoint(BENCH_MODELS.qwen, log);
  const m = await openModel(modelDir);
  const spec = m.spec;
  const L = spec.numLayers;
  const E = spec.numExperts;
  const replay = await RoutingReplay.load(TRACE, { layers: L, experts: E });
  log(`model ${BENCH_MODELS.qwen.preset}: ${L} layers x ${E} experts, top-${spec.topK}; routing replayed from ${replay.describe()}`);
  const promptLen = Math.min(28, 64);
  const prompt = tokenIds(promptLen, 11, 1000, Math.min(spec.vocabSize, 30000));
  const limit = Math.min(spec.vocabSize, 30000);
  const kvBlocks = Math.ceil((promptLen + DECODE) / KV_BLOCK_SIZE) + 1;
  // Each step's logits are read at once (greedy), as the engine loop does: one reused buffer.
  const base: NativeRunnerOptions = { weights: 'q8', threads: THREADS, kvBlockSize: KV_BLOCK_SIZE, kvBlocks, reuseLogits: true };

  const memBw0 = probeBandwidth(THREADS);

  // All-resident decode with the same replayed routing.
  let resident: DecodeRun;
  let pregating: PredictionStats[] = [];
  {
    const visits = new VisitLog(L);
    const t0 = performance.now();
    const runner = NativeRunner.fromCheckpoint(spec, m.weights, { ...base, replay, onRouting: visits.onRouting });
    log(`resident engine loaded in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    try {
      decode(runner, new VisitLog(L), prompt, limit); // warm-up pass over the same workload
      resident = decode(runner, visits, prompt, limit);
      // Pre-gating quality on the model's own routing (replayed routing is not the
      // weights' own, so no predictor from hidden states could match it): the prompt,
      // then the decoded tokens one per step.
      const blocks = Int32Array.from({ length: Math.ceil((promptLen + DECODE) / KV_BLOCK_SIZE) }, (_, i) => i);
      const seq = (tokens: number[], startPos: number): StepSequence[] => [
        { seqId: 0, tokens: Uint32Array.from(tokens), startPos, blockTable: blocks.subarray(0, Math.ceil((startPos + tokens.length) / KV_BLOCK_SIZE)), wantLogits: true },
      ];
      const steps = [seq(prompt, 0), ...resident.tokens.slice(0, PREGATING_STEPS).map((tok, i) => seq([tok], promptLen + i))];
      pregating = measurePregating(runner.engine, { layers: L, experts: E, topK: spec.topK }, steps, PREGATING_LOOKAHEAD, packBatch);
    } finally {
      runner.close();
    }
    log(`all-resident decode: ${resident.tokensPerSecond.toFixed(2)} tok/s`);
  }

  // One offloading engine (the expert file is written once); each policy starts cold.
  const t0 = performance.now();
  const first = OffloadRunner.fromCheckpoint(spec, m.weights, { ...base, capacity: CAPACITY, policy: 'lru', lookahead: 0, replay, dir: DIR, ioThreads: IO_THREADS });
  m.close();
  const engine = (first.engine as unknown as NativeEngine);
  const slots = first.slotsByLayer;
  const slotBytes = engine.storeStats().slotBytes;
  log(`offload engine loaded in ${((performance.now() - t0) / 1000).toFixed(1)} s: ${slots[0]} slots per layer of ${E} experts, ${(slotBytes / 1e6).toFixed(2)} MB per expert, direct I/O ${engine.storeStats().direct}`);

  try {
    const diskBw0 = slowTierBandwidth(engine, spec, slots, 0);
    log(`slow tier (cold fill): ${(diskBw0 / 1e9).toFixed(3)} GB/s (direct ${engine.storeStats().direct}); memory: ${memBw0.toFixed(1)} GB/s`);
    // Ours runs with the server's default prefetch threshold (offloadPrefetchMinProbability
    // auto): the read cost measured as the server measures it when the model loads.
    const readCost = measureReadCost(engine, spec, slots, WEIGHT_FORMATS[base.weights], THREADS);
    const oursMinProb = prefetchThreshold(readCost);
    log(
      `ours' prefetch threshold (auto): ${oursMinProb.toFixed(2)}; the start-up probe found the compute at x${(1 - readCost.slowdown).toFixed(2)} ` +
        `of its speed (${readCost.readingGBs.toFixed(2)} against ${readCost.quietGBs.toFixed(2)} GB/s, reads in flight for ${(100 * readCost.coverage).toFixed(0)}% of the window) ` +
        `while ${readCost.expertsRead} experts were read, in ${readCost.seconds.toFixed(2)} s`,
    );
    figure('ours_prefetch_min_probability', oursMinProb, 'fraction', `max(${PREFETCH_MIN_PROBABILITY_FLOOR}, the compute's slowdown under reads measured at start-up, ${readCost.slowdown.toFixed(3)})`);

    const stallOf = (x: ReturnType<NativeEngine['storeStats']>) => x.stallSeconds.reduce((a, v) => a + v, 0);
    const runPolicy = (name: string, policy: string, lookahead: number) => {
      const visits = new VisitLog(L);
      const prefetchMinProbability = lookahead > 0 ? oursMinProb : undefined;
      const runner = new OffloadRunner(spec, first.kv, first.engine, slots, { policy, lookahead, prefetchMinProbability, replay, onRouting: visits.onRouting, reuseLogits: true });
      // Loads of the decode steps only (demand and prefetch reads): the store's count
      // after the run minus its count once the prompt step is done.
      let loadsAfterPrompt = 0;
      let before = engine.storeStats();
      const noTime = { visit: 0, prefetch: 0, learn: 0, idle: 0 };
      let policyBefore = noTime;
      const r = decode(runner, visits, prompt, limit, () => {
        before = engine.storeStats();
        loadsAfterPrompt = before.loads;
        policyBefore = runner.offloadStats().policySeconds ?? noTime;
      });
      const after = engine.storeStats();
      const st = runner.offloadStats();
      // The runner's own decisions during the decode steps, milliseconds per token.
      const pol = st.policySeconds ?? noTime;
      const perToken = (k: keyof typeof noTime) => ((pol[k] - policyBefore[k]) * 1000) / DECODE;
      const critical = perToken('visit') + perToken('prefetch') + perToken('learn');
      figure(`${name}_policy_ms_per_token`, critical, 'ms', 'visit + prefetch + learn, on the critical path');
      const c = cacheFigures(name, st, { loads: loadsAfterPrompt });
      for (let l = 0; l < L; l++) for (let s = 0; s < slots[l]; s++) engine.evictSlot(l, s);
      // What the slow tier delivered to this run's reads: bytes over the time reads were in flight.
      const bytes = after.bytesRead - before.bytesRead;
      const busy = (after.busySeconds ?? 0) - (before.busySeconds ?? 0);
      log(
        `${name}: ${r.tokensPerSecond.toFixed(2)} tok/s, hit rate ${c.hitRate.toFixed(3)}, stall-free ${c.stallFree.toFixed(3)}, ` +
          `reads ${(bytes / 1e6).toFixed(0)} MB in ${busy.toFixed(2)} s busy (${busy > 0 ? (bytes / busy / 1e9).toFixed(3) : '-'} GB/s), ` +
          `${r.seconds.toFixed(2)} s decoding of which ${(stallOf(after) - stallOf(before)).toFixed(2)} s waiting for reads ` +
          `(prefetch reads paused ${(after.paused ?? 0) - (before.paused ?? 0)} times for demand reads, ${(after.abandoned ?? 0) - (before.abandoned ?? 0)} stopped early); ` +
          `policy ${critical.toFixed(2)} ms/token (visit ${perToken('visit').toFixed(2)}, prefetch ${perToken('prefetch').toFixed(2)}, learn ${perToken('learn').toFixed(2)}; ` +
          `${perToken('idle').toFixed(2)} more while waiting for reads)`,
      );
      return { run: r, stats: st, bytes, busy, ...c };
    };
    // ABBA: each policy once early and once late, so that neither gains from the other
    // having warmed the disk (or its host's cache); the figures are the runs' means.
    const a1 = runPolicy('ondemand_run1', 'lru', 0);
    const b1 = runPolicy('ours_run1', DEFAULT_ONLINE_POLICY, 2);
    const b2 = runPolicy('ours_run2', DEFAULT_ONLINE_POLICY, 2);
    const a2 = runPolicy('ondemand_run2', 'lru', 0);
    const both = (x: typeof a1, y: typeof a1) => ({
      ...y,
      tps: 2 / (1 / x.run.tokensPerSecond + 1 / y.run.tokensPerSecond),
      loads: (x.loads + y.loads) / 2,
      hitRate: (x.hitRate + y.hitRate) / 2,
      stallFree: (x.stallFree + y.stallFree) / 2,
    });
    const ondemand = both(a1, a2);
    const ours = both(b1, b2);
    const diskBw1 = slowTierBandwidth(engine, spec, slots, 1);
    const interference = readInterference(engine, spec, slots);
    const memBw1 = probeBandwidth(THREADS);
    const runs = [a1, b1, b2, a2];
    const inRunBw = runs.reduce((s, x) => s + x.bytes, 0) / Math.max(1e-9, runs.reduce((s, x) => s + x.busy, 0));
    // The limit uses the best of the slow tier's measured bandwidths (cold fill before the
    // runs, re-read after them, and what the runs' reads got): the conservative choice.
    const diskBw = Math.max(diskBw0, diskBw1, inRunBw);
    const memBw = (memBw0 + memBw1) / 2;
    log(
      `slow tier: ${(diskBw0 / 1e9).toFixed(3)} GB/s cold fill before the runs, ${(diskBw1 / 1e9).toFixed(3)} re-read after, ` +
        `${(inRunBw / 1e9).toFixed(3)} delivered to the runs' reads; the limit uses ${(diskBw / 1e9).toFixed(3)}`,
    );

    // Decode-only loads: the visits of the prompt (one step, or several pieces when a layer
    // needs more experts than it has slots) warm the cache; the last DECODE steps count.
    const steps = ours.run.visits.steps.length;
    const belady = beladyLoads(ours.run.visits, L, E, slots, steps - DECODE);
    const beladyPerToken = belady / DECODE;
    const ioSeconds = (belady * slotBytes) / diskBw;
    const limitSeconds = Math.max(ioSeconds, resident.seconds);
    const limitTps = DECODE / limitSeconds;
    const limitInRunTps = DECODE / Math.max((belady * slotBytes) / inRunBw, resident.seconds);

    // The limit above takes overlapped reads as free for the compute. Where reads cost
    // CPU time, the compute runs at `f` of its speed while they are in flight: with r the
    // read time of Belady's loads and C the resident compute time, a token takes
    // max(r, C + r (1 - f)) at best (the compute left after the reads runs at full speed).
    const f = Math.min(1, interference.reading / interference.quiet);
    const limitReadCostTps = DECODE / Math.max(ioSeconds, resident.seconds + ioSeconds * (1 - f));
    log(
      `compute while the slow tier reads: ${interference.reading.toFixed(2)} GB/s against ${interference.quiet.toFixed(2)} alone (x${f.toFixed(3)}; reads ran at ${interference.readRate.toFixed(2)} GB/s meanwhile); ` +
        `the offload limit with that cost: ${limitReadCostTps.toFixed(2)} tok/s, ours ${(ours.tps / limitReadCostTps).toFixed(3)} of it`,
    );
    figure('compute_alone', interference.quiet, 'GB/s', 'decode-sized matmul from memory, all threads');
    figure('compute_while_reading', interference.reading, 'GB/s', 'compute_alone');
    figure('reads_while_computing', interference.readRate, 'GB/s', 'slow_tier_bandwidth');
    figure('compute_under_reads_fraction', f, 'ratio', 'compute_alone');
    figure('offload_limit_with_read_cost', limitReadCostTps, 'tok/s', 'belady loads at slow_tier_bandwidth, compute slowed to compute_under_reads_fraction while they are read');
    figure('offload_limit_with_read_cost_fraction', ours.tps / limitReadCostTps, 'ratio', 'offload_limit_with_read_cost');
    // The most any policy could gain over on-demand in this run: the offload limit (with
    // the reads' cost to the compute) over on-demand's speed. Where the slow tier is fast
    // (here its re-reads come from the virtual disk's host cache), on-demand is already
    // close to the limit and the 1.5x target lies beyond it.
    const ceiling = limitReadCostTps / ondemand.tps;
    log(
      `what any policy could reach over on-demand in this run: x${ceiling.toFixed(3)} (the offload limit with read cost over on-demand's ${ondemand.tps.toFixed(2)} tok/s; ` +
        `target x1.5${ceiling < 1.5 ? ', beyond it' : ''}); ours x${(ours.tps / ondemand.tps).toFixed(3)}`,
    );
    figure('offload_vs_ondemand_ceiling', ceiling, 'ratio', 'offload_limit_with_read_cost over ondemand_decode');
    figure('memory_bandwidth', memBw, 'GB/s');
    figure('slow_tier_bandwidth_cold', diskBw0 / 1e9, 'GB/s', 'memory_bandwidth');
    figure('slow_tier_bandwidth_reread', diskBw1 / 1e9, 'GB/s', 'memory_bandwidth');
    figure('slow_tier_bandwidth_in_runs', inRunBw / 1e9, 'GB/s', 'memory_bandwidth');
    figure('slow_tier_bandwidth', diskBw / 1e9, 'GB/s', 'memory_bandwidth');
    figure('resident_decode', resident.tokensPerSecond, 'tok/s');
    figure('ondemand_decode', ondemand.tps, 'tok/s', 'offload_limit');
    figure('ours_decode', ours.tps, 'tok/s', 'offload_limit');
    for (const [n, x] of [['ondemand_run1', a1], ['ours_run1', b1], ['ours_run2', b2], ['ondemand_run2', a2]] as const) figure(`${n}_decode`, x.run.tokensPerSecond, 'tok/s', 'offload_limit');
    figure('offload_limit', limitTps, 'tok/s', 'belady loads at slow_tier_bandwidth, overlapped with resident compute');
    figure('offload_limit_in_runs', limitInRunTps, 'tok/s', 'belady loads at slow_tier_bandwidth_in_runs, overlapped with resident compute');
    figure('belady_loads_per_token', beladyPerToken, 'experts');
    for (const p of ours.stats.prediction) {
      log(`pre-gating under replay (the weights' routers against the trace's routing), ${p.distance} layer(s) ahead: recall ${p.recall.toFixed(3)}, precision ${p.precision.toFixed(3)}`);
    }
    {
      const visits = ours.stats.layers.reduce((a, l) => a + l.visits, 0);
      const skipped = ours.stats.pregatingSkipped ?? 0;
      log(`ours skipped pre-gating on ${skipped} of its ${visits} layer visits (its recent precision near chance; probe steps keep measuring it)`);
      figure('ours_pregating_skipped_fraction', visits > 0 ? skipped / visits : 0, 'fraction', 'layer visits of ours_run2');
    }
    for (const p of ours.stats.coPrediction ?? []) {
      log(`co-occurrence forecast under replay (learned online), ${p.distance} layer(s) ahead: recall ${p.recall.toFixed(3)}, precision ${p.precision.toFixed(3)}`);
      figure(`cooccurrence_recall_d${p.distance}`, p.recall, 'fraction', `chance ${replay.k}/${E}`);
    }
    for (const p of pregating) {
      log(`pre-gating, model's own routing, ${p.distance} layer(s) ahead: recall ${p.recall.toFixed(3)}, precision ${p.precision.toFixed(3)} (top-${spec.topK} of ${E}; chance ${(spec.topK / E).toFixed(3)})`);
      figure(`pregating_recall_d${p.distance}`, p.recall, 'fraction', `chance ${spec.topK}/${E}`);
      figure(`pregating_precision_d${p.distance}`, p.precision, 'fraction', `chance ${spec.topK}/${E}`);
    }
    figure('ondemand_loads_per_token', ondemand.loads / DECODE, 'experts', 'belady_loads_per_token');
    figure('ours_loads_per_token', ours.loads / DECODE, 'experts', 'belady_loads_per_token');
    figure('ondemand_loads_vs_belady', ondemand.loads / belady, 'ratio', 'belady_loads_per_token');
    const res = {
      offload_vs_ondemand: figure('offload_vs_ondemand', ours.tps / ondemand.tps, 'ratio', 'ondemand_decode'),
      offload_limit_fraction: figure('offload_limit_fraction', ours.tps / limitTps, 'ratio', 'offload_limit'),
      offload_limit_fraction_in_runs: figure('offload_limit_fraction_in_runs', ours.tps / limitInRunTps, 'ratio', 'offload_limit_in_runs'),
      offload_vs_resident: figure('offload_vs_resident', ours.tps / resident.tokensPerSecond, 'ratio', 'resident_decode'),
      stall_free_fraction: figure('stall_free_fraction', ours.stallFree, 'fraction'),
      loads_vs_belady: figure('loads_vs_belady', ours.loads / belady, 'ratio', 'belady_loads_per_token'),
    };
    console.log(JSON.stringify({ ...res, figures }));
  } finally {
    first.close();
  }
}

main().catch((e) => {
  console.error(e instanceof Error ? (e.stack ?? e.message) : String(e));
  process.exit(1);
});
