// What both engines of the engine benchmark share: the workload (the same token ids for
// both), the bandwidth probe, the decode roofline and the process's memory figures.

import { readFileSync } from 'node:fs';
import { loadNative } from '../../src/engine/native.js';
import type { ModelSpec } from '../../src/model/spec.js';
import { rowBytes as engineRowBytes } from '../../src/offload/capacity.js';

// ---------------------------------------------------------------------------------
// Workload

export interface Workload {
  /** Ids below this are real tokens of the generated tokenizers (byte tokens and merges). */
  tokenLimit: number;
  /** The warm-up prefill (a different prompt from the timed one). */
  warmPrompt: number[];
  /** The timed prefill: one step of these tokens. */
  prefillPrompt: number[];
  /** Timed prefills (each from position 0); the figure is tokens / total time. */
  prefillReps: number;
  /** Single-stream decode: this short prompt, then untimed then timed decode steps. */
  decodePrompt: number[];
  decodeWarmSteps: number;
  decodeSteps: number;
  /** Batched decode: sequences per batch; each has its own short prompt. */
  batchSizes: number[];
  batchPromptLength: number;
  batchWarmSteps: number;
  batchSteps: number;
  /**
   * Long context: this prompt (empty: not measured), prefilled in chunks of 512 tokens,
   * then greedy decode steps over it.
   */
  longPrompt: number[];
  longDecodeSteps: number;
}

/** Prompt tokens per step of the long-context prefill (the server's default maxBatchTokens). */
export const LONG_PREFILL_CHUNK = 512;

/** Deterministic ids in [lo, hi). */
export function tokenIds(n: number, seed: number, lo: number, hi: number): number[] {
  let s = (seed * 2654435761) >>> 0 || 1;
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out.push(lo + (s % (hi - lo)));
  }
  return out;
}

export function makeWorkload(o: { decodeSteps: number; batchSteps: number; prefillReps: number; prefillTokens: number; longContext: number }): Workload {
  const tokenLimit = 4000;
  const ids = (n: number, seed: number) => tokenIds(n, seed, 256, tokenLimit);
  return {
    tokenLimit,
    warmPrompt: ids(o.prefillTokens, 1),
    prefillPrompt: ids(o.prefillTokens, 2),
    prefillReps: o.prefillReps,
    decodePrompt: ids(16, 3),
    decodeWarmSteps: 2,
    decodeSteps: o.decodeSteps,
    batchSizes: [8, 32],
    batchPromptLength: 16,
    batchWarmSteps: 2,
    batchSteps: o.batchSteps,
    longPrompt: ids(o.longContext, 5),
    longDecodeSteps: 16,
  };
}

/** The prompt of sequence i of a batch (distinct per sequence). */
export function batchPrompt(w: Workload, i: number): number[] {
  return tokenIds(w.batchPromptLength, 100 + i, 256, w.tokenLimit);
}

/** Greedy choice among the real tokens: argmax of logits[row * vocab + id] over id < limit. */
export function argmaxBelow(logits: Float32Array, row: number, vocab: number, limit: number): number {
  const base = row * vocab;
  const n = Math.min(limit, vocab);
  let best = 0;
  let bv = -Infinity;
  for (let i = 0; i < n; i++) {
    const v = logits[base + i];
    if (v > bv) {
      bv = v;
      best = i;
    }
  }
  return best;
}

// ---------------------------------------------------------------------------------
// Results

export interface BatchResult {
  sequences: number;
  steps: number;
  seconds: number;
  /** Aggregate decoded tokens per second over all sequences. */
  tokensPerSecond: number;
  /** llama.cpp only: decode batches dispatched during the timed steps (= steps when every step was one batch). */
  dispatches?: number;
}

export interface LongContextResult {
  context: number;
  prefillSeconds: number;
  decodeSteps: number;
  decodeSeconds: number;
  /** How this engine ran it (KV cache type, attention kernel). */
  setup: string;
}

