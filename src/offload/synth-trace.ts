// Synthetic many-request moe-trace v1 files whose routing statistics match a real trace
// (../shared/traces/FORMAT.md): per-layer expert popularity, temporal reuse (a token
// keeping the previous token's experts at the same layer) and co-occurrence across
// adjacent layers (P(expert f at l+1 | expert e at l)).
//
// Generative model, per request, token and layer l:
//   1. n_l of the previous token's experts at l are kept (chosen uniformly), n_l drawn
//      from a chain across the token's layers: P(n_l = j | n_{l-1} = i) is the real
//      trace's keep-count transition (pooled over layers), tilted per layer by
//      exp(theta[l] j) so each layer's reuse rate matches. A token similar to its
//      predecessor at one layer is similar at the next, as in real routing (adjacent
//      layers' keep counts correlate about 0.55 in the shipped traces), which carries
//      the previous token's cross-layer expert pairs over;
//   2. the remaining slots are filled without replacement from
//        popularity[l](f) * exp(alpha[l] * mean_{e in this token's experts at l-1} lift(e, f)),
//      lift(e, f) = log(P(f at l | e at l-1) / (K popularity[l](f))) from the real trace
//      (a log-linear coupling: experts that the layer below's choices make likely, as a
//      router fed a hidden state similar to the layer below's would), falling back to
//      uniform over the unchosen experts when that mass runs out.
// theta[] and alpha[] are fitted on calibration runs (same seed each run, so the runs
// differ only by the parameters) until the generated reuse rates and co-occurrence
// match the real ones. Everything is driven by one seeded PRNG: same seed, same bytes.
//
// Prefill: the first P positions of a request are `prefill`, P drawn within ±25 % of a
// real request's prompt length. A layer that the real trace skips for most prefill
// tokens but the last (llama.cpp skips the last layer there) is skipped the same way.
// Weights: the real trace's per-rank mean gate weights on every row, or none.

import { createWriteStream } from 'node:fs';
import { once } from 'node:events';
import { finished } from 'node:stream/promises';
import { NO_EXPERT, readTrace, type TraceHeader, type TraceRequest, type TraceToken } from './trace.js';

// ---------------------------------------------------------------------------------------
// Statistics

/** Streaming accumulator of the routing statistics of a trace; add requests one by one. */
export class TraceStats {
  readonly layers: number;
  readonly experts: number;
  readonly topK: number;
  /** (layer, expert) selection counts. */
  readonly counts: Float64Array;
  /** Rows (token, layer with routing) per layer. */
  readonly rows: Float64Array;
  /** Per layer: sum over consecutive token pairs of |A ∩ B| / K, and the number of pairs. */
  readonly reuseSum: Float64Array;
  readonly reusePairs: Float64Array;
  /** (l, e, f) for l in 0..L-2: tokens with e at l and f at l+1. */
  readonly joint: Float64Array;
  /** (l, e) for l in 0..L-2: tokens with e at l and a row at l+1. */
  readonly lower: Float64Array;
  /** Per rank: sum and count of recorded gate weights. */
  readonly weightSum: Float64Array;
  readonly weightN: Float64Array;
  /**
   * Keep counts: for consecutive tokens, n_l = |experts at l ∩ previous token's at l|.
   * keepTrans[(i, j)] counts adjacent layers (l-1, l) of one token with n = i then j;
   * keepStart[j] counts layers with n = j whose layer below had no comparison.
   */
  readonly keepTrans: Float64Array;
  readonly keepStart: Float64Array;
  /** Per layer: prefill tokens other than a request's last prefill token lacking the layer. */
  readonly prefillSkips: Float64Array;
  prefillNonLast = 0;
  requests = 0;
  tokens = 0;
  readonly prefillLengths: number[] = [];
  readonly tokenCounts: number[] = [];

  constructor(h: Pick<TraceHeader, 'layers' | 'experts' | 'topK'>) {
    this.layers = h.layers;
    this.experts = h.experts;
    this.topK = h.topK;
    const { layers: L, experts: E, topK: K } = h;
    this.counts = new Float64Array(L * E);
    this.rows = new Float64Array(L);
    this.reuseSum = new Float64Array(L);
    this.reusePairs = new Float64Array(L);
    this.joint = new Float64Array(Math.max(0, L - 1) * E * E);
    this.lower = new Float64Array(Math.max(0, L - 1) * E);
    this.weightSum = new Float64Array(K);
    this.weightN = new Float64Array(K);
    this.prefillSkips = new Float64Array(L);
    this.keepTrans = new Float64Array((K + 1) * (K + 1));
    this.keepStart = new Float64Array(K + 1);
  }

