// Next-token sampling from logits: temperature, top-k, top-p, min-p, seeded.
// Greedy when temperature is 0. The random source is passed in; the scratch arrays are
// per module instance (each worker thread has its own), and no call is re-entered.

import { Rng } from '../model/prng.js';
import { loadNative, type NativeAddon } from './native.js';

export interface SamplingParams {
  /** 0 means greedy. */
  temperature: number;
  /** 1 keeps everything. */
  topP: number;
  /** 0 or negative keeps everything. */
  topK: number;
  /** 0 keeps everything; otherwise drops tokens below minP × the top probability. */
  minP: number;
}

export const GREEDY: SamplingParams = { temperature: 0, topP: 1, topK: 0, minP: 0 };

export function argmax(logits: ArrayLike<number>, off = 0, n = logits.length - off): number {
  let best = 0;
  let bestV = -Infinity;
  for (let i = 0; i < n; i++) {
    const v = logits[off + i];
    if (v > bestV) {
      bestV = v;
      best = i;
    }
  }
  return best;
}

/**
 * Scratch of sample(): the weights e^((logit - max) / T) and candidate ids, grown to the
 * largest vocabulary seen and reused (a 152k-token vocabulary sampled every step).
 */
let weights = new Float64Array(0);
let order = new Uint32Array(0);

let addon: NativeAddon | null | undefined;

/**
 * The sampling weights w[i] = e^((logits[off + i] - max) / temperature) of the window
 * [off, off + n) into out[0, n), and their sum: the addon's vectorised exp (float32) for a
 * Float32Array, else Math.exp. A 152k-token vocabulary takes 1.5 ms in Math.exp, once per
 * sequence per step.
 */
export function samplingWeights(logits: ArrayLike<number>, off: number, n: number, temperature: number, out: Float64Array): number {
  if (addon === undefined) {
    try {
      addon = loadNative();
    } catch {
      addon = null; // no addon built: the plain path
    }
  }
  // (Below 1e-30 the inverse temperature would overflow float32: the plain path.)
  if (addon && logits instanceof Float32Array && temperature >= 1e-30) return addon.expWeights(logits, off, n, temperature, out);
  let max = -Infinity;
  for (let i = 0; i < n; i++) max = Math.max(max, logits[off + i]);
  let sum = 0;
  for (let i = 0; i < n; i++) sum += out[i] = Math.exp((logits[off + i] - max) / temperature);
  return sum;
}

/** Candidates in sampling order: larger weight first, the smaller id first on ties. */
const before = (w: Float64Array, a: number, b: number) => w[a] > w[b] || (w[a] === w[b] && a < b);

/**
 * Puts the `j` first candidates of ids[lo, hi) in sampling order into ids[lo, lo + j) (in
 * no particular order among themselves): quickselect with the median of three as pivot
 * (deterministic: the request's random stream is not touched).
 */
function selectFirst(ids: Uint32Array, w: Float64Array, lo: number, hi: number, j: number): void {
  let l = lo;
  let h = hi - 1;
  const target = lo + j - 1;
  while (l < h) {
    const m = (l + h) >>> 1;
    let a = ids[l];
    let b = ids[m];
    let c = ids[h];
    if (before(w, b, a)) [a, b] = [b, a];
    if (before(w, c, b)) [b, c] = [c, b];
    if (before(w, b, a)) [a, b] = [b, a];
    const pivot = b;
    let i = l;
    let k = h;
    while (i <= k) {
      while (before(w, ids[i], pivot)) i++;
      while (before(w, pivot, ids[k])) k--;
      if (i <= k) {
        const t = ids[i];
        ids[i] = ids[k];
        ids[k] = t;
        i++;
        k--;
      }
    }
    if (target <= k) h = k;
    else if (target >= i) l = i;
    else return;
  }
}

/**
 * Picks a token from `n` logits starting at `off`; `rng` is only used when sampling
 * (one uniform draw per token).
 *
 * The probabilities are softmax(logits / temperature) (weights: samplingWeights). With nothing to truncate (topK
 * off or >= n, topP >= 1, minP 0) the draw walks the tokens in id order: no sort. Otherwise
 * the candidates are ranked (larger probability first, smaller id on ties) and the kept
 * prefix is the shortest one that top-k, min-p (p >= minP x the top probability) and
 * top-p (cumulative probability >= topP) all allow; the draw walks that prefix in rank
 * order. Only as many candidates as needed are ranked: quickselect finds the first j,
 * j doubling until the kept prefix ends inside them.
 */
export function sample(logits: ArrayLike<number>, p: SamplingParams, rng: Rng, off = 0, n = logits.length - off): number {
  if (p.temperature <= 0) return argmax(logits, off, n);
  if (weights.length < n) {
    weights = new Float64Array(n);
    order = new Uint32Array(n);
  }
  const w = weights;
  const sum = samplingWeights(logits, off, n, p.temperature, w);
  const topK = p.topK > 0 && p.topK < n ? p.topK : n;
  if (topK === n && p.topP >= 1 && !(p.minP > 0)) {
    let r = rng.uniform() * sum;
    for (let i = 0; i < n; i++) {
      r -= w[i];
      if (r < 0) return i;
    }
    let last = n - 1;
    while (last > 0 && w[last] === 0) last--;
    return last;
  }
  const ids = order;
  for (let i = 0; i < n; i++) ids[i] = i;
  // Rank the first j candidates; the kept prefix must end inside them (or j = n).
  let ranked = 0;
  let j = Math.min(topK, 64);
  for (;;) {
    selectFirst(ids, w, ranked, n, j - ranked);
    const head = Array.from(ids.subarray(ranked, j)).sort((a, b) => (before(w, a, b) ? -1 : before(w, b, a) ? 1 : 0));
    ids.set(head, ranked);
    ranked = j;
    // The kept prefix over the ranked candidates (probabilities normalised by the total).
    let keep = ranked;
    let ends = ranked === topK;
    if (p.minP > 0) {
      const floor = p.minP * (w[ids[0]] / sum);
      let k = 0;
      while (k < keep && w[ids[k]] / sum >= floor) k++;
      if (k < keep) ends = true;
      keep = Math.max(1, k);
    }
    if (p.topP < 1) {
      let acc = 0;
      let k = 0;
      while (k < keep) {
        acc += w[ids[k]] / sum;
        k++;
        if (acc >= p.topP) {
          ends = true;
          break;
        }
      }
      keep = Math.max(1, k);
    }
    if (ends || ranked === n) {
      let total = 0;
      for (let k = 0; k < keep; k++) total += w[ids[k]] / sum;
      let r = rng.uniform() * total;
      for (let k = 0; k < keep; k++) {
        r -= w[ids[k]] / sum;
        if (r < 0) return ids[k];
      }
      return ids[keep - 1];
    }
    j = Math.min(topK, n, j * 2);
  }
}
