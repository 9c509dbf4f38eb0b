// The reference forward pass: plain TypeScript, float32 storage, float64 accumulation
// (JavaScript numbers) in every dot product and reduction. It is the test oracle of the
// native engine: clarity over speed, one function per step of the model.

import type { ModelSpec } from './spec.js';
import { EMBED, FINAL_NORM, LM_HEAD, layerNames } from './tensor-names.js';

/** Looks up a tensor's values as float32, row-major, by its checkpoint name. */
export type TensorSource = (name: string) => Float32Array;

export interface ExpertWeights {
  gate: Float32Array; // (width, hidden)
  up: Float32Array; // (width, hidden)
  down: Float32Array; // (hidden, width)
}

export interface LayerWeights {
  inputNorm: Float32Array; // (hidden)
  postAttnNorm: Float32Array; // (hidden)
  q: Float32Array; // (heads * head_dim, hidden)
  k: Float32Array; // (kv_heads * head_dim, hidden)
  v: Float32Array; // (kv_heads * head_dim, hidden)
  o: Float32Array; // (hidden, heads * head_dim)
  qBias: Float32Array | null; // (heads * head_dim)
  kBias: Float32Array | null; // (kv_heads * head_dim)
  vBias: Float32Array | null; // (kv_heads * head_dim)
  qNorm: Float32Array | null; // (head_dim) per head, or (heads * head_dim) over the projection
  kNorm: Float32Array | null; // (head_dim) per head, or (kv_heads * head_dim)
  router: Float32Array; // (experts, hidden)
  experts: ExpertWeights[]; // [experts]
  shared: (ExpertWeights & { gateScalar: Float32Array /* (1, hidden) */ }) | null;
}

export interface ModelWeights {
  embed: Float32Array; // (vocab, hidden)
  layers: LayerWeights[];
  finalNorm: Float32Array; // (hidden)
  lmHead: Float32Array; // (vocab, hidden); the embedding matrix when tied
}

export function loadWeights(spec: ModelSpec, get: TensorSource): ModelWeights {
  const layers: LayerWeights[] = [];
  for (let l = 0; l < spec.numLayers; l++) {
    const n = layerNames(spec, l);
    const opt = (name: string | null) => (name ? get(name) : null);
    const expert = (e: { gate: string; up: string; down: string }): ExpertWeights => ({
      gate: get(e.gate),
      up: get(e.up),
      down: get(e.down),
    });
    layers.push({
      inputNorm: get(n.inputNorm),
      postAttnNorm: get(n.postAttnNorm),
      q: get(n.q),
      k: get(n.k),
      v: get(n.v),
      o: get(n.o),
      qBias: opt(n.qBias),
      kBias: opt(n.kBias),
      vBias: opt(n.vBias),
      qNorm: opt(n.qNorm),
      kNorm: opt(n.kNorm),
      router: get(n.router),
      experts: Array.from({ length: spec.numExperts }, (_, j) => expert(n.expert(j))),
      shared: n.shared ? { ...expert(n.shared), gateScalar: get(n.shared.gateScalar) } : null,
    });
  }
  const embed = get(EMBED);
  return { embed, layers, finalNorm: get(FINAL_NORM), lmHead: spec.tieWordEmbeddings ? embed : get(LM_HEAD) };
}

// ---------------------------------------------------------------------------
// Building blocks

/** y = W x (+ b), W row-major (rows, cols); x is read from `x` at `xOff`. */
export function matvec(w: Float32Array, rows: number, cols: number, x: Float32Array, xOff = 0, b: Float32Array | null = null): Float32Array {
  const y = new Float32Array(rows);
  for (let r = 0; r < rows; r++) {
    let acc = 0;
    const base = r * cols;
    for (let c = 0; c < cols; c++) acc += w[base + c] * x[xOff + c];
    y[r] = b ? acc + b[r] : acc;
  }
  return y;
}

