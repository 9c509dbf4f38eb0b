// Next-token sampling from logits: temperature, top-k, top-p, min-p, seeded.
// Greedy when temperature is 0. Pure: the random source is passed in.

import { Rng } from '../model/prng.js';

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

/** Picks a token from `n` logits starting at `off`; `rng` is only used when sampling. */
export function sample(logits: ArrayLike<number>, p: SamplingParams, rng: Rng, off = 0, n = logits.length - off): number {
  if (p.temperature <= 0) return argmax(logits, off, n);
  let max = -Infinity;
  for (let i = 0; i < n; i++) max = Math.max(max, logits[off + i]);
  const cand: { id: number; p: number }[] = [];
  let sum = 0;
  for (let i = 0; i < n; i++) {
    const e = Math.exp((logits[off + i] - max) / p.temperature);
    cand.push({ id: i, p: e });
    sum += e;
  }
  for (const c of cand) c.p /= sum;
  cand.sort((a, b) => b.p - a.p || a.id - b.id);
  let keep = cand.length;
  if (p.topK > 0) keep = Math.min(keep, p.topK);
  if (p.minP > 0) {
    const floor = p.minP * cand[0].p;
    let k = 0;
    while (k < keep && cand[k].p >= floor) k++;
    keep = Math.max(1, k);
  }
  if (p.topP < 1) {
    let acc = 0;
    let k = 0;
    while (k < keep) {
      acc += cand[k].p;
      k++;
      if (acc >= p.topP) break;
    }
    keep = Math.max(1, k);
  }
  let total = 0;
  for (let k = 0; k < keep; k++) total += cand[k].p;
  let r = rng.uniform() * total;
  for (let k = 0; k < keep; k++) {
    r -= cand[k].p;
    if (r < 0) return cand[k].id;
  }
  return cand[keep - 1].id;
}
