// "predictive": our expert cache policy. It evicts the resident expert least likely to
// be needed at the layer's next visit, estimated online from what the server knows at
// that moment, and prefetches the next layer's likely experts.
//
// Reuse estimate. Each (layer, expert) is described by three features:
//   - age: visits of the layer since its last use (1 = used by the current tokens),
//   - popularity: its use count decayed with a half-life of HALF_LIFE visits,
//   - transition: the RoutingPredictor's probability that the batch's next tokens pick
//     it at this layer, given the experts the current tokens picked (P(any sequence)).
// Features are bucketed into a small table; for every bucket the policy counts how
// often an expert in that bucket was needed at the layer's next visit (the label is
// known one visit later, so nothing is learned from the future). Eviction ranks
// residents by that rate. The table is shared by all layers, so it learns fast.
//
// Prefetch. After layer l is routed, the predictor's cross-layer co-occurrence (or the
// engine's pre-gating, when fed) gives P(needed at l+1); hints above prefetchMin go to
// the cache, which only evicts a resident whose estimated reuse is lower than the hint's
// probability. Prefetches cost loads and wasted ones are counted.

import { SlotCache, type PolicyShape, type PrefetchHint } from './cache-policy.js';
import { RoutingPredictor } from '../router/predictor.js';
import type { VisitObserver } from './simulator.js';
import type { StepToken } from './schedule.js';
import { NO_EXPERT } from './trace.js';

const AGE_BUCKETS = 8;
const POP_BUCKETS = 8;
const TRANS_BUCKETS = 4;
const HALF_LIFE = 4;

export interface PredictiveOptions {
  /** Issue prefetches (default true). */
  prefetch?: boolean;
  /** Minimum predicted probability for a prefetch hint (default 0.6). */
  prefetchMin?: number;
  /** Share a predictor with the engine; one is created otherwise. */
  predictor?: RoutingPredictor;
}

/**
 * Prefetch hints for the layer after `layer`: per expert, the probability that any of the
 * step's sequences needs it there (the predictor's cross-layer estimate, sequences taken
 * as independent), those at or above `minProbability`, most likely first.
 */
export function nextLayerPrefetchHints(predictor: RoutingPredictor, layer: number, tokens: readonly StepToken[], minProbability: number, scratch: Float64Array): PrefetchHint[] {
  const E = predictor.experts;
  const pAny = new Float64Array(E);
  const seen = new Set<number>();
  for (const t of tokens) {
    if (seen.has(t.request)) continue;
    seen.add(t.request);
    const p = predictor.nextLayer(t.request, layer, scratch);
    for (let e = 0; e < E; e++) pAny[e] = 1 - (1 - pAny[e]) * (1 - p[e]);
  }
  const hints: PrefetchHint[] = [];
  for (let e = 0; e < E; e++) if (pAny[e] >= minProbability) hints.push({ expert: e, priority: pAny[e] });
  return hints.sort((a, b) => b.priority - a.priority);
}

export class PredictivePolicy extends SlotCache implements VisitObserver {
  readonly name = 'predictive';
  readonly predictor: RoutingPredictor;
  private readonly prefetchOn: boolean;
  private readonly prefetchMin: number;
  private readonly lastUse: Float64Array; // (layer, expert)
  private readonly pop: Float64Array; // (layer, expert): decayed uses as of popAt
  private readonly popAt: Float64Array;
  private readonly trans: Float64Array; // (layer, expert): P(needed next visit) from transitions
  private readonly rateN = new Float64Array(AGE_BUCKETS * POP_BUCKETS * TRANS_BUCKETS).fill(1);
  private readonly rateU = new Float64Array(AGE_BUCKETS * POP_BUCKETS * TRANS_BUCKETS).fill(0.5);
  private readonly pending: (Int32Array | null)[]; // per layer: bucket of each expert after the last visit
  private readonly scratch: Float64Array;
  private readonly seqsAtLayer: number[][]; // per layer: sequences of the last visit
  private readonly tokenBuf: { seq: number; experts: Uint16Array }[] = [];

  constructor(shape: PolicyShape, opts: PredictiveOptions = {}) {
    super(shape);
    const n = shape.layers * shape.experts;
    this.predictor = opts.predictor ?? new RoutingPredictor(shape);
    this.prefetchOn = opts.prefetch ?? true;
    this.prefetchMin = opts.prefetchMin ?? 0.6;
    this.lastUse = new Float64Array(n).fill(-1e9);
    this.pop = new Float64Array(n);
    this.popAt = new Float64Array(n);
    this.trans = new Float64Array(n);
    this.pending = new Array(shape.layers).fill(null);
    this.scratch = new Float64Array(shape.experts);
    this.seqsAtLayer = Array.from({ length: shape.layers }, () => []);
  }