  add(req: TraceRequest): void {
    const { layers: L, experts: E, topK: K } = this;
    const mark = new Int32Array(E).fill(-1);
    this.requests++;
    this.tokens += req.tokens.length;
    this.prefillLengths.push(req.prefillTokens);
    this.tokenCounts.push(req.tokens.length);
    let prev: TraceToken | null = null;
    req.tokens.forEach((tok, t) => {
      const ex = tok.experts;
      let below = -1; // keep count at the layer below, -1 when it had no comparison
      const nonLastPrefill = tok.phase === 'prefill' && t < req.prefillTokens - 1;
      if (nonLastPrefill) this.prefillNonLast++;
      for (let l = 0; l < L; l++) {
        const b = l * K;
        if (ex[b] === NO_EXPERT) {
          if (nonLastPrefill) this.prefillSkips[l]++;
          below = -1;
          continue;
        }
        this.rows[l]++;
        for (let k = 0; k < K; k++) this.counts[l * E + ex[b + k]]++;
        if (tok.weights) {
          for (let k = 0; k < K; k++) {
            const w = tok.weights[b + k];
            if (!Number.isNaN(w)) {
              this.weightSum[k] += w;
              this.weightN[k]++;
            }
          }
        }
        if (prev && prev.experts[b] !== NO_EXPERT) {
          const stamp = t * L + l;
          for (let k = 0; k < K; k++) mark[prev.experts[b + k]] = stamp;
          let same = 0;
          for (let k = 0; k < K; k++) if (mark[ex[b + k]] === stamp) same++;
          this.reuseSum[l] += same / K;
          this.reusePairs[l]++;
          if (below >= 0) this.keepTrans[below * (K + 1) + same]++;
          else this.keepStart[same]++;
          below = same;
        } else {
          below = -1;
        }
        if (l + 1 < L && ex[b + K] !== NO_EXPERT) {
          for (let k = 0; k < K; k++) {
            const e = ex[b + k];
            this.lower[l * E + e]++;
            const row = (l * E + e) * E;
            for (let j = 0; j < K; j++) this.joint[row + ex[b + K + j]]++;
          }
        }
      }
      prev = tok;
    });
  }

  /** Popularity of expert e at layer l: its share of the layer's selections. */
  popularity(l: number, e: number): number {
    const n = this.rows[l] * this.topK;
    return n > 0 ? this.counts[l * this.experts + e] / n : 0;
  }

  /** Temporal reuse rate at layer l (NaN without consecutive pairs). */
  reuse(l: number): number {
    return this.reusePairs[l] > 0 ? this.reuseSum[l] / this.reusePairs[l] : NaN;
  }

  /** P(f selected at l+1 | e selected at l) (NaN when e never seen at l with a row at l+1). */
  conditional(l: number, e: number, f: number): number {
    const n = this.lower[l * this.experts + e];
    return n > 0 ? this.joint[(l * this.experts + e) * this.experts + f] / n : NaN;
  }

  /** Mean gate weight per rank, or null unless every rank has recorded weights. */
  rankWeights(): number[] | null {
    const w: number[] = [];
    for (let k = 0; k < this.topK; k++) {
      if (this.weightN[k] === 0) return null;
      w.push(this.weightSum[k] / this.weightN[k]);
    }
    return w;
  }

  /** Correlation of the keep counts of adjacent layers within a token (NaN without pairs). */
  keepCorrelation(): number {
    const K1 = this.topK + 1;
    let n = 0;
    let sx = 0;
    let sy = 0;
    let sxx = 0;
    let syy = 0;
    let sxy = 0;
    for (let i = 0; i < K1; i++) {
      for (let j = 0; j < K1; j++) {
        const c = this.keepTrans[i * K1 + j];
        n += c;
        sx += c * i;
        sy += c * j;
        sxx += c * i * i;
        syy += c * j * j;
        sxy += c * i * j;
      }
    }
    if (n < 2) return NaN;
    const vx = sxx / n - (sx / n) ** 2;
    const vy = syy / n - (sy / n) ** 2;
    return vx > 0 && vy > 0 ? (sxy / n - (sx / n) * (sy / n)) / Math.sqrt(vx * vy) : NaN;
  }

  meanReuse(): number {
    let s = 0;
    let n = 0;
    for (let l = 0; l < this.layers; l++) {
      const r = this.reuse(l);
      if (!Number.isNaN(r)) {
        s += r;
        n++;
      }
    }
    return n ? s / n : NaN;
  }
}