export interface EngineResult {
  engine: 'ours' | 'llama.cpp';
  loadSeconds: number;
  prefill: { tokens: number; seconds: number[]; tokensPerSecond: number };
  decode: { steps: number; seconds: number; tokensPerSecond: number; chunks: DecodeChunk[] };
  batches: BatchResult[];
  /** Decode after a long prompt (Workload.longPrompt), when one was given. */
  long?: LongContextResult;
  /** Probe right before and right after the measurements (GB/s), and their mean. */
  bandwidthBefore: number;
  bandwidthAfter: number;
  bandwidth: number;
  notes: string[];
}

// ---------------------------------------------------------------------------------
// Bandwidth probe

export const PROBE_BYTES = 1 << 30;
export const PROBE_SECONDS = 1.0;

/** Streaming-read bandwidth (GB/s) with `threads` threads over a 1 GiB buffer (the addon's own pool). */
export function probeBandwidth(threads: number): number {
  const r = loadNative().streamBench(PROBE_BYTES, threads, PROBE_SECONDS);
  return r.bytes / r.seconds / 1e9;
}

/**
 * int8 multiply-accumulate peak (GMAC/s) with `threads` threads: the active ISA's int8
 * dot-product instructions on registers (macPeakBench; `mix` "q4_0": the Q4_0 token-group
 * kernel's mix), the compute side of the roofline. The best of `rounds` short runs: on these shared VMs one run can land in a slow spell
 * (seen here: 19 against 31 GMAC/s minutes apart), and a limit must not sit below what
 * the kernels reach.
 */
export function probeMacPeak(threads: number, mix: 'q8_0' | 'q4_0' = 'q8_0', rounds = 8, seconds = 0.15): number {
  let best = 0;
  for (let i = 0; i < rounds; i++) {
    const r = loadNative().macPeakBench(threads, seconds, mix);
    best = Math.max(best, r.macs / r.seconds / 1e9);
  }
  return best;
}

export const sleep = (ms: number) => new Promise<void>((res) => setTimeout(res, ms));

/** Steps of single-stream decode between two short probes. */
export const DECODE_CHUNK_STEPS = 8;

/** Chunks of the single-stream decode (the rounds that interleave other measurements with it). */
export const decodeChunks = (steps: number) => Math.ceil(steps / DECODE_CHUNK_STEPS);
/** Seconds of each probe between decode chunks. */
export const CHUNK_PROBE_SECONDS = 0.25;

/** A run of decode steps timed between two probes (GB/s) taken right before and right after it. */
export interface DecodeChunk {
  steps: number;
  seconds: number;
  bandwidthBefore: number;
  bandwidthAfter: number;
}

/**
 * Single-stream decode in chunks of DECODE_CHUNK_STEPS steps with a short probe before
 * each chunk and after the last. Memory bandwidth here switches between about 33 and 60
 * GB/s within seconds, so probes around a whole run (seconds apart) can each catch the
 * other mode than the decode had; each chunk is compared with the probes beside it
 * (decodeRooflineFraction). The steps run back to back inside a chunk.
 */
export async function decodeInChunks(
  threads: number,
  steps: number,
  run: (n: number) => Promise<void> | void,
  /** Runs after each chunk and its probe (another measurement interleaved with the chunks); a new probe follows it. */
  between?: () => void,
): Promise<{ seconds: number; chunks: DecodeChunk[] }> {
  // The probe buffer stays allocated from one chunk to the next (allocating 1 GiB each time
  // disturbed the steps after it); the last probe releases it.
  const probe = (keep = true) => {
    const r = loadNative().streamBench(PROBE_BYTES, threads, CHUNK_PROBE_SECONDS, keep);
    return r.bytes / r.seconds / 1e9;
  };
  const chunks: DecodeChunk[] = [];
  let before = probe();
  for (let done = 0; done < steps; ) {
    const n = Math.min(DECODE_CHUNK_STEPS, steps - done);
    const t = performance.now();
    await run(n);
    const seconds = (performance.now() - t) / 1000;
    const after = probe(done + n < steps);
    chunks.push({ steps: n, seconds, bandwidthBefore: before, bandwidthAfter: after });
    before = after;
    done += n;
    if (between && done < steps) {
      between();
      before = probe();
    }
  }
  return { seconds: chunks.reduce((a, c) => a + c.seconds, 0), chunks };
}

