// Trace-driven simulation of an expert cache policy.
//
// Access semantics are those of AccessSchedule (schedule.ts): M requests decoded
// together, one token each per step, prefill rows replayed as the first steps, the next
// request joining when one ends; each step visits layers 0..L-1 and the visit of layer l
// needs the union of its tokens' experts. The cache has `capacity` slots per layer: one
// number for every layer, or one per layer (a split of the budget, capacity.ts).
//
// Counting: a needed expert is a hit when resident at its visit (a prefetched expert
// counts as a hit, and as a used prefetch); otherwise it is a demand load. loads =
// demand loads + prefetches whose load started (a wasted prefetch is a load too;
// a prefetch cancelled before its load started is not).
//
// Timing model (for the stall-free fraction only; load counts do not depend on it):
// - One I/O channel loads experts one after another, `loadSeconds` each
//   (bytes per expert / load bandwidth).
// - A visit computes for `layerBaseSeconds + distinct experts × bytes / computeBandwidth`
//   (attention + router, then each active expert's weights streamed once).
// - At a visit, demand loads go to the channel before any queued prefetch; the visit
//   starts computing when all its experts have arrived. It is stall-free when none had to
//   be waited for (all resident, or prefetched and arrived in time).
// - Prefetches for layer l+1 are issued when layer l's routing is known (start of l's
//   visit), queue behind loads already on the channel, and start when the channel is
//   free. At most `ceil(compute time of one visit / loadSeconds)` prefetches are
//   outstanding (the per-layer load budget). When the target visit comes, a prefetch
//   that has not started is cancelled if its expert is not needed (stale) or turned into
//   a demand load if it is.
// - oraclePrefetch (a yardstick, like Belady for loads): the hints for layer l+1 are the
//   experts its visit will really need, so the stall-free fraction it reaches with
//   Belady's evictions is the best any prefetcher one layer ahead can do at this timing.

import { BeladyPolicy } from './belady.js';
import type { CacheStats, ExpertCachePolicy, PrefetchHint } from './cache-policy.js';
import type { AccessSchedule } from './schedule.js';
import type { StepToken } from './schedule.js';
import { LfuPolicy } from './lfu.js';
import { LruPolicy } from './lru.js';
import { PredictivePolicy } from './predictive.js';
import { ForecastPolicy } from './forecast.js';

export interface TimingModel {
  bytesPerExpert: number;
  /** Bytes/s of expert loads (disk with direct I/O here: ~0.7 GB/s). */
  loadBandwidth: number;
  /** Bytes/s at which compute streams resident expert weights (memory bandwidth). */
  computeBandwidth: number;
  /** Seconds per layer visit besides the experts (attention, router, norms). */
  layerBaseSeconds: number;
}

/** Qwen3-30B-A3B experts (3 × 2048 × 768) at Q8_0 (34 bytes per 32 weights): ~5.0 MiB. */
export const DEFAULT_BYTES_PER_EXPERT = Math.round((3 * 2048 * 768 * 34) / 32);

export const DEFAULT_TIMING: TimingModel = {
  bytesPerExpert: DEFAULT_BYTES_PER_EXPERT,
  loadBandwidth: 0.7e9,
  computeBandwidth: 18e9,
  layerBaseSeconds: 1e-3,
};

/** What a predictive policy is told by the simulator (and later by the engine). */
export interface VisitObserver {
  /** Per-token routing of a visit, before the policy serves it. */
  observe(step: number, layer: number, tokens: readonly StepToken[]): void;
  /** Prefetch candidates for the next visit of `layer`, best first. */
  prefetchHints(layer: number, tokens: readonly StepToken[]): PrefetchHint[];
}

export interface SimResult {
  policy: string;
  /** Slots of each layer. */
  capacities: number[];
  /** Slots over all layers. */
  totalSlots: number;
  steps: number;
  visits: number;
  /** Sum over visits of distinct experts needed. */
  needed: number;
  hits: number;
  hitRate: number;
  demandLoads: number;
  loads: number;
  loadBytes: number;
  prefetch: { issued: number; used: number; wasted: number; cancelled: number };
  stallFreeVisits: number;
  stallFreeFraction: number;
  /** Simulated seconds under the timing model. */
  seconds: number;
}

function isObserver(p: unknown): p is VisitObserver {
  return typeof (p as VisitObserver).observe === 'function' && typeof (p as VisitObserver).prefetchHints === 'function';
}