/**
 * Statistics of a trace file, read as a stream, plus the same of two halves of it (even
 * and odd requests; a single request is split at its middle token) for held-out checks.
 */
export async function traceStats(file: string): Promise<{ header: TraceHeader; stats: TraceStats; halves: [TraceStats, TraceStats] }> {
  let header: TraceHeader | null = null;
  let stats: TraceStats | null = null;
  let halves: [TraceStats, TraceStats] | null = null;
  let n = 0;
  let only: TraceRequest | null = null;
  for await (const req of readTrace(file, (h) => ((header = h), (stats = new TraceStats(h)), (halves = [new TraceStats(h), new TraceStats(h)])), { keepWeights: true })) {
    stats!.add(req);
    halves![n % 2].add(req);
    only = n === 0 ? req : null;
    n++;
  }
  if (header === null || stats === null || halves === null) throw new Error(`${file}: no header`);
  const hv: [TraceStats, TraceStats] = halves;
  if (n === 1 && only) {
    const mid = Math.floor(only.tokens.length / 2);
    hv[0] = new TraceStats(header);
    hv[1] = new TraceStats(header);
    hv[0].add({ ...only, tokens: only.tokens.slice(0, mid), prefillTokens: Math.min(only.prefillTokens, mid) });
    hv[1].add({ ...only, tokens: only.tokens.slice(mid), prefillTokens: Math.max(0, only.prefillTokens - mid) });
  }
  return { header, stats, halves: hv };
}

export interface StatsComparison {
  /** Total-variation distance between per-layer popularity distributions, mean over layers. */
  popularityTV: number;
  /** Per layer (NaN where a trace has no rows at the layer). */
  popularityTVPerLayer: number[];
  /** Reference: TV distance between the real popularity and the uniform distribution. */
  popularityTVUniform: number;
  reuseReal: number[];
  reuseSynth: number[];
  reuseMeanReal: number;
  reuseMeanSynth: number;
  /** Mean and max over layers of |reuse real - reuse synthetic|. */
  reuseMeanAbsDiff: number;
  reuseMaxAbsDiff: number;
  /** Mean |P_real(f at l+1 | e at l) - P_synth(...)| over the top pairs of every adjacent layer pair. */
  coocMeanAbsDiff: number;
  /** Per adjacent layer pair (index l: layers l, l+1). */
  coocPerLayer: number[];
  /** Reference: the same with independent layers (P(f | e) = K × popularity of f at l+1). */
  coocIndependentMeanAbsDiff: number;
  /** Pairs compared (top `topPairs` by real joint count per adjacent layer pair). */
  coocPairs: number;
  /** Correlation of adjacent layers' keep counts within a token (how reuse is coupled across layers). */
  keepCorrReal: number;
  keepCorrSynth: number;
}