/**
 * Decode time over roofline time: each chunk's roofline is its steps × bytes per token
 * at the mean of the probes beside it; the fraction is the sum of those times over the
 * sum of the chunks' own times (1 = every chunk decoded at its measured bandwidth).
 */
/** Bandwidth (GB/s) beside a chunk: the mean of the probes right before and right after it. */
export const chunkProbe = (c: DecodeChunk) => (c.bandwidthBefore + c.bandwidthAfter) / 2;

export function decodeRooflineFraction(chunks: readonly DecodeChunk[], bytesPerToken: number): number {
  let roof = 0;
  let real = 0;
  for (const c of chunks) {
    roof += (c.steps * bytesPerToken) / (chunkProbe(c) * 1e9);
    real += c.seconds;
  }
  return real > 0 ? roof / real : NaN;
}

/** Bandwidth (GB/s) the chunked decode saw: bytes over roofline time, i.e. the time-weighted harmonic mean of the chunks' probes. */
export function chunkBandwidth(chunks: readonly DecodeChunk[]): number {
  let steps = 0;
  let t = 0;
  for (const c of chunks) {
    steps += c.steps;
    t += c.steps / chunkProbe(c);
  }
  return t > 0 ? steps / t : NaN;
}

// ---------------------------------------------------------------------------------
// Roofline: weight bytes read per decoded token

export interface ReadBytes {
  /** Attention projections q, k, v, o (quantized) and their biases / q-k norms, all layers. */
  attention: number;
  /** Routers (float32), all layers. */
  router: number;
  /** RMSNorm weights (float32): two per layer and the final one. */
  norms: number;
  /** Shared experts (quantized) and their gate vectors, all layers. */
  shared: number;
  lmHead: number;
  /** One embedding row. */
  embedRow: number;
  nonExpert: number;
  /** One routed expert (gate, up, down), quantized. */
  perExpert: number;
  /** topK × perExpert × layers. */
  experts: number;
  total: number;
}

/** Bytes per row of `cols` weights in a ggml-style format (the engine's own row size). */
export function rowBytes(format: 'q8_0' | 'q4_0', cols: number): number {
  if (cols % 32 !== 0) throw new Error(`${format}: rows of ${cols} are not whole 32-value blocks`);
  return engineRowBytes(format, cols);
}

/**
 * Weight bytes one decoded token reads (a single sequence): every non-expert matrix once
 * (attention, router, norms, LM head), one embedding row, and top-k experts per layer.
 * Experts in the quantized format, the other matrices in its dense format (q8_0 for q4_0);
 * routers, norms and biases float32 (as both our engine and the GGUF export store them).
 */
export function bytesPerToken(s: ModelSpec, format: 'q8_0' | 'q4_0'): ReadBytes {
  const expertFormat = format;
  const denseFormat = 'q8_0';
  const h = s.hiddenSize;
  const q = s.numHeads * s.headDim;
  const kv = s.numKvHeads * s.headDim;
  const L = s.numLayers;
  let attention = q * rowBytes(denseFormat, h) + 2 * kv * rowBytes(denseFormat, h) + h * rowBytes(denseFormat, q);
  if (s.qkvBias) attention += (q + 2 * kv) * 4;
  if (s.qkNorm === 'per_head') attention += 2 * s.headDim * 4;
  if (s.qkNorm === 'full') attention += (q + kv) * 4;
  attention *= L;
  const router = L * s.numExperts * h * 4;
  const norms = (2 * L + 1) * h * 4;
  const sw = s.sharedExpertIntermediateSize;
  const shared = sw > 0 ? L * (2 * sw * rowBytes(expertFormat, h) + h * rowBytes(expertFormat, sw) + h * 4) : 0;
  const lmHead = s.vocabSize * rowBytes(denseFormat, h);
  const embedRow = rowBytes(denseFormat, h);
  const nonExpert = attention + router + norms + shared + lmHead + embedRow;
  const perExpert = 2 * s.expertIntermediateSize * rowBytes(expertFormat, h) + h * rowBytes(expertFormat, s.expertIntermediateSize);
  const experts = s.topK * perExpert * L;
  return { attention, router, norms, shared, lmHead, embedRow, nonExpert, perExpert, experts, total: nonExpert + experts };
}

