// Quality of pre-gating: the routers of layers l+1 .. l+d applied to the hidden state
// after layer l's attention predict which experts those layers will pick. For every
// distance d, a token's predicted top-k at layer l+d is compared with the experts the
// token really used there once that layer's routing is known:
//
//   recall    = |predicted ∩ used| / |used|       (needed experts the prefetch would have)
//   precision = |predicted ∩ used| / |predicted|  (prefetched experts that were needed)
//
// Counted per token (not per batch union). The offload runner keeps these counters
// live; measurePregating() measures them on any batches for benchmarks.

import type { NativeEngine } from '../engine/native.js';
import type { StepSequence } from '../engine/runner.js';

export interface PredictionStats {
  /** Layers ahead (1 = the next layer). */
  distance: number;
  /** Predicted (token, expert) pairs, used ones, and pairs both predicted and used. */
  predicted: number;
  actual: number;
  hits: number;
  /** hits / actual (0 when nothing was measured). */
  recall: number;
  /** hits / predicted (0 when nothing was measured). */
  precision: number;
}

/** The k highest logits of each row (tokens, experts), best first, lowest id first on ties. */
export function topKIds(logits: Float32Array, tokens: number, experts: number, k: number, out = new Int32Array(tokens * k)): Int32Array {
  const kk = Math.min(k, experts);
  for (let t = 0; t < tokens; t++) {
    const z = logits.subarray(t * experts, (t + 1) * experts);
    const o = out.subarray(t * k, t * k + kk);
    let n = 0;
    for (let e = 0; e < experts; e++) {
      // Insertion into the sorted prefix o[0..n).
      if (n === kk && !(z[e] > z[o[kk - 1]])) continue;
      let i = n < kk ? n++ : kk - 1;
      while (i > 0 && z[e] > z[o[i - 1]]) {
        o[i] = o[i - 1];
        i--;
      }
      o[i] = e;
    }
  }
  return out;
}

/** Per-token overlap of predicted (tokens, kp) and used (tokens, ka) expert ids. */
export function scoreTopK(predicted: Int32Array, kp: number, used: Int32Array, ka: number, tokens: number): { predicted: number; actual: number; hits: number } {
  let hits = 0;
  for (let t = 0; t < tokens; t++) {
    for (let i = 0; i < kp; i++) {
      const e = predicted[t * kp + i];
      for (let j = 0; j < ka; j++) {
        if (used[t * ka + j] === e) {
          hits++;
          break;
        }
      }
    }
  }
  return { predicted: tokens * kp, actual: tokens * ka, hits };
}

/** Decay of PredictionCounters' recent counters per add(). */
export const RECENT_DECAY = 0.99;

/**
 * Running counters per distance 1..maxDistance: over everything added, and over the
 * recent additions (each add() first scales the recent counters by RECENT_DECAY, so
 * they cover about the last 1 / (1 - RECENT_DECAY) additions).
 */
export class PredictionCounters {
  private readonly predicted: Float64Array;
  private readonly actual: Float64Array;
  private readonly hits: Float64Array;
  private readonly recentPredicted: Float64Array;
  private readonly recentHits: Float64Array;

  constructor(readonly maxDistance: number) {
    this.predicted = new Float64Array(maxDistance + 1);
    this.actual = new Float64Array(maxDistance + 1);
    this.hits = new Float64Array(maxDistance + 1);
    this.recentPredicted = new Float64Array(maxDistance + 1);
    this.recentHits = new Float64Array(maxDistance + 1);
  }

  add(distance: number, predicted: Int32Array, kp: number, used: Int32Array, ka: number, tokens: number): void {
    if (distance < 1 || distance > this.maxDistance) return;
    const s = scoreTopK(predicted, kp, used, ka, tokens);
    this.predicted[distance] += s.predicted;
    this.actual[distance] += s.actual;
    this.hits[distance] += s.hits;
    this.recentPredicted[distance] = this.recentPredicted[distance] * RECENT_DECAY + s.predicted;
    this.recentHits[distance] = this.recentHits[distance] * RECENT_DECAY + s.hits;
  }

  /** P(used | predicted) at a distance, with a prior of 0.5 while evidence is thin. */
  precision(distance: number): number {
    return (this.hits[distance] + 1) / (this.predicted[distance] + 2);
  }