/** Compares the statistics of a real trace and a synthetic (or any other) one of the same shape. */
export function compareStats(real: TraceStats, synth: TraceStats, topPairs = 64): StatsComparison {
  if (real.layers !== synth.layers || real.experts !== synth.experts || real.topK !== synth.topK) {
    throw new Error(`shape differs: ${real.layers}/${real.experts}/${real.topK} vs ${synth.layers}/${synth.experts}/${synth.topK}`);
  }
  const { layers: L, experts: E, topK: K } = real;
  const tvPer: number[] = [];
  let tvSum = 0;
  let tvN = 0;
  let tvUni = 0;
  let tvUniN = 0;
  for (let l = 0; l < L; l++) {
    if (real.rows[l] > 0) {
      let u = 0;
      for (let e = 0; e < E; e++) u += Math.abs(real.popularity(l, e) - 1 / E);
      tvUni += u / 2;
      tvUniN++;
    }
    if (real.rows[l] === 0 || synth.rows[l] === 0) {
      tvPer.push(NaN);
      continue;
    }
    let d = 0;
    for (let e = 0; e < E; e++) d += Math.abs(real.popularity(l, e) - synth.popularity(l, e));
    tvPer.push(d / 2);
    tvSum += d / 2;
    tvN++;
  }
  const reuseReal: number[] = [];
  const reuseSynth: number[] = [];
  let rDiff = 0;
  let rMax = 0;
  let rN = 0;
  for (let l = 0; l < L; l++) {
    const a = real.reuse(l);
    const b = synth.reuse(l);
    reuseReal.push(a);
    reuseSynth.push(b);
    if (Number.isNaN(a) || Number.isNaN(b)) continue;
    rDiff += Math.abs(a - b);
    rMax = Math.max(rMax, Math.abs(a - b));
    rN++;
  }
  const coocPer: number[] = [];
  let cSum = 0;
  let cInd = 0;
  let cN = 0;
  for (let l = 0; l + 1 < L; l++) {
    const base = l * E * E;
    const idx: number[] = [];
    for (let i = 0; i < E * E; i++) if (real.joint[base + i] > 0) idx.push(i);
    idx.sort((x, y) => real.joint[base + y] - real.joint[base + x] || x - y);
    let s = 0;
    let n = 0;
    for (const i of idx.slice(0, topPairs)) {
      const e = Math.floor(i / E);
      const f = i % E;
      const pr = real.conditional(l, e, f);
      const ps = synth.conditional(l, e, f);
      const d = Math.abs(pr - (Number.isNaN(ps) ? 0 : ps));
      s += d;
      cSum += d;
      cInd += Math.abs(pr - K * real.popularity(l + 1, f));
      n++;
      cN++;
    }
    coocPer.push(n ? s / n : NaN);
  }
  return {
    popularityTV: tvN ? tvSum / tvN : NaN,
    popularityTVPerLayer: tvPer,
    popularityTVUniform: tvUniN ? tvUni / tvUniN : NaN,
    reuseReal,
    reuseSynth,
    reuseMeanReal: real.meanReuse(),
    reuseMeanSynth: synth.meanReuse(),
    reuseMeanAbsDiff: rN ? rDiff / rN : NaN,
    reuseMaxAbsDiff: rMax,
    coocMeanAbsDiff: cN ? cSum / cN : NaN,
    coocPerLayer: coocPer,
    coocIndependentMeanAbsDiff: cN ? cInd / cN : NaN,
    coocPairs: cN,
    keepCorrReal: real.keepCorrelation(),
    keepCorrSynth: synth.keepCorrelation(),
  };
}

// ---------------------------------------------------------------------------------------
// Model

/** Seeded PRNG in [0, 1): a counter through a 32-bit integer mixer. */
export function makeRng(seed: number): () => number {
  let state = (Math.floor(seed) ^ 0x5bd1e995) >>> 0;
  return () => {
    state = (state + 0x9e3779b9) >>> 0;
    let z = state;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
    z ^= z >>> 16;
    return (z >>> 0) / 4294967296;
  };
}

export interface SynthModel {
  header: TraceHeader;
  /** (l, e): popularity, summing to 1 per layer (uniform for a layer without rows). */
  pop: Float64Array;
  /** (l, e, f) for l in 0..L-2: P(f at l+1 | e at l) / K (sums to 1 per row); rows of unseen e are 0. */
  cond: Float64Array;
  condValid: Uint8Array;
  /** Per layer: the real reuse rate (share of the previous token's experts kept). */
  keep: Float64Array;
  /**
   * Keep-count chain across the layers of a token: keepT[(i, j)] = P(n_l = j | n_{l-1} = i)
   * (fitted on the real trace, pooled over layers, add-0.5 smoothed); keepStart[j] = P(n = j)
   * at a token's first layer with a previous token. Layer l tilts the row by exp(theta[l] j),
   * theta fitted so each layer's reuse rate matches.
   */
  keepT: Float64Array;
  keepStart: Float64Array;
  theta: Float64Array;
  /**
   * (l, e, f) for l in 0..L-2: log of P(f at l+1 | e at l) (smoothed with 2 pseudo-tokens
   * drawn from the popularity) over K x popularity of f at l+1: the lift of f given e.
   */
  lift: Float32Array;
  /** Per layer: strength of the coupling to the layer below (0: independent layers). */
  alpha: Float64Array;
  /**
   * (l, e): the base weights of the fill, starting at the popularity and rescaled on
   * calibration runs (iterative proportional fitting) so the generated popularity
   * matches despite the coupling and the keeps.
   */
  fillPop: Float64Array;
  /** Layers skipped for prefill tokens other than a request's last one. */
  prefillSkip: Uint8Array;
  prefillLengths: number[];
  tokenCounts: number[];
  hasDecode: boolean;
  rankWeights: number[] | null;
}