/** RMSNorm of `n` values at `off` in x, in place into a new array: x / rms(x) * weight. */
export function rmsNorm(x: Float32Array, weight: Float32Array, eps: number, off = 0, n = weight.length): Float32Array {
  let ss = 0;
  for (let i = 0; i < n; i++) ss += x[off + i] * x[off + i];
  const inv = 1 / Math.sqrt(ss / n + eps);
  const y = new Float32Array(n);
  for (let i = 0; i < n; i++) y[i] = weight[i] * Math.fround(x[off + i] * inv);
  return y;
}

export function silu(x: number): number {
  return x / (1 + Math.exp(-x));
}

/** Rotary embedding in the "rotate half" layout transformers uses, on each head in place. */
export function applyRope(v: Float32Array, numHeads: number, headDim: number, pos: number, theta: number): void {
  const half = headDim / 2;
  for (let i = 0; i < half; i++) {
    const invFreq = 1 / Math.pow(theta, (2 * i) / headDim);
    const ang = pos * invFreq;
    const cos = Math.cos(ang);
    const sin = Math.sin(ang);
    for (let h = 0; h < numHeads; h++) {
      const a = h * headDim + i;
      const x1 = v[a];
      const x2 = v[a + half];
      v[a] = x1 * cos - x2 * sin;
      v[a + half] = x2 * cos + x1 * sin;
    }
  }
}

/** Numerically stable softmax in float64. */
export function softmax(logits: ArrayLike<number>): Float64Array {
  let max = -Infinity;
  for (let i = 0; i < logits.length; i++) max = Math.max(max, logits[i]);
  const out = new Float64Array(logits.length);
  let sum = 0;
  for (let i = 0; i < logits.length; i++) {
    out[i] = Math.exp(logits[i] - max);
    sum += out[i];
  }
  for (let i = 0; i < logits.length; i++) out[i] /= sum;
  return out;
}

export interface Routing {
  experts: number[]; // top-k expert ids, highest probability first
  weights: number[]; // their gate weights
}

/**
 * The gating rule: softmax over all experts' logits, the top-k by probability (ties to the
 * lower id), renormalised to sum 1 when the rule says so.
 */
export function route(spec: ModelSpec, routerLogits: ArrayLike<number>): Routing {
  const p = softmax(routerLogits);
  const order = Array.from(p.keys()).sort((a, b) => p[b] - p[a] || a - b);
  const experts = order.slice(0, spec.topK);
  let weights = experts.map((e) => p[e]);
  if (spec.gating === 'softmax_topk_renorm') {
    const s = weights.reduce((a, b) => a + b, 0);
    weights = weights.map((w) => w / s);
  }
  return { experts, weights };
}

/** One SwiGLU FFN: down(silu(gate x) * up x), for the token at `off` in x. */
export function swiglu(e: ExpertWeights, hidden: number, width: number, x: Float32Array, off = 0): Float32Array {
  const g = matvec(e.gate, width, hidden, x, off);
  const u = matvec(e.up, width, hidden, x, off);
  const act = new Float32Array(width);
  for (let i = 0; i < width; i++) act[i] = silu(g[i]) * u[i];
  return matvec(e.down, hidden, width, act);
}

export interface MoeResult {
  out: Float32Array; // (tokens, hidden)
  routing: Routing[]; // [tokens]
}

/**
 * The sparse MoE block on `tokens` rows of already-normalised hidden states x (tokens, hidden).
 * Tokens are grouped by expert, so each activated expert is visited once for all its tokens,
 * as the engine does; the order of accumulation per token is by its routing rank.
 */