/**
 * Weight multiply-accumulates of one decoded token: the attention projections, the
 * router, the shared expert, top-k routed experts per layer and the LM head (attention
 * over the context is left out: a few hundred positions add well under 1%).
 */
export function macsPerToken(s: ModelSpec): number {
  const h = s.hiddenSize;
  const q = s.numHeads * s.headDim;
  const kv = s.numKvHeads * s.headDim;
  const perLayer = h * (q + 2 * kv) + q * h + h * s.numExperts + 3 * h * s.sharedExpertIntermediateSize + s.topK * 3 * h * s.expertIntermediateSize;
  return s.numLayers * perLayer + s.vocabSize * h;
}

/** Weight MACs of one token in its routed experts (top-k of each layer). */
export function expertMacsPerToken(s: ModelSpec): number {
  return s.numLayers * s.topK * 3 * s.hiddenSize * s.expertIntermediateSize;
}

/** Expected distinct experts of a layer when `n` tokens each pick k of E uniformly at random (the benchmark's random weights route nearly so). */
export function expectedDistinct(experts: number, k: number, n: number): number {
  return experts * (1 - Math.pow(1 - k / experts, n));
}

/**
 * Roofline of a decode step of `n` sequences: the larger of weight traffic at `gbps` and
 * weight MACs at `gmacs` (the routed experts' MACs at `expertGmacs`: a format whose
 * kernels have a faster instruction mix, Q4_0 on AVX2, has its own peak).
 */
export interface StepRoofline {
  bytes: number;
  macs: number;
  memorySeconds: number;
  computeSeconds: number;
  /** Aggregate tokens/s at the roofline. */
  tokensPerSecond: number;
}

export function stepRoofline(s: ModelSpec, read: ReadBytes, n: number, gbps: number, gmacs: number, expertGmacs = gmacs): StepRoofline {
  const bytes = read.nonExpert + (n - 1) * read.embedRow + s.numLayers * expectedDistinct(s.numExperts, s.topK, n) * read.perExpert;
  const macs = n * macsPerToken(s);
  const expertMacs = n * expertMacsPerToken(s);
  const memorySeconds = bytes / (gbps * 1e9);
  const computeSeconds = (macs - expertMacs) / (gmacs * 1e9) + expertMacs / (expertGmacs * 1e9);
  return { bytes, macs, memorySeconds, computeSeconds, tokensPerSecond: n / Math.max(memorySeconds, computeSeconds) };
}

/**
 * A tighter bound for a decode step than stepRoofline: the step's stages in the order
 * their data depend on each other, each at the larger of its weight traffic at `gbps`
 * and its weight MACs at the int8 peak, summed. Per layer: q/k/v projections, then o_proj
 * (after attention), then the router, then the experts (the routed experts its tokens
 * activate and the shared expert, which may overlap each other); after the last layer the
 * LM head. A stage cannot start before the one it reads from ends, so a compute-bound
 * stage (the LM head of 32 tokens) cannot hide behind a memory-bound one (the experts):
 * no engine that moves the whole batch through the layers together, reading each weight
 * once per step, gets past it. It reads the bytes stepRoofline counts, so it is never
 * above that roofline. Left out, so that it stays a bound: attention over the cache, the
 * norms' arithmetic and the time between stages.
 */
export interface StageBound {
  /** Seconds of each stage kind over the whole step (summed over layers). */
  stages: { name: string; seconds: number; bound: 'memory' | 'compute' }[];
  seconds: number;
  tokensPerSecond: number;
}