export function buildModel(header: TraceHeader, s: TraceStats): SynthModel {
  const { layers: L, experts: E, topK: K } = header;
  const pop = new Float64Array(L * E);
  for (let l = 0; l < L; l++) for (let e = 0; e < E; e++) pop[l * E + e] = s.rows[l] > 0 ? s.popularity(l, e) : 1 / E;
  const cond = new Float64Array(s.joint.length);
  const condValid = new Uint8Array(s.lower.length);
  for (let l = 0; l + 1 < L; l++) {
    for (let e = 0; e < E; e++) {
      const n = s.lower[l * E + e];
      if (n === 0) continue;
      condValid[l * E + e] = 1;
      const row = (l * E + e) * E;
      for (let f = 0; f < E; f++) cond[row + f] = s.joint[row + f] / (n * K);
    }
  }
  const lift = new Float32Array(s.joint.length);
  for (let l = 0; l + 1 < L; l++) {
    for (let e = 0; e < E; e++) {
      const n = s.lower[l * E + e];
      if (n === 0) continue;
      const row = (l * E + e) * E;
      for (let f = 0; f < E; f++) {
        const base = K * pop[(l + 1) * E + f];
        if (base <= 0) continue;
        lift[row + f] = Math.log((s.joint[row + f] + 2 * base) / (n + 2) / base);
      }
    }
  }
  const keep = new Float64Array(L);
  for (let l = 0; l < L; l++) {
    const r = s.reuse(l);
    keep[l] = Number.isNaN(r) ? 0 : r;
  }
  const prefillSkip = new Uint8Array(L);
  for (let l = 0; l < L; l++) prefillSkip[l] = s.prefillNonLast > 0 && s.prefillSkips[l] * 2 > s.prefillNonLast ? 1 : 0;
  const K1 = K + 1;
  const keepT = new Float64Array(K1 * K1);
  for (let i = 0; i < K1; i++) {
    let sum = 0;
    for (let j = 0; j < K1; j++) sum += keepT[i * K1 + j] = s.keepTrans[i * K1 + j] + 0.5;
    for (let j = 0; j < K1; j++) keepT[i * K1 + j] /= sum;
  }
  const keepStart = new Float64Array(K1);
  let ks = 0;
  for (let j = 0; j < K1; j++) ks += keepStart[j] = s.keepStart[j] + 0.5;
  for (let j = 0; j < K1; j++) keepStart[j] /= ks;
  return {
    header,
    pop,
    cond,
    condValid,
    keep,
    keepT,
    keepStart,
    theta: new Float64Array(L),
    lift,
    fillPop: Float64Array.from(pop),
    alpha: new Float64Array(L).fill(0.5),
    prefillSkip,
    prefillLengths: s.prefillLengths.length ? s.prefillLengths : [0],
    tokenCounts: s.tokenCounts.length ? s.tokenCounts : [1],
    hasDecode: s.prefillLengths.some((p, i) => p < s.tokenCounts[i]),
    rankWeights: s.rankWeights(),
  };
}

/** Generates one request. `tokens` overrides the per-request token count (default: a real request's). */
function swap(a: Int32Array, i: number, j: number): void {
  const t = a[i];
  a[i] = a[j];
  a[j] = t;
}