export function moeBlock(
  spec: ModelSpec,
  lw: LayerWeights,
  x: Float32Array,
  tokens: number,
  forced?: Routing[],
  onRouterLogits?: (token: number, logits: Float32Array) => void,
): MoeResult {
  const h = spec.hiddenSize;
  const routing: Routing[] = [];
  for (let t = 0; t < tokens; t++) {
    const logits = matvec(lw.router, spec.numExperts, h, x, t * h);
    onRouterLogits?.(t, logits);
    routing.push(forced ? forced[t] : route(spec, logits));
  }
  const acc = new Float64Array(tokens * h);
  const byExpert = new Map<number, { token: number; weight: number }[]>();
  routing.forEach((r, t) =>
    r.experts.forEach((e, i) => {
      if (!byExpert.has(e)) byExpert.set(e, []);
      byExpert.get(e)!.push({ token: t, weight: r.weights[i] });
    }),
  );
  for (const [e, assigned] of [...byExpert.entries()].sort((a, b) => a[0] - b[0])) {
    for (const { token, weight } of assigned) {
      const y = swiglu(lw.experts[e], h, spec.expertIntermediateSize, x, token * h);
      for (let i = 0; i < h; i++) acc[token * h + i] += weight * y[i];
    }
  }
  if (lw.shared) {
    for (let t = 0; t < tokens; t++) {
      const y = swiglu(lw.shared, h, spec.sharedExpertIntermediateSize, x, t * h);
      const g = 1 / (1 + Math.exp(-matvec(lw.shared.gateScalar, 1, h, x, t * h)[0]));
      for (let i = 0; i < h; i++) acc[t * h + i] += g * y[i];
    }
  }
  return { out: Float32Array.from(acc), routing };
}

// ---------------------------------------------------------------------------
// KV cache and the whole model

/** Keys (after q/k norm and RoPE) and values of every processed position, per layer. */
export class KvCache {
  readonly keys: Float32Array[][]; // [layer][position] → (kv_heads * head_dim)
  readonly values: Float32Array[][]; // [layer][position] → (kv_heads * head_dim)

  constructor(numLayers: number) {
    this.keys = Array.from({ length: numLayers }, () => []);
    this.values = Array.from({ length: numLayers }, () => []);
  }

  get length(): number {
    return this.keys[0]?.length ?? 0;
  }
}

export interface ForwardOptions {
  /** Routing to use instead of the router's, per layer and new token (trace replay). */
  forcedRouting?: Routing[][];
  /** Called with each layer's routing of the new tokens. */
  onRouting?: (layer: number, routing: Routing[]) => void;
  /** Called with each new token's router logits (experts) in each layer. */
  onRouterLogits?: (layer: number, token: number, logits: Float32Array) => void;
  /** Called with the residual stream (tokens, hidden) after each layer. */
  onResidual?: (layer: number, x: Float32Array) => void;
}

export class ReferenceModel {
  constructor(
    readonly spec: ModelSpec,
    readonly w: ModelWeights,
  ) {}

  static fromSource(spec: ModelSpec, get: TensorSource): ReferenceModel {
    return new ReferenceModel(spec, loadWeights(spec, get));
  }

  newCache(): KvCache {
    return new KvCache(this.spec.numLayers);
  }