/** Replays the schedule through `policy`; `finish()` is called on policies that have it. */
export function simulate(
  sched: AccessSchedule,
  policy: ExpertCachePolicy,
  timing: TimingModel = DEFAULT_TIMING,
  opts: { prefetch?: boolean; oraclePrefetch?: boolean } = {},
): SimResult {
  const L = sched.layers;
  const E = sched.experts;
  const observer = isObserver(policy) ? policy : null;
  const oracle = opts.oraclePrefetch === true;
  const doPrefetch = oracle || ((opts.prefetch ?? true) && observer !== null);
  const hintsFor = (layer: number, s: number, tokens: readonly StepToken[]): PrefetchHint[] => {
    if (!oracle) return observer!.prefetchHints(layer, tokens);
    const next = sched.set(layer, s);
    return Array.from(next, (expert) => ({ expert, priority: 1 }));
  };
  const tLoad = timing.bytesPerExpert / timing.loadBandwidth;
  const tExpert = timing.bytesPerExpert / timing.computeBandwidth;
  const readyAt = new Float64Array(L * E); // arrival time of each resident expert's load
  // Prefetches whose load has not started: FIFO of (layer, expert, issue time).
  const queue: { layer: number; expert: number; issued: number }[] = [];
  let ioFree = 0;
  let now = 0;
  let stallFree = 0;
  let visits = 0;

  // Starts queued prefetches that the channel reaches before time t.
  const drain = (t: number) => {
    while (queue.length > 0) {
      const q = queue[0];
      const start = Math.max(ioFree, q.issued);
      if (start >= t) break;
      queue.shift();
      ioFree = start + tLoad;
      readyAt[q.layer * E + q.expert] = ioFree;
    }
  };

  for (let s = 0; s < sched.numSteps; s++) {
    const tokens = sched.steps[s];
    for (let l = 0; l < L; l++) {
      const set = sched.set(l, s);
      drain(now);
      // Prefetches for this layer that never started: stale ones are withdrawn, needed
      // ones become demand loads (prioritised like any demand load below).
      const mark = new Set<number>();
      for (let i = 0; i < set.length; i++) mark.add(set[i]);
      const late: number[] = [];
      for (let i = queue.length - 1; i >= 0; i--) {
        const q = queue[i];
        if (q.layer !== l) continue;
        queue.splice(i, 1);
        if (mark.has(q.expert)) late.push(q.expert);
        else policy.cancelPrefetch(l, q.expert);
      }
      if (observer) observer.observe(s, l, tokens);
      const d = policy.request(l, set);
      let arrive = now;
      for (const e of late) {
        if (policy.slotOf(l, e) < 0) continue;
        ioFree = Math.max(ioFree, now) + tLoad;
        readyAt[l * E + e] = ioFree;
      }
      for (const ld of d.loads) {
        ioFree = Math.max(ioFree, now) + tLoad;
        readyAt[l * E + ld.expert] = ioFree;
      }
      for (let i = 0; i < set.length; i++) arrive = Math.max(arrive, readyAt[l * E + set[i]]);
      visits++;
      if (arrive <= now + 1e-12) stallFree++;
      const compute = timing.layerBaseSeconds + set.length * tExpert;
      if (doPrefetch && l + 1 < L) {
        const budget = Math.max(1, Math.ceil(compute / tLoad));
        const room = budget - queue.length - (ioFree > now ? Math.ceil((ioFree - now) / tLoad) : 0);
        if (room > 0) {
          const issued = policy.prefetch(l + 1, hintsFor(l + 1, s, tokens), room);
          for (const p of issued) {
            readyAt[(l + 1) * E + p.expert] = Infinity;
            queue.push({ layer: l + 1, expert: p.expert, issued: now });
          }
        }
      }
      now = arrive + compute;
    }
  }
  // Prefetches still queued at the end never started.
  for (const q of queue) policy.cancelPrefetch(q.layer, q.expert);
  const fin = (policy as { finish?: () => CacheStats }).finish;
  const st = fin ? fin.call(policy) : policy.stats();
  const needed = sched.totalNeeded;
  const demand = st.misses;
  const loads = demand + st.prefetchIssued;
  return {
    policy: policy.name,
    capacities: [...policy.capacities],
    totalSlots: policy.capacities.reduce((a, c) => a + c, 0),
    steps: sched.numSteps,
    visits,
    needed,
    hits: st.hits,
    hitRate: needed ? st.hits / needed : 1,
    demandLoads: demand,
    loads,
    loadBytes: loads * timing.bytesPerExpert,
    prefetch: { issued: st.prefetchIssued, used: st.prefetchUsed, wasted: st.prefetchWasted, cancelled: st.prefetchCancelled },
    stallFreeVisits: stallFree,
    stallFreeFraction: visits ? stallFree / visits : 1,
    seconds: now,
  };
}

/** Belady's optimum on the schedule at `capacity` slots per layer (one number, or one per layer). */
export function beladyFor(sched: AccessSchedule, capacity: number | readonly number[]): BeladyPolicy {
  return new BeladyPolicy(
    { layers: sched.layers, experts: sched.experts, capacity },
    { visits: sched.numSteps, set: (layer, t) => sched.set(layer, t) },
  );
}

export const POLICY_NAMES = ['lru', 'lfu', 'lfu-decay', 'belady', 'predictive', 'forecast'] as const;
export type PolicyName = (typeof POLICY_NAMES)[number];
/** The project's default expert cache policy. */
export const DEFAULT_POLICY: PolicyName = 'forecast';

/** A fresh policy for a run over `sched` (Belady reads the schedule's future); `capacity`: slots per layer, one number or one per layer. */
export function createCachePolicy(
  name: PolicyName,
  sched: AccessSchedule,
  capacity: number | readonly number[],
  opts: { prefetch?: boolean; routingPredictor?: boolean } = {},
): ExpertCachePolicy {
  const shape = { layers: sched.layers, experts: sched.experts, capacity };
  switch (name) {
    case 'lru':
      return new LruPolicy(shape);
    case 'lfu':
      return new LfuPolicy(shape);
    case 'lfu-decay':
      return new LfuPolicy(shape, { halfLife: 4 });
    case 'belady':
      return beladyFor(sched, capacity);
    case 'predictive':
      return new PredictivePolicy(shape, { prefetch: opts.prefetch });
    case 'forecast':
      return new ForecastPolicy(shape, { prefetch: opts.prefetch, routingPredictor: opts.routingPredictor });
  }
}
