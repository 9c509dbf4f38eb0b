// Trace-driven simulation of batch formation (issue 6): which of the runnable requests
// run together in a step, and what that does to distinct experts per step, expert
// loads and fairness.
//
// Semantics:
// - M lanes (concurrency) hold requests from a moe-trace file, streamed in file order;
//   when a lane's request has run its last token, the next request joins that lane at
//   the next step. A request's prefill rows are replayed as its first tokens, one
//   position per token, as decode would produce them (prefill: false skips them).
// - Every lane is runnable: its next token is ready as soon as its previous one ran.
//   Each step the batch policy picks N (batch) of them; each picked lane runs one token.
// - The step's visit of layer l needs the union of its tokens' experts at l: distinct
//   experts per step is that union's size, mean over layers. The expert cache (per-layer
//   LRU by default, `capacity` slots per layer, demand loads only) serves the union;
//   loads per token = demand loads / tokens run. As the server's (offloadPlanSteps), the
//   cache is told before each step which lanes the next planSteps steps run (the ones that
//   waited, in FCFS order, N per step) and keeps what they used recently (upcoming.ts):
//   for every scheduler alike, so the comparison of schedulers stays like for like.
// - Fairness: a token's wait is the number of steps from ready to run. Extra wait is a
//   token's wait minus its wait in the FCFS run of the same trace (same request and
//   position); its inter-token gap is wait + 1 steps.
//
// Schedulers:
// - fcfs: round robin (longest-waiting first) through the project's FCFS policy.
// - expert-aware: ExpertAwarePolicy with what is knowable: each request's routing so far
//   (predictor 'recent', the default and what the server's runners hint: its recent
//   tokens' experts by decayed count, src/scheduler/recent-routing.ts; 'prev': the
//   previous token's experts only) and the cache's resident set.
//   'pregate' emulates a pre-gating predictor of a given accuracy (a what-if: the trace
//   holds no hidden states), to show how the savings grow with prediction accuracy.
// - oracle: the same policy told each token's TRUE routing (which no real policy knows),
//   under the same fairness bound: the yardstick, as Belady is for caches.
//
// Why LRU rather than createCachePolicy's default ('predictive'): the default prefetches
// from hints that the cache simulator builds from a fixed access schedule, and Belady
// needs the schedule's future; here the schedule is what the batch policy decides step
// by step. A demand-only LRU isolates the effect of grouping on loads; LFU variants are
// offered for comparison.

import { ExpertAwarePolicy, type ExpertAwareOptions } from '../scheduler/expert-aware-policy.js';
import { FcfsPolicy } from '../scheduler/fcfs-policy.js';
import type { BatchPolicy, PolicyCandidate, SequenceHints } from '../scheduler/policy.js';
import type { SlotCache } from './cache-policy.js';
import { ForecastPolicy } from './forecast.js';
import { LfuPolicy } from './lfu.js';
import { LruPolicy } from './lru.js';
import { DEFAULT_TIMING, type TimingModel } from './simulator.js';
import { RECENT_ROUTING_DECAY, RecentRouting } from '../scheduler/recent-routing.js';
import { NO_EXPERT, readTrace, type TraceHeader, type TraceRequest, type TraceToken } from './trace.js';
import { requestStream } from './schedule.js';
import { DEFAULT_PLAN_STEPS, upcomingWeights } from './upcoming.js';

export const BATCH_SCHEDULERS = ['fcfs', 'oracle', 'expert-aware'] as const;
export type BatchSchedulerName = (typeof BATCH_SCHEDULERS)[number];
export const BATCH_PREDICTORS = ['prev', 'recent', 'pregate'] as const;
export type BatchPredictorName = (typeof BATCH_PREDICTORS)[number];
/** What the server's runners hint (RecentRouting), so the simulator predicts as the server does. */
export const DEFAULT_BATCH_PREDICTOR: BatchPredictorName = 'recent';
export const BATCH_CACHES = ['lru', 'lfu', 'lfu-decay', 'forecast'] as const;
export type BatchCacheName = (typeof BATCH_CACHES)[number];