  /**
   * Runs the new tokens through the model after the positions already in `cache`, appends
   * their keys and values, and returns the logits of every new position: (tokens, vocab).
   */
  forward(tokens: ArrayLike<number>, cache: KvCache, opts: ForwardOptions = {}): Float32Array {
    const s = this.spec;
    const h = s.hiddenSize;
    const T = tokens.length;
    const start = cache.length;
    if (start + T > s.maxPositionEmbeddings) {
      throw new Error(`sequence of ${start + T} tokens exceeds max_position_embeddings ${s.maxPositionEmbeddings}`);
    }
    const x = new Float32Array(T * h); // (tokens, hidden): the residual stream
    for (let t = 0; t < T; t++) {
      const id = tokens[t];
      if (!Number.isInteger(id) || id < 0 || id >= s.vocabSize) throw new Error(`token id ${id} outside the vocabulary (${s.vocabSize})`);
      x.set(this.w.embed.subarray(id * h, (id + 1) * h), t * h);
    }
    for (let l = 0; l < s.numLayers; l++) {
      const lw = this.w.layers[l];
      const attn = this.attention(l, lw, x, T, start, cache);
      for (let i = 0; i < x.length; i++) x[i] += attn[i];
      const normed = new Float32Array(T * h);
      for (let t = 0; t < T; t++) normed.set(rmsNorm(x, lw.postAttnNorm, s.rmsNormEps, t * h, h), t * h);
      const onLogits = opts.onRouterLogits;
      const moe = moeBlock(s, lw, normed, T, opts.forcedRouting?.[l], onLogits ? (t, logits) => onLogits(l, t, logits) : undefined);
      opts.onRouting?.(l, moe.routing);
      for (let i = 0; i < x.length; i++) x[i] += moe.out[i];
      opts.onResidual?.(l, x);
    }
    const logits = new Float32Array(T * s.vocabSize);
    for (let t = 0; t < T; t++) {
      const hn = rmsNorm(x, this.w.finalNorm, s.rmsNormEps, t * h, h);
      logits.set(matvec(this.w.lmHead, s.vocabSize, h, hn), t * s.vocabSize);
    }
    return logits;
  }

  /** Causal grouped-query self-attention of the new tokens; returns (tokens, hidden). */
  private attention(l: number, lw: LayerWeights, x: Float32Array, T: number, start: number, cache: KvCache): Float32Array {
    const s = this.spec;
    const h = s.hiddenSize;
    const hd = s.headDim;
    const qDim = s.numHeads * hd;
    const kvDim = s.numKvHeads * hd;
    const queries: Float32Array[] = [];
    for (let t = 0; t < T; t++) {
      const xn = rmsNorm(x, lw.inputNorm, s.rmsNormEps, t * h, h);
      let q = matvec(lw.q, qDim, h, xn, 0, lw.qBias);
      let k = matvec(lw.k, kvDim, h, xn, 0, lw.kBias);
      const v = matvec(lw.v, kvDim, h, xn, 0, lw.vBias);
      if (s.qkNorm === 'full') {
        q = rmsNorm(q, lw.qNorm!, s.rmsNormEps);
        k = rmsNorm(k, lw.kNorm!, s.rmsNormEps);
      } else if (s.qkNorm === 'per_head') {
        for (let hh = 0; hh < s.numHeads; hh++) q.set(rmsNorm(q, lw.qNorm!, s.rmsNormEps, hh * hd, hd), hh * hd);
        for (let hh = 0; hh < s.numKvHeads; hh++) k.set(rmsNorm(k, lw.kNorm!, s.rmsNormEps, hh * hd, hd), hh * hd);
      }
      applyRope(q, s.numHeads, hd, start + t, s.ropeTheta);
      applyRope(k, s.numKvHeads, hd, start + t, s.ropeTheta);
      queries.push(q);
      cache.keys[l].push(k);
      cache.values[l].push(v);
    }
    const group = s.numHeads / s.numKvHeads;
    const scale = 1 / Math.sqrt(hd);
    const out = new Float32Array(T * h);
    const ctx = new Float32Array(qDim);
    for (let t = 0; t < T; t++) {
      const visible = start + t + 1; // causal: positions 0 .. start+t
      for (let hh = 0; hh < s.numHeads; hh++) {
        const kvh = Math.floor(hh / group);
        const scores = new Float64Array(visible);
        for (let p = 0; p < visible; p++) {
          const key = cache.keys[l][p];
          let dot = 0;
          for (let i = 0; i < hd; i++) dot += queries[t][hh * hd + i] * key[kvh * hd + i];
          scores[p] = dot * scale;
        }
        const probs = softmax(scores);
        for (let i = 0; i < hd; i++) {
          let acc = 0;
          for (let p = 0; p < visible; p++) acc += probs[p] * cache.values[l][p][kvh * hd + i];
          ctx[hh * hd + i] = acc;
        }
      }
      out.set(matvec(lw.o, h, qDim, ctx), t * h);
    }
    return out;
  }
}