  /** Precision of the recent additions at a distance, and their (decayed) number of predictions. */
  recent(distance: number): { precision: number; predicted: number } {
    const n = this.recentPredicted[distance];
    return { precision: n > 0 ? this.recentHits[distance] / n : 0, predicted: n };
  }

  snapshot(): PredictionStats[] {
    const out: PredictionStats[] = [];
    for (let d = 1; d <= this.maxDistance; d++) {
      const p = this.predicted[d];
      const a = this.actual[d];
      const h = this.hits[d];
      out.push({ distance: d, predicted: p, actual: a, hits: h, recall: a > 0 ? h / a : 0, precision: p > 0 ? h / p : 0 });
    }
    return out;
  }
}

/**
 * Measures pre-gating on a resident engine: runs each batch as a step in pieces (the
 * model's own routing), and after layer l's attention predicts layers l+1 .. l+lookahead.
 * Returns recall and precision per distance. The engine must have been built with the
 * model whose top-k is `topK` (KV blocks of the batches are the caller's).
 */
export function measurePregating(
  engine: NativeEngine,
  shape: { layers: number; experts: number; topK: number },
  steps: Iterable<StepSequence[]>,
  lookahead: number,
  pack: (batch: StepSequence[]) => { tokens: Int32Array; seqs: Int32Array; blocks: Int32Array },
): PredictionStats[] {
  const { layers: L, experts: E, topK: K } = shape;
  const counters = new PredictionCounters(lookahead);
  for (const batch of steps) {
    const { tokens, seqs, blocks } = pack(batch);
    const T = tokens.length;
    const pending: { distance: number; ids: Int32Array }[][] = Array.from({ length: L }, () => []);
    engine.beginStep(tokens, seqs, blocks);
    for (let l = 0; l < L; l++) {
      const logits = engine.attention(l);
      const r = engine.route(logits, T);
      for (const p of pending[l]) counters.add(p.distance, p.ids, K, r.ids, K, T);
      const to = Math.min(L - 1, l + lookahead);
      if (to > l) {
        const pred = engine.predictRouter(l, to);
        for (let d = 1; d <= to - l; d++) pending[l + d].push({ distance: d, ids: topKIds(pred.subarray((d - 1) * T * E, d * T * E), T, E, K) });
      }
      engine.experts(l, r.ids, r.weights, K);
    }
    engine.endStep();
  }
  return counters.snapshot();
}

/**
 * Calibration of prefetch probabilities. A prefetcher's model gives, per expert, the
 * probability that the next visit of a layer needs it; the model is often over- or
 * underconfident (tokens of one batch are not independent, predictions can be poor).
 * Per lookahead distance, probabilities are binned; each bin counts the experts it held
 * and how many the visit then needed. calibrate(d, p) is the bin's observed frequency,
 * with the model's own value counted as `prior` observations.
 */
export class NeedCalibration {
  private readonly seen: Float64Array;
  private readonly needed: Float64Array;

  constructor(
    readonly maxDistance: number,
    readonly bins = 10,
    readonly prior = 2,
  ) {
    this.seen = new Float64Array(maxDistance * bins);
    this.needed = new Float64Array(maxDistance * bins);
  }

  private bin(distance: number, p: number): number {
    return (distance - 1) * this.bins + Math.min(this.bins - 1, Math.max(0, Math.floor(p * this.bins)));
  }

  /** Records a visit: the model's probabilities (0 = not considered) and which experts it needed (0/1). */
  observe(distance: number, p: ArrayLike<number>, needed: ArrayLike<number>): void {
    if (distance < 1 || distance > this.maxDistance) return;
    for (let x = 0; x < p.length; x++) {
      if (!(p[x] > 0)) continue;
      const b = this.bin(distance, p[x]);
      this.seen[b]++;
      this.needed[b] += needed[x] ? 1 : 0;
    }
  }

  calibrate(distance: number, p: number): number {
    if (distance < 1 || distance > this.maxDistance) return p;
    const b = this.bin(distance, p);
    return (this.needed[b] + this.prior * p) / (this.seen[b] + this.prior);
  }
}