export interface BatchSimOptions {
  scheduler: BatchSchedulerName;
  /** Tokens per step (N). */
  batch: number;
  /** Runnable requests (M). */
  concurrency: number;
  /** Cache slots per layer (default: half of the experts). */
  capacity?: number;
  predictor?: BatchPredictorName;
  cache?: BatchCacheName;
  prefill?: boolean;
  policy?: ExpertAwareOptions;
  timing?: TimingModel;
  /** Decay per token of the 'recent' predictor (default RECENT_ROUTING_DECAY). */
  recentDecay?: number;
  /**
   * Schedule-aware eviction (upcoming.ts): the cache keeps the experts that the sequences
   * expected in the next planSteps steps (the ones that did not run, in FCFS order, N per
   * step) used recently, by their RecentRouting. Default DEFAULT_PLAN_STEPS; 0: off.
   */
  planSteps?: number;
  /**
   * 'pregate' predictor: an emulated pre-gating predictor (the server's, from hidden
   * states, which a trace does not hold) that names each true expert of the token with
   * this probability and otherwise a wrong expert (uniform among the others). Default 0.8.
   */
  pregateAccuracy?: number;
}

/** Where requests come from: a trace file (streamed) or requests in memory. */
export type RequestSource = string | { header: TraceHeader; requests: Iterable<TraceRequest> | AsyncIterable<TraceRequest> };

export interface BatchSimResult {
  scheduler: BatchSchedulerName;
  predictor: BatchPredictorName | null;
  pregateAccuracy: number;
  header: TraceHeader;
  batch: number;
  concurrency: number;
  capacity: number;
  cache: BatchCacheName;
  planSteps: number;
  requests: number;
  steps: number;
  /** Steps with a full batch (N tokens). */
  fullSteps: number;
  tokens: number;
  /** Mean over full steps of the distinct experts per layer (mean over layers). */
  distinctPerStep: number;
  /** Same over all steps. */
  distinctPerStepAll: number;
  loads: number;
  loadsPerToken: number;
  hitRate: number;
  /** Per token in file order (request by request, position by position): steps waited. */
  waits: Int32Array;
  /** Per token (same order): 1 when it ran in steady state (all lanes busy, requests left to join). */
  steady: Uint8Array;
  maxWait: number;
  /** Simulated seconds: per layer visit, layer base + distinct × compute + loads × load time (no overlap). */
  seconds: number;
  pickMicrosMean: number;
  pickMicrosP99: number;
  /** Picks that FCFS would not have made, per step (expert-aware and oracle). */
  regroupedPerStep: number;
}

interface Lane {
  req: TraceRequest;
  tokens: TraceToken[];
  next: number;
  seqId: number;
  /** Index of the request's first replayed token among all tokens (file order). */
  base: number;
  readyAt: number;
}

function percentile(xs: ArrayLike<number>, p: number): number {
  const a = Float64Array.from(xs as ArrayLike<number>).sort();
  if (a.length === 0) return 0;
  return a[Math.min(a.length - 1, Math.max(0, Math.ceil(p * a.length) - 1))];
}