export function generateRequest(m: SynthModel, rng: () => number, id: number, tokens?: number): TraceRequest {
  const { layers: L, experts: E, topK: K } = m.header;
  const pick = <T>(xs: T[]): T => xs[Math.min(xs.length - 1, Math.floor(rng() * xs.length))];
  const M = tokens ?? pick(m.tokenCounts);
  const base = pick(m.prefillLengths);
  let P = Math.round(base * (0.75 + 0.5 * rng()));
  if (base > 0) P = Math.max(1, P);
  P = Math.max(0, Math.min(P, m.hasDecode && M > 1 ? M - 1 : M));

  const d = new Float64Array(E);
  const chosen = new Uint8Array(E);
  const tilt = new Float64Array(K + 1);
  const lift = new Float64Array(E);
  const order = new Int32Array(K);
  const out: TraceToken[] = [];
  let prev: Uint16Array | null = null;
  for (let t = 0; t < M; t++) {
    const phase = t < P ? 'prefill' : 'decode';
    const skipping = phase === 'prefill' && t < P - 1;
    const ex = new Uint16Array(L * K).fill(NO_EXPERT);
    let below = -1; // keep count at the layer below (-1: none)
    for (let l = 0; l < L; l++) {
      if (skipping && m.prefillSkip[l]) {
        below = -1;
        continue;
      }
      const b = l * K;
      chosen.fill(0);
      let n = 0;
      if (prev && prev[b] !== NO_EXPERT) {
        // Keep count from the chain across layers, tilted for this layer's reuse rate.
        const row = below >= 0 ? m.keepT.subarray(below * (K + 1), (below + 1) * (K + 1)) : m.keepStart;
        const th = m.theta[l];
        let tot = 0;
        for (let j = 0; j <= K; j++) tot += tilt[j] = row[j] * Math.exp(th * j);
        let r = rng() * tot;
        let j = 0;
        while (j < K && (r -= tilt[j]) >= 0) j++;
        // Keep j of the previous token's experts, chosen uniformly (partial shuffle).
        for (let k = 0; k < K; k++) order[k] = k;
        for (let k = 0; k < j; k++) {
          swap(order, k, k + Math.floor(rng() * (K - k)));
          const e = prev[b + order[k]];
          ex[b + n++] = e;
          chosen[e] = 1;
        }
        below = j;
      } else {
        below = -1;
      }
      if (n === K) continue;
      // Fill distribution: popularity times exp(alpha x the mean lift of f given this
      // token's experts at l-1), a log-linear coupling to the layer below.
      let a = l > 0 && ex[b - K] !== NO_EXPERT ? m.alpha[l] : 0;
      let valid = 0;
      if (a > 0) for (let k = 0; k < K; k++) valid += m.condValid[(l - 1) * E + ex[b - K + k]];
      if (valid === 0) a = 0;
      const pb = l * E;
      if (a > 0) {
        lift.fill(0);
        for (let k = 0; k < K; k++) {
          const e = ex[b - K + k];
          if (!m.condValid[(l - 1) * E + e]) continue;
          const row = ((l - 1) * E + e) * E;
          for (let f = 0; f < E; f++) lift[f] += m.lift[row + f];
        }
        const w = a / valid;
        for (let f = 0; f < E; f++) d[f] = m.fillPop[pb + f] * Math.exp(w * lift[f]);
      } else {
        for (let f = 0; f < E; f++) d[f] = m.fillPop[pb + f];
      }
      for (; n < K; n++) {
        let total = 0;
        for (let f = 0; f < E; f++) if (!chosen[f]) total += d[f];
        let f = -1;
        if (total > 1e-12) {
          let r = rng() * total;
          for (let g = 0; g < E; g++) {
            if (chosen[g]) continue;
            r -= d[g];
            if (r < 0 && d[g] > 0) {
              f = g;
              break;
            }
          }
          if (f < 0) for (let g = E - 1; g >= 0; g--) if (!chosen[g] && d[g] > 0) { f = g; break; }
        }
        if (f < 0) {
          // Mass exhausted: uniform over the experts not chosen yet.
          let r = Math.floor(rng() * (E - n));
          for (let g = 0; g < E; g++) {
            if (chosen[g]) continue;
            if (r-- === 0) {
              f = g;
              break;
            }
          }
        }
        chosen[f] = 1;
        ex[b + n] = f;
      }
    }
    out.push({ position: t, phase, experts: ex });
    prev = ex;
  }
  return { id, tokens: out, prefillTokens: P };
}

export interface FitOptions {
  seed?: number;
  tokensPerRequest?: number;
  /** Rows (token × layer) generated per calibration run (default 60 000). */
  calibrationRows?: number;
}

function calibrate(m: SynthModel, seed: number, requests: number, tokens: number | undefined): TraceStats {
  const s = new TraceStats(m.header);
  const rng = makeRng(seed);
  for (let i = 0; i < requests; i++) s.add(generateRequest(m, rng, i, tokens));
  return s;
}