  /** Feeds the predictor with a visit's per-token routing (the simulator calls this before request()). */
  observe(_step: number, layer: number, tokens: readonly StepToken[]): void {
    const K = tokens.length ? tokens[0].token.experts.length / this.layers : 0;
    this.tokenBuf.length = 0;
    for (const t of tokens) {
      const ex = t.token.experts.subarray(layer * K, (layer + 1) * K);
      this.tokenBuf.push({ seq: t.request, experts: ex[0] === NO_EXPERT ? ex.subarray(0, 0) : ex });
    }
    this.observeRouting(layer, this.tokenBuf);
  }

  /** Engine entry point: routing of the visit about to be requested. */
  observeRouting(layer: number, tokens: readonly { seq: number; experts: ArrayLike<number> }[]): void {
    this.predictor.observe(layer, tokens);
    const prev = this.seqsAtLayer[layer];
    const cur = tokens.filter((t) => t.experts.length > 0).map((t) => t.seq);
    // Sequences gone from the batch since this layer's last visit are finished.
    if (layer === this.layers - 1) for (const s of prev) if (!cur.includes(s)) this.predictor.endSequence(s);
    this.seqsAtLayer[layer] = cur;
  }

  prefetchHints(layer: number, tokens: readonly StepToken[]): PrefetchHint[] {
    if (!this.prefetchOn) return [];
    return nextLayerPrefetchHints(this.predictor, layer, tokens, this.prefetchMin, this.scratch);
  }

  protected override prefetchFloor(_layer: number, hint: PrefetchHint): number {
    return hint.priority;
  }

  // A prefetch never displaces an expert the layer's last visit used: the previous
  // token's experts are the best single predictor of the next token's, and at 1x
  // capacity they fill every slot (prefetching there only trades a sure hit for a guess).
  private inPrefetch = false;

  override prefetch(layer: number, hints: readonly PrefetchHint[], max: number) {
    this.inPrefetch = true;
    try {
      return super.prefetch(layer, hints, max);
    } finally {
      this.inPrefetch = false;
    }
  }

  protected override beforeVisit(layer: number, experts: ArrayLike<number>, now: number): void {
    const E = this.experts;
    const base = layer * E;
    // Label last visit's feature buckets with whether each expert is needed now.
    const pend = this.pending[layer];
    if (pend) {
      const need = new Uint8Array(E);
      for (let k = 0; k < experts.length; k++) need[experts[k]] = 1;
      for (let e = 0; e < E; e++) {
        this.rateN[pend[e]]++;
        this.rateU[pend[e]] += need[e];
      }
    }
    for (let k = 0; k < experts.length; k++) {
      const i = base + experts[k];
      this.pop[i] = this.popularity(i, now) + 1;
      this.popAt[i] = now;
      this.lastUse[i] = now;
    }
    // Transition estimate for the next visit: P(any live sequence picks e).
    const t = this.trans.subarray(base, base + E);
    t.fill(0);
    for (const s of this.seqsAtLayer[layer]) {
      const p = this.predictor.nextToken(s, layer, this.scratch);
      for (let e = 0; e < E; e++) t[e] = 1 - (1 - t[e]) * (1 - p[e]);
    }
    const buckets = pend ?? new Int32Array(E);
    for (let e = 0; e < E; e++) buckets[e] = this.bucket(base + e, now + 1);
    this.pending[layer] = buckets;
  }

  protected touch(): void {}

  protected keepScore(layer: number, expert: number, now: number): number {
    const i = layer * this.experts + expert;
    if (this.inPrefetch && this.lastUse[i] === now - 1) return Infinity;
    const b = this.bucket(i, now + 1);
    // Ties (same bucket) go to the more recently used expert.
    return this.rateU[b] / this.rateN[b] + 1e-12 * this.lastUse[i];
  }

  private popularity(i: number, now: number): number {
    return this.pop[i] * Math.pow(2, -(now - this.popAt[i]) / HALF_LIFE);
  }

  private bucket(i: number, at: number): number {
    const age = Math.min(AGE_BUCKETS - 1, Math.max(0, at - this.lastUse[i] - 1));
    const pop = Math.min(POP_BUCKETS - 1, Math.floor(this.popularity(i, at) * 2));
    const tr = Math.min(TRANS_BUCKETS - 1, Math.floor(this.trans[i] * TRANS_BUCKETS * 1.5));
    return (age * POP_BUCKETS + pop) * TRANS_BUCKETS + tr;
  }
}