/** Runs one scheduler over the source. */
export async function runBatchSim(src: RequestSource, o: BatchSimOptions): Promise<BatchSimResult> {
  const N = o.batch;
  const M = o.concurrency;
  if (!Number.isInteger(N) || N < 1) throw new Error(`batch must be an integer >= 1, got ${N}`);
  if (!Number.isInteger(M) || M < 1) throw new Error(`concurrency must be an integer >= 1, got ${M}`);
  const withPrefill = o.prefill ?? true;
  const predictor: BatchPredictorName = o.predictor ?? DEFAULT_BATCH_PREDICTOR;
  const decay = o.recentDecay ?? RECENT_ROUTING_DECAY;
  const timing = o.timing ?? DEFAULT_TIMING;

  let header: TraceHeader | null = typeof src === 'string' ? null : src.header;
  const iterable = typeof src === 'string' ? readTrace(src, (h) => (header = h)) : src.requests;
  const stream = requestStream(iterable, withPrefill);
  let requests = 0;
  let tokenBase = 0;
  const pull = async (): Promise<{ req: TraceRequest; tokens: TraceToken[]; base: number } | null> => {
    const req = await stream.next();
    if (!req) return null;
    requests++;
    const base = tokenBase;
    tokenBase += req.tokens.length;
    return { req, tokens: req.tokens, base };
  };

  // The header comes with the first row of a file.
  const first = await pull();
  if (header === null) throw new Error('trace has no header');
  const h: TraceHeader = header;
  const { layers: L, experts: E, topK: K } = h;
  const capacity = Math.min(E, o.capacity ?? Math.max(1, Math.floor(E / 2)));
  const cacheName: BatchCacheName = o.cache ?? 'lru';
  const shape = { layers: L, experts: E, capacity };
  // forecast: the server's default policy, demand-only here (no prefetch), told each
  // visit's per-request routing; requests end explicitly (they sit out steps). Without
  // prefetch its routing predictor (prefetch hints only) would be kept up to date for
  // nothing: off, as in the server's runner (same decisions, about 2% less time).
  const forecast = cacheName === 'forecast' ? new ForecastPolicy(shape, { prefetch: false, routingPredictor: false }) : null;
  forecast?.useExplicitEnds();
  const cache: SlotCache =
    forecast ?? (cacheName === 'lru' ? new LruPolicy(shape) : cacheName === 'lfu' ? new LfuPolicy(shape) : new LfuPolicy(shape, { halfLife: 4 }));
  const resident = Array.from({ length: L }, () => new Uint8Array(E));
  const planSteps = o.planSteps ?? DEFAULT_PLAN_STEPS;
  if (!Number.isInteger(planSteps) || planSteps < 0) throw new Error(`plan steps must be an integer >= 0, got ${planSteps}`);
  // Each request's recent routing: the expert-aware policy's 'recent' predictor and the
  // cache's plan read the same one.
  const recent = (predictor === 'recent' && o.scheduler === 'expert-aware') || planSteps > 0 ? new RecentRouting(L, decay) : null;
  const planRecent = planSteps > 0 ? recent : null;
  const upcoming = new Float64Array(planSteps > 0 ? L * E : 0);

  const policy: BatchPolicy = o.scheduler === 'fcfs' ? new FcfsPolicy() : new ExpertAwarePolicy(o.policy);
  const aware = policy instanceof ExpertAwarePolicy ? policy : null;

  let waits = new Int32Array(1 << 12);
  let steady = new Uint8Array(1 << 12);
  const setWait = (i: number, w: number, st: boolean) => {
    if (i >= waits.length) {
      let n = waits.length;
      while (n <= i) n *= 2;
      const x = new Int32Array(n);
      x.set(waits);
      waits = x;
      const y = new Uint8Array(n);
      y.set(steady);
      steady = y;
    }
    waits[i] = w;
    steady[i] = st ? 1 : 0;
  };

  const lanes: (Lane | null)[] = new Array(M).fill(null);
  let pending = first;
  let nextSeq = 0;
  let step = 0;
  let fullSteps = 0;
  let tokensRun = 0;
  let distinctFull = 0;
  let distinctAll = 0;
  let loads = 0;
  let hits = 0;
  let seconds = 0;
  let maxWait = 0;
  let regrouped = 0;
  const pickUs: number[] = [];
  const stamp = new Int32Array(E).fill(-1);
  const union = new Uint16Array(E);
  const tLoad = timing.bytesPerExpert / timing.loadBandwidth;
  const tExpert = timing.bytesPerExpert / timing.computeBandwidth;

  const truthHints = (tok: TraceToken): SequenceHints => {
    const pe: number[][] = [];
    for (let l = 0; l < L; l++) {
      const b = l * K;
      pe.push(tok.experts[b] === NO_EXPERT ? [] : Array.from(tok.experts.subarray(b, b + K)));
    }
    return { predictedExperts: pe };
  };
  const acc = o.pregateAccuracy ?? 0.8;
  if (!(acc >= 0 && acc <= 1)) throw new Error(`pregate accuracy must be in [0, 1], got ${acc}`);
  const pregateHints = (lane: Lane): SequenceHints => {
    const tok = lane.tokens[lane.next];
    const pe: number[][] = [];
    for (let l = 0; l < L; l++) {
      const b = l * K;
      if (tok.experts[b] === NO_EXPERT) {
        pe.push([]);
        continue;
      }
      // Deterministic per (token, layer): every run sees the same predictions.
      let h = Math.imul(lane.base + lane.next + 1, 0x9e3779b1) ^ Math.imul(l + 1, 0x85ebca6b);
      const rnd = () => {
        h = Math.imul(h ^ (h >>> 15), 0x2c1b3c6d);
        h = Math.imul(h ^ (h >>> 12), 0x297a2d39);
        h ^= h >>> 15;
        return (h >>> 0) / 4294967296;
      };
      const truth = tok.experts.subarray(b, b + K);
      const set: number[] = [];
      for (let k = 0; k < K; k++) {
        if (rnd() < acc) {
          if (!set.includes(truth[k])) set.push(truth[k]);
          continue;
        }
        for (let tries = 0; tries < 64; tries++) {
          const e = Math.floor(rnd() * E);
          if (!truth.includes(e) && !set.includes(e)) {
            set.push(e);
            break;
          }
        }
      }
      pe.push(set);
    }
    return { predictedExperts: pe };
  };
  const knownHints = (lane: Lane): SequenceHints | undefined => {
    if (predictor === 'pregate') return pregateHints(lane);
    if (lane.next === 0) return undefined; // nothing known about a request's first token
    if (predictor === 'prev') {
      const prev = lane.tokens[lane.next - 1];
      const pe: number[][] = [];
      for (let l = 0; l < L; l++) {
        const b = l * K;
        pe.push(prev.experts[b] === NO_EXPERT ? [] : Array.from(prev.experts.subarray(b, b + K)));
      }
      return { predictedExperts: pe };
    }
    const h = recent?.hint(lane.seqId);
    return h ? { predictedExperts: h.experts, predictedWeights: h.weights } : undefined;
  };
  const noteRecent = (into: RecentRouting, lane: Lane, tok: TraceToken) => {
    for (let l = 0; l < L; l++) {
      const b = l * K;
      if (tok.experts[b] !== NO_EXPERT) into.observe(lane.seqId, l, tok.experts, b, K);
    }
  };

  for (;;) {
    for (let i = 0; i < M; i++) {
      if (lanes[i] !== null) continue;
      const r = pending ?? (await pull());
      pending = null;
      if (!r) break;
      lanes[i] = { req: r.req, tokens: r.tokens, next: 0, seqId: nextSeq++, base: r.base, readyAt: step };
    }
    // Candidates in FCFS order: longest-waiting first, then lane order.
    const live: Lane[] = [];
    for (const l of lanes) if (l) live.push(l);
    if (live.length === 0) break;
    live.sort((a, b) => a.readyAt - b.readyAt || a.seqId - b.seqId);
    const bySeq = new Map<number, Lane>();
    const cands: PolicyCandidate[] = live.map((lane) => {
      bySeq.set(lane.seqId, lane);
      const tok = lane.tokens[lane.next];
      let hints: SequenceHints | undefined;
      if (o.scheduler === 'oracle') hints = truthHints(tok);
      else if (o.scheduler === 'expert-aware') hints = knownHints(lane);
      return {
        seqId: lane.seqId,
        state: 'running',
        arrival: lane.seqId,
        promptTokens: lane.req.prefillTokens,
        computedTokens: lane.next,
        pendingTokens: 1,
        stepsWaited: step - lane.readyAt,
        hints,
      };
    });
    const picks = policy.pick(cands, { maxTokens: N, maxRunning: M, resident: aware ? resident : undefined });
    if (aware) {
      pickUs.push(aware.lastPickMicros);
      regrouped += aware.lastRegrouped;
    }
    if (picks.length === 0) throw new Error(`scheduler ${o.scheduler} picked nothing at step ${step}`);

    // Run the step.
    const ran: Lane[] = picks.map((p) => bySeq.get(p.seqId)!);
    if (planRecent) {
      // The lanes that wait, in FCFS order (live's), N per step: what the next steps run.
      const ranSet = new Set(ran);
      const next: number[][] = [];
      for (const lane of live) {
        if (ranSet.has(lane)) continue;
        if (next.length === 0 || next[next.length - 1].length === N) {
          if (next.length === planSteps) break;
          next.push([]);
        }
        next[next.length - 1].push(lane.seqId);
      }
      cache.setUpcoming(upcomingWeights(upcoming, L, E, next, (seq) => planRecent.hint(seq), planSteps) ? upcoming : null);
    }
    let distinctSum = 0;
    for (let l = 0; l < L; l++) {
      let n = 0;
      for (const lane of ran) {
        const ex = lane.tokens[lane.next].experts;
        const b = l * K;
        if (ex[b] === NO_EXPERT) continue;
        for (let k = 0; k < K; k++) {
          const e = ex[b + k];
          if (stamp[e] === step * L + l) continue;
          stamp[e] = step * L + l;
          union[n++] = e;
        }
      }
      distinctSum += n;
      if (n === 0) {
        seconds += timing.layerBaseSeconds;
        continue;
      }
      if (forecast) {
        const b = l * K;
        forecast.observeRouting(
          l,
          ran.map((lane) => ({ seq: lane.seqId, experts: lane.tokens[lane.next].experts[b] === NO_EXPERT ? [] : lane.tokens[lane.next].experts.subarray(b, b + K) })),
        );
      }
      const d = cache.request(l, union.subarray(0, n));
      for (const ev of d.evictions) resident[l][ev.expert] = 0;
      for (const ld of d.loads) resident[l][ld.expert] = 1;
      loads += d.loads.length;
      hits += d.hits.length;
      seconds += timing.layerBaseSeconds + n * tExpert + d.loads.length * tLoad;
    }
    distinctAll += distinctSum / L;
    if (ran.length === N) {
      fullSteps++;
      distinctFull += distinctSum / L;
    }
    // Steady state: every lane busy and requests still waiting to join.
    const isSteady = !stream.ended() && live.length === M;
    for (const lane of ran) {
      const w = step - lane.readyAt;
      setWait(lane.base + lane.next, w, isSteady);
      if (w > maxWait) maxWait = w;
      if (recent) noteRecent(recent, lane, lane.tokens[lane.next]);
      lane.next++;
      lane.readyAt = step + 1;
      tokensRun++;
    }
    for (let i = 0; i < M; i++) {
      const lane = lanes[i];
      if (lane && lane.next === lane.tokens.length) {
        recent?.delete(lane.seqId);
        forecast?.endSequence(lane.seqId);
        lanes[i] = null;
      }
    }
    step++;
  }

  return {
    scheduler: o.scheduler,
    predictor: o.scheduler === 'expert-aware' ? predictor : null,
    pregateAccuracy: acc,
    header: h,
    batch: N,
    concurrency: M,
    capacity,
    cache: cacheName,
    planSteps,
    requests,
    steps: step,
    fullSteps,
    tokens: tokensRun,
    distinctPerStep: fullSteps ? distinctFull / fullSteps : step ? distinctAll / step : 0,
    distinctPerStepAll: step ? distinctAll / step : 0,
    loads,
    loadsPerToken: tokensRun ? loads / tokensRun : 0,
    hitRate: hits + loads ? hits / (hits + loads) : 1,
    waits: waits.subarray(0, tokensRun),
    steady: steady.subarray(0, tokensRun),
    maxWait,
    seconds,
    pickMicrosMean: pickUs.length ? pickUs.reduce((a, b) => a + b, 0) / pickUs.length : 0,
    pickMicrosP99: percentile(pickUs, 0.99),
    regroupedPerStep: step ? regrouped / step : 0,
  };
}