/** Fits theta[] (reuse) and alpha[] (cross-layer co-occurrence) so generated statistics match. */
export function fitModel(m: SynthModel, real: TraceStats, opts: FitOptions = {}): SynthModel {
  const { layers: L } = m.header;
  const meanTokens = opts.tokensPerRequest ?? m.tokenCounts.reduce((x, y) => x + y, 0) / m.tokenCounts.length;
  const requests = Math.max(2, Math.ceil((opts.calibrationRows ?? 60_000) / (Math.max(1, meanTokens) * L)));
  const seed = ((opts.seed ?? 1) * 2654435761 + 12345) >>> 0;
  const fitKeep = (rounds: number) => {
    for (let i = 0; i < rounds; i++) {
      const s = calibrate(m, seed, requests, opts.tokensPerRequest);
      for (let l = 0; l < L; l++) {
        const r = real.reuse(l);
        const g = s.reuse(l);
        if (Number.isNaN(r) || Number.isNaN(g)) continue;
        // d(reuse)/d(theta) = Var(keep count) / K, about 1/4 for K = 6: a damped Newton step.
        m.theta[l] = Math.max(-20, Math.min(20, m.theta[l] + 3 * (r - g)));
      }
    }
  };
  fitKeep(2);
  // Alpha per layer: the grid value minimizing, at that layer, the co-occurrence
  // difference (pair l-1, l) plus the popularity drift the coupling causes before the
  // fill weights are re-fitted below (a strong coupling copies a short trace's pairs and
  // drifts the marginals). The errors are averaged over 5 neighbouring layers first:
  // one layer's figure on a calibration run this size is noisy.
  const grid = [0, 0.5, 1, 1.5, 2, 3, 4];
  const errs = grid.map((a) => {
    m.alpha.fill(a);
    const c = compareStats(real, calibrate(m, seed + 1, requests * 2, opts.tokensPerRequest));
    const e = new Float64Array(L);
    for (let l = 1; l < L; l++) {
      e[l] = (Number.isNaN(c.coocPerLayer[l - 1]) ? 0 : c.coocPerLayer[l - 1]) + (Number.isNaN(c.popularityTVPerLayer[l]) ? 0 : c.popularityTVPerLayer[l]);
    }
    return e;
  });
  const chosen = new Float64Array(L);
  for (let l = 1; l < L; l++) {
    let best = Infinity;
    grid.forEach((a, g) => {
      let sum = 0;
      let n = 0;
      for (let j = Math.max(1, l - 2); j <= Math.min(L - 1, l + 2); j++) {
        sum += errs[g][j];
        n++;
      }
      if (sum / n < best) {
        best = sum / n;
        chosen[l] = a;
      }
    });
  }
  m.alpha.set(chosen);
  m.alpha[0] = 0;
  const { experts: E } = m.header;
  for (let round = 0; round < 4; round++) {
    // Popularity: rescale the fill weights by real / generated (damped).
    const s = calibrate(m, seed, requests, opts.tokensPerRequest);
    for (let l = 0; l < L; l++) {
      if (real.rows[l] === 0 || s.rows[l] === 0) continue;
      for (let e = 0; e < E; e++) {
        const r = real.popularity(l, e);
        if (r === 0) continue;
        const g = s.popularity(l, e);
        m.fillPop[l * E + e] *= Math.min(4, Math.max(0.25, Math.sqrt((r + 1e-4) / (g + 1e-4))));
      }
    }
    fitKeep(round === 3 ? 2 : 1);
  }
  return m;
}

/**
 * Request-specific expert preferences, as prompts on different topics route to different
 * experts: per layer, a random subset of round(variation x E) expert ids is shuffled among
 * itself. One such renaming per topic; each request takes one of `topics` renamings
 * (uniformly), the same for all its tokens. Renaming experts consistently within a request
 * leaves every within-request statistic as it was (popularity profile, reuse, keep-count
 * chain, cross-layer pairs up to the renaming); across requests, the favourite experts
 * differ between topics and agree within one.
 */
export class RequestRenamer {
  private readonly maps: Uint16Array[] = [];
  constructor(
    private readonly header: Pick<TraceHeader, 'layers' | 'experts' | 'topK'>,
    readonly variation: number,
    readonly topics: number,
    private readonly rng: () => number,
  ) {
    if (!(variation >= 0 && variation <= 1)) throw new Error(`request variation must be in [0, 1], got ${variation}`);
    if (!(Number.isInteger(topics) && topics >= 1)) throw new Error(`topics must be an integer >= 1, got ${topics}`);
  }

  private makeMap(): Uint16Array {
    const { layers: L, experts: E } = this.header;
    const rng = this.rng;
    const m = Math.round(this.variation * E);
    const map = new Uint16Array(L * E);
    const ids = new Int32Array(E);
    const sub = new Int32Array(m);
    for (let l = 0; l < L; l++) {
      for (let e = 0; e < E; e++) {
        ids[e] = e;
        map[l * E + e] = e;
      }
      // The subset: the first m of a partial shuffle; then a shuffle of the subset.
      for (let i = 0; i < m; i++) {
        swap(ids, i, i + Math.floor(rng() * (E - i)));
        sub[i] = ids[i];
      }
      for (let i = m - 1; i > 0; i--) {
        swap(sub, i, Math.floor(rng() * (i + 1)));
      }
      for (let i = 0; i < m; i++) map[l * E + ids[i]] = sub[i];
    }
    return map;
  }

  /** False when no expert is renamed (variation under 2 experts' worth). */
  get renames(): boolean {
    return Math.round(this.variation * this.header.experts) >= 2;
  }