export function stageChainBound(s: ModelSpec, format: 'q8_0' | 'q4_0', n: number, gbps: number, gmacs: number, expertGmacs = gmacs): StageBound {
  const h = s.hiddenSize;
  const q = s.numHeads * s.headDim;
  const kv = s.numKvHeads * s.headDim;
  const L = s.numLayers;
  const dense = 'q8_0';
  const stage = (name: string, bytes: number, macs: number, peak = gmacs) => {
    const mem = bytes / (gbps * 1e9);
    const cpu = macs / (peak * 1e9);
    return { name, seconds: Math.max(mem, cpu), bound: cpu > mem ? ('compute' as const) : ('memory' as const) };
  };
  // Small tensors go with the stage that reads them: the input norm, q/k/v biases and q/k
  // norms with qkv, the post-attention norm with the router, the final norm with the LM head.
  let qkvExtra = h * 4;
  if (s.qkvBias) qkvExtra += (q + 2 * kv) * 4;
  if (s.qkNorm === 'per_head') qkvExtra += 2 * s.headDim * 4;
  if (s.qkNorm === 'full') qkvExtra += (q + kv) * 4;
  const perLayer = [
    stage('qkv', (q + 2 * kv) * rowBytes(dense, h) + qkvExtra, n * h * (q + 2 * kv)),
    stage('o_proj', h * rowBytes(dense, q), n * q * h),
    stage('router', s.numExperts * h * 4 + h * 4, n * h * s.numExperts),
  ];
  const w = s.expertIntermediateSize;
  const sw = s.sharedExpertIntermediateSize;
  const perExpert = 2 * w * rowBytes(format, h) + h * rowBytes(format, w);
  const sharedBytes = sw > 0 ? 2 * sw * rowBytes(format, h) + h * rowBytes(format, sw) + h * 4 : 0;
  const expertBytes = expectedDistinct(s.numExperts, s.topK, n) * perExpert + sharedBytes;
  const expertMacs = n * s.topK * 3 * h * w;
  const sharedMacs = n * 3 * h * sw;
  const mem = expertBytes / (gbps * 1e9);
  const cpu = (expertMacs + sharedMacs) / (expertGmacs * 1e9);
  perLayer.push({ name: 'experts', seconds: Math.max(mem, cpu), bound: cpu > mem ? 'compute' : 'memory' });
  const stages = [stage('embedding', n * rowBytes(dense, h), 0), ...perLayer.map((st) => ({ ...st, seconds: st.seconds * L }))];
  stages.push(stage('lm_head', s.vocabSize * rowBytes(dense, h) + h * 4, n * s.vocabSize * h));
  const seconds = stages.reduce((a, st) => a + st.seconds, 0);
  return { stages, seconds, tokensPerSecond: n / seconds };
}

/**
 * The engine's phase profile (Engine::take_profile, milliseconds per phase summed over
 * steps; MOE_SERVE_PROFILE=1) as the stage chain's stages, in milliseconds per step: each
 * chain stage next to the phases that read its weights (experts: gate_up and down), and
 * what reads no weights of the chain (RoPE and the KV cache, attention, the expert jobs'
 * preparation, SiLU, the combine) as `other`. Phases it does not know count as `other`.
 */
export function measuredStages(profileMs: Readonly<Record<string, number>>, steps: number): { name: string; ms: number }[] {
  const stageOf: Record<string, string> = { embed: 'embedding', qkv: 'qkv', o_proj: 'o_proj', router: 'router', gate_up: 'experts', down: 'experts', lm_head: 'lm_head' };
  const order = ['embedding', 'qkv', 'o_proj', 'router', 'experts', 'lm_head', 'other'];
  const ms = new Map<string, number>(order.map((n) => [n, 0]));
  for (const [phase, v] of Object.entries(profileMs)) {
    const name = stageOf[phase] ?? 'other';
    ms.set(name, ms.get(name)! + v / Math.max(1, steps));
  }
  return order.map((name) => ({ name, ms: ms.get(name)! }));
}

// ---------------------------------------------------------------------------------
// Memory of this process

export interface ProcMemory {
  /** VmRSS, RssAnon, RssFile, VmHWM in bytes. */
  rss: number;
  anon: number;
  file: number;
  peak: number;
}

export function procMemory(): ProcMemory {
  const text = readFileSync('/proc/self/status', 'utf8');
  const kb = (key: string) => {
    const m = new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(text);
    return m ? Number(m[1]) * 1024 : NaN;
  };
  return { rss: kb('VmRSS'), anon: kb('RssAnon'), file: kb('RssFile'), peak: kb('VmHWM') };
}

export const GB = (b: number) => (b / 1e9).toFixed(2) + ' GB';
export const MB = (b: number) => (b / 1e6).toFixed(1) + ' MB';