export interface FairnessVsFcfs {
  /** Per token: wait - FCFS's wait for the same token, over all tokens. */
  p99ExtraWait: number;
  maxExtraWait: number;
  meanExtraWait: number;
  /**
   * The same over tokens that ran in steady state in both runs. Once the file is
   * exhausted the runs drain at different times (FCFS's last requests run alone with
   * no wait while ours may still be queued), so tokens of the drain compare unlike states.
   */
  p99ExtraWaitSteady: number;
  maxExtraWaitSteady: number;
  /** p99 of inter-token gaps (wait + 1 steps), and its ratio to FCFS's. */
  p99Gap: number;
  p99GapFcfs: number;
  p99GapVsFcfs: number;
}

export function fairnessVsFcfs(r: BatchSimResult, fcfs: BatchSimResult): FairnessVsFcfs {
  if (r.tokens !== fcfs.tokens) throw new Error(`runs differ in tokens: ${r.tokens} vs ${fcfs.tokens}`);
  const extra = new Float64Array(r.tokens);
  const extraSteady: number[] = [];
  let s = 0;
  let mx = -Infinity;
  let mxs = -Infinity;
  for (let i = 0; i < r.tokens; i++) {
    const x = r.waits[i] - fcfs.waits[i];
    extra[i] = x;
    s += x;
    if (x > mx) mx = x;
    if (r.steady[i] && fcfs.steady[i]) {
      extraSteady.push(x);
      if (x > mxs) mxs = x;
    }
  }
  const gap = (w: Int32Array) => percentile(Float64Array.from(w, (x) => x + 1), 0.99);
  const p99Gap = gap(r.waits);
  const p99GapFcfs = gap(fcfs.waits);
  return {
    p99ExtraWait: percentile(extra, 0.99),
    maxExtraWait: r.tokens ? mx : 0,
    meanExtraWait: r.tokens ? s / r.tokens : 0,
    p99ExtraWaitSteady: percentile(extraSteady, 0.99),
    maxExtraWaitSteady: extraSteady.length ? mxs : 0,
    p99Gap,
    p99GapFcfs,
    p99GapVsFcfs: p99GapFcfs ? p99Gap / p99GapFcfs : 1,
  };
}