  /** Renames the request's experts in place with one topic's renaming. */
  apply(req: TraceRequest): void {
    if (!this.renames) return;
    const t = Math.min(this.topics - 1, Math.floor(this.rng() * this.topics));
    while (this.maps.length <= t) this.maps.push(this.makeMap());
    const map = this.maps[t];
    const { layers: L, experts: E, topK: K } = this.header;
    for (const tok of req.tokens) {
      for (let l = 0; l < L; l++) {
        const b = l * K;
        if (tok.experts[b] === NO_EXPERT) continue;
        for (let k = 0; k < K; k++) tok.experts[b + k] = map[l * E + tok.experts[b + k]];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Writing

export interface SynthOptions {
  like: string;
  out: string;
  requests: number;
  seed?: number;
  tokensPerRequest?: number;
  /** Leave the weights column empty (default: the real per-rank mean weights, when recorded). */
  noWeights?: boolean;
  calibrationRows?: number;
  /**
   * Fraction of each layer's experts whose ids are shuffled per topic (0 to 1, default
   * 0): request-specific expert preferences (see RequestRenamer).
   */
  requestVariation?: number;
  /** Topics: distinct renamings that requests draw from (default: one per request). */
  topics?: number;
}

export interface SynthResult {
  header: TraceHeader;
  real: TraceStats;
  /** Statistics of each request as generated, before any renaming (what a one-request real trace compares with). */
  synth: TraceStats;
  /** Comparison of those with the real trace's. */
  comparison: StatsComparison;
  /** Statistics of the file as written (pooled over requests, after the renaming); the same object as synth without renaming. */
  written: TraceStats;
  /** The real trace's two halves compared with each other: how closely real data matches itself. */
  realHalves: StatsComparison | null;
  model: SynthModel;
  rowsWritten: number;
}

/** Reads `like`, fits the model and streams `requests` synthetic requests to `out`. */
export async function synthesizeTrace(o: SynthOptions): Promise<SynthResult> {
  const seed = o.seed ?? 1;
  const { header, stats: real, halves } = await traceStats(o.like);
  if (real.tokens === 0) throw new Error(`${o.like}: no rows to learn from`);
  const model = fitModel(buildModel(header, real), real, { seed, tokensPerRequest: o.tokensPerRequest, calibrationRows: o.calibrationRows });
  const { layers: L, topK: K } = header;
  const weights = o.noWeights || !model.rankWeights ? '' : model.rankWeights.map((w) => w.toFixed(6)).join(' ');
  const synth = new TraceStats(header);
  const renamer = new RequestRenamer(header, o.requestVariation ?? 0, o.topics ?? Math.max(1, o.requests), makeRng((seed * 2246822519 + 0x9e3779b9) >>> 0));
  const written = renamer.renames ? new TraceStats(header) : synth;
  const likeName = o.like.split(/[\\/]/).pop() ?? o.like;
  const file = createWriteStream(o.out, { encoding: 'utf8' });
  let rowsWritten = 0;
  try {
    let buf =
      '# moe-trace v1\n' +
      `# model=${header.model || 'unnamed'} layers=${L} experts=${header.experts} top_k=${K} source=moe-serve synth-trace like=${likeName} seed=${seed} requests=${o.requests}\n` +
      'request,phase,position,layer,experts,weights\n';
    const rng = makeRng(seed);
    for (let r = 0; r < o.requests; r++) {
      const req = generateRequest(model, rng, r, o.tokensPerRequest);
      synth.add(req);
      if (renamer.renames) {
        renamer.apply(req);
        written.add(req);
      }
      for (const tok of req.tokens) {
        const pre = `${r},${tok.phase},${tok.position},`;
        for (let l = 0; l < L; l++) {
          const b = l * K;
          if (tok.experts[b] === NO_EXPERT) continue;
          buf += `${pre}${l},${Array.from(tok.experts.subarray(b, b + K)).join(' ')},${weights}\n`;
          rowsWritten++;
        }
        if (buf.length >= 1 << 20) {
          if (!file.write(buf)) await once(file, 'drain');
          buf = '';
        }
      }
    }
    file.end(buf);
    await finished(file);
  } catch (e) {
    file.destroy();
    throw e;
  }
  const realHalves = halves[0].tokens > 1 && halves[1].tokens > 1 ? compareStats(halves[0], halves[1]) : null;
  return { header, real, synth, comparison: compareStats(real, synth), written, realHalves, model, rowsWritten };
}
