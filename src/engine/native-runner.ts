// The native engine behind the runner contract: weights packed by the addon in the
// chosen format (one copy; the checkpoint's mapping is released after loading), a paged
// KV cache, and the fused step or the per-layer calls.

import { freemem, totalmem } from 'node:os';
import { readFileSync } from 'node:fs';
import { openModel } from '../model/checkpoint.js';
import type { SafetensorsCheckpoint } from '../model/safetensors.js';
import { paramCounts, type ModelSpec } from '../model/spec.js';
import { EMBED, FINAL_NORM, LM_HEAD, layerNames } from '../model/tensor-names.js';
import { loadNative, type NativeEngine, type NativeEngineOptions } from './native.js';
import { logitRows, type KvGeometry, type ModelRunner, type RoutingEvent, type RoutingHint, type StepOutput, type StepSequence } from './runner.js';
import type { Routing, RoutingReplay, StepTokens } from '../offload/replay.js';
import { RecentRouting } from '../scheduler/recent-routing.js';

/** Weight formats users choose (`--weights`), and the addon's names for them. */
export const WEIGHT_FORMATS = { f32: 'f32', bf16: 'bf16', f16: 'f16', q8: 'q8_0', q4: 'q4_0' } as const;
export type WeightFormat = keyof typeof WEIGHT_FORMATS;

/** Bytes per weight of each format (quantized ones include their block scales). */
export const BYTES_PER_WEIGHT: Record<WeightFormat, number> = { f32: 4, bf16: 2, f16: 2, q8: 34 / 32, q4: 18 / 32 };

/** KV cache element types (`--kv-cache-type`) and their bytes. */
export const KV_CACHE_BYTES = { f32: 4, f16: 2 } as const;
export type KvCacheType = keyof typeof KV_CACHE_BYTES;

export interface NativeRunnerOptions {
  weights: WeightFormat;
  threads: number;
  kvBlockSize: number;
  kvBlocks: number;
  /** KV cache elements (default f32). */
  kvCacheType?: KvCacheType;
  /** Take each token's experts from a recorded trace instead of the router (the step then runs in pieces). */
  replay?: RoutingReplay;
  /** Called with every layer's routing when the step runs in pieces (replay). */
  onRouting?: (e: RoutingEvent) => void;
  /**
   * Write every step's logits into one buffer and return views of it, valid until the
   * next step (for callers that consume them at once, like the engine loop): a
   * 32-sequence step of a 152k vocabulary returns 19 MB, and fresh memory for it every
   * step costs about as much as that step's attention.
   */
  reuseLogits?: boolean;
}

/** The logits buffer of a runner with reuseLogits: grown to the largest step seen, then reused. */
export class LogitsBuffer {
  private buf = new Float32Array(0);
  /** At least `floats` floats (contents undefined). */
  take(floats: number): Float32Array {
    if (this.buf.length < floats) this.buf = new Float32Array(floats);
    return this.buf;
  }
}

export class ModelTooLargeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ModelTooLargeError';
  }
}

/**
 * Format of the dense matrices (embeddings, attention, lm_head) for a weight format: q4
 * applies to the experts only and the rest stays at q8, as llama.cpp's 4-bit mixes keep
 * their most sensitive tensors at higher precision; these are a few percent of an MoE
 * model's bytes and most of q4's error on the next-token choice.
 */
export function denseFormat(weights: WeightFormat): WeightFormat {
  return weights === 'q4' ? 'q8' : weights;
}

/**
 * Bytes of the weights the engine holds (its own count, info().weightBytes, exactly):
 * norms, biases and routers in float32, routed and shared experts in the chosen format,
 * the other matrices in its dense format, and pre-gating's Q8_0 copy of each router
 * (when the hidden size is a multiple of 32). With `routedExperts: false`, the routed
 * experts are left out (offloading holds them in slots).
 */
export function weightBytes(spec: ModelSpec, weights: WeightFormat, routedExperts = true): number {
  const c = paramCounts(spec);
  const h = spec.hiddenSize;
  const q = spec.numHeads * spec.headDim;
  const kv = spec.numKvHeads * spec.headDim;
  // Per layer in float32: the two norms, the router, the shared expert's gate, the q/k/v
  // biases and the q/k norms (per head or full width).
  const qkvBias = spec.qkvBias ? q + 2 * kv : 0;
  const qkNorm = spec.qkNorm === 'per_head' ? 2 * spec.headDim : spec.qkNorm === 'full' ? q + kv : 0;
  const f32Params = spec.numLayers * (2 * h + spec.numExperts * h + (spec.sharedExpertIntermediateSize > 0 ? h : 0) + qkvBias + qkNorm) + h;
  const sharedParams = spec.numLayers * 3 * h * spec.sharedExpertIntermediateSize;
  const denseParams = c.nonExpertParams - f32Params - sharedParams;
  const routerCopies = h % 32 === 0 ? spec.numLayers * spec.numExperts * h * BYTES_PER_WEIGHT.q8 : 0;
  return (
    routerCopies +
    (routedExperts ? c.expertParams : 0) * BYTES_PER_WEIGHT[weights] +
    sharedParams * BYTES_PER_WEIGHT[weights] +
    denseParams * BYTES_PER_WEIGHT[denseFormat(weights)] +
    f32Params * 4
  );
}

/** Bytes of the engine's KV cache: keys and values of every layer, block and KV head. */
export function kvCacheBytes(spec: ModelSpec, o: Pick<NativeRunnerOptions, 'kvBlocks' | 'kvBlockSize' | 'kvCacheType'>): number {
  return 2 * spec.numLayers * o.kvBlocks * o.kvBlockSize * spec.numKvHeads * spec.headDim * KV_CACHE_BYTES[o.kvCacheType ?? 'f32'];
}

/** Bytes the engine will hold for a model: weights in the chosen format plus the KV cache. */
export function estimateEngineBytes(spec: ModelSpec, o: NativeRunnerOptions): { weights: number; kv: number } {
  return { weights: weightBytes(spec, o.weights), kv: kvCacheBytes(spec, o) };
}

/** Memory this process may use: the cgroup limit when there is one, else free RAM. */
export function availableBytes(): number {
  let limit = Infinity;
  try {
    const raw = readFileSync('/sys/fs/cgroup/memory.max', 'utf8').trim();
    if (raw !== 'max') limit = Number(raw);
  } catch {
    // no cgroup v2 limit
  }
  return Math.min(limit, Math.max(freemem(), totalmem() * 0.9));
}

export function engineOptions(spec: ModelSpec, o: NativeRunnerOptions): NativeEngineOptions {
  return {
    vocab: spec.vocabSize,
    hidden: spec.hiddenSize,
    layers: spec.numLayers,
    heads: spec.numHeads,
    kvHeads: spec.numKvHeads,
    headDim: spec.headDim,
    experts: spec.numExperts,
    topK: spec.topK,
    expertWidth: spec.expertIntermediateSize,
    sharedWidth: spec.sharedExpertIntermediateSize,
    renormTopK: spec.gating === 'softmax_topk_renorm',
    qkNorm: spec.qkNorm,
    qkvBias: spec.qkvBias,
    tieEmbeddings: spec.tieWordEmbeddings,
    rmsEps: spec.rmsNormEps,
    ropeTheta: spec.ropeTheta,
    maxPositions: spec.maxPositionEmbeddings,
    weights: WEIGHT_FORMATS[o.weights],
    threads: o.threads,
    kvBlockSize: o.kvBlockSize,
    kvBlocks: o.kvBlocks,
    kvCacheType: o.kvCacheType ?? 'f32',
  };
}

/** Hands every tensor of the checkpoint to the engine under its role. */
export function loadTensors(engine: NativeEngine, spec: ModelSpec, ckpt: SafetensorsCheckpoint): void {
  const put = (role: string, layer: number, expert: number, name: string) => {
    const info = ckpt.info(name);
    const rows = info.shape.length === 1 ? 1 : info.shape[0];
    const cols = info.shape[info.shape.length - 1];
    engine.setTensor(role, layer, expert, ckpt.bytes(name), info.dtype, rows, cols);
  };
  put('embed', -1, 0, EMBED);
  put('final_norm', -1, 0, FINAL_NORM);
  if (!spec.tieWordEmbeddings) put('lm_head', -1, 0, LM_HEAD);
  for (let l = 0; l < spec.numLayers; l++) {
    const n = layerNames(spec, l);
    put('input_norm', l, 0, n.inputNorm);
    put('post_norm', l, 0, n.postAttnNorm);
    put('q', l, 0, n.q);
    put('k', l, 0, n.k);
    put('v', l, 0, n.v);
    put('o', l, 0, n.o);
    if (n.qBias && n.kBias && n.vBias) {
      put('q_bias', l, 0, n.qBias);
      put('k_bias', l, 0, n.kBias);
      put('v_bias', l, 0, n.vBias);
    }
    if (n.qNorm && n.kNorm) {
      put('q_norm', l, 0, n.qNorm);
      put('k_norm', l, 0, n.kNorm);
    }
    put('router', l, 0, n.router);
    for (let e = 0; e < spec.numExperts; e++) {
      const x = n.expert(e);
      put('gate', l, e, x.gate);
      put('up', l, e, x.up);
      put('down', l, e, x.down);
    }
    if (n.shared) {
      put('gate', l, -1, n.shared.gate);
      put('up', l, -1, n.shared.up);
      put('down', l, -1, n.shared.down);
      put('shared_gate_scalar', l, 0, n.shared.gateScalar);
    }
  }
}

/** Sequence id and position of every token of a batch, in batch order. */
export function stepTokens(batch: StepSequence[]): StepTokens {
  let n = 0;
  for (const s of batch) n += s.tokens.length;
  const seq = new Int32Array(n);
  const pos = new Int32Array(n);
  let t = 0;
  for (const s of batch) {
    for (let i = 0; i < s.tokens.length; i++, t++) {
      seq[t] = s.seqId;
      pos[t] = s.startPos + i;
    }
  }
  return { seq, pos };
}

/** Packs a batch into the addon's flat arrays: tokens, [start, n, wantLogits, nBlocks] per sequence, block tables. */
export function packBatch(batch: StepSequence[]): { tokens: Int32Array; seqs: Int32Array; blocks: Int32Array } {
  let nTok = 0;
  let nBlk = 0;
  for (const s of batch) {
    nTok += s.tokens.length;
    nBlk += s.blockTable.length;
  }
  const tokens = new Int32Array(nTok);
  const seqs = new Int32Array(batch.length * 4);
  const blocks = new Int32Array(nBlk);
  let t = 0;
  let b = 0;
  batch.forEach((s, i) => {
    tokens.set(s.tokens, t);
    blocks.set(s.blockTable, b);
    seqs.set([s.startPos, s.tokens.length, s.wantLogits ? 1 : 0, s.blockTable.length], i * 4);
    t += s.tokens.length;
    b += s.blockTable.length;
  });
  return { tokens, seqs, blocks };
}

export class NativeRunner implements ModelRunner {
  /** Routing replay only: per sequence, its recent routing (live hints for the batch policy). */
  private recent: RecentRouting | null = null;
  /** Routing replay only: distinct experts per layer of the last step, mean over layers. */
  private lastDistinct: number | undefined;

  private constructor(
    readonly spec: ModelSpec,
    readonly kv: KvGeometry,
    readonly engine: NativeEngine,
    private readonly replay?: RoutingReplay,
    private readonly onRouting?: (e: RoutingEvent) => void,
    private readonly logitsBuffer?: LogitsBuffer,
  ) {}

  /** Opens a checkpoint directory and packs its weights; the checkpoint's files are closed after. */
  static async open(dir: string, o: NativeRunnerOptions): Promise<NativeRunner> {
    const m = await openModel(dir);
    try {
      return NativeRunner.fromCheckpoint(m.spec, m.weights, o);
    } finally {
      m.close();
    }
  }

  static fromCheckpoint(spec: ModelSpec, ckpt: SafetensorsCheckpoint, o: NativeRunnerOptions): NativeRunner {
    const need = estimateEngineBytes(spec, o);
    const avail = availableBytes();
    if (need.weights + need.kv > avail) {
      const gib = (b: number) => (b / 2 ** 30).toFixed(2);
      throw new ModelTooLargeError(
        `the model needs ${gib(need.weights)} GiB of ${o.weights} weights and ${gib(need.kv)} GiB of KV cache, but only ${gib(avail)} GiB of memory is available; ` +
          'choose a smaller weight format (--weights q8 or q4) or fewer KV blocks',
      );
    }
    const { NativeEngine } = loadNative();
    const engine = new NativeEngine(engineOptions(spec, o));
    try {
      loadTensors(engine, spec, ckpt);
      engine.finalize();
    } catch (e) {
      engine.close();
      throw e;
    }
    return new NativeRunner(spec, { blockSize: o.kvBlockSize, numBlocks: o.kvBlocks }, engine, o.replay, o.onRouting, o.reuseLogits ? new LogitsBuffer() : undefined);
  }

  step(batch: StepSequence[]): StepOutput {
    const { tokens, seqs, blocks } = packBatch(batch);
    const out = this.logitsBuffer?.take(logitRows(batch) * this.spec.vocabSize);
    if (!this.replay) {
      const logits = this.engine.step(tokens, seqs, blocks, out);
      return { logits, rows: logits.length / this.spec.vocabSize };
    }
    // Routing replay: the step in pieces with the trace's experts.
    const meta = stepTokens(batch);
    const e = this.engine;
    const L = this.spec.numLayers;
    const routed: Routing[] = [];
    e.beginStep(tokens, seqs, blocks);
    for (let l = 0; l < L; l++) {
      const r = this.replay.route(l, e.attention(l), meta);
      this.onRouting?.({ layer: l, ids: r.ids, weights: r.weights, k: r.k, seq: meta.seq, pos: meta.pos });
      e.experts(l, r.ids, r.weights, r.k);
      routed.push(r);
    }
    const logits = e.endStep(out);
    this.noteRouting(meta, routed);
    return { logits, rows: logits.length / this.spec.vocabSize };
  }

  /** Each sequence's recent routing, and the step's distinct experts. */
  private noteRouting(meta: StepTokens, routed: Routing[]): void {
    let distinct = 0;
    const seen = new Uint8Array(this.spec.numExperts);
    for (const r of routed) {
      seen.fill(0);
      for (let i = 0; i < r.ids.length; i++) {
        if (!seen[r.ids[i]]) distinct++;
        seen[r.ids[i]] = 1;
      }
    }
    this.lastDistinct = routed.length > 0 ? distinct / routed.length : undefined;
    const recent = (this.recent ??= new RecentRouting(routed.length));
    for (let t = 0; t < meta.seq.length; t++) routed.forEach((r, l) => recent.observe(meta.seq[t], l, r.ids, t * r.k, r.k));
  }

  /** Routing replay only: the sequence's recent routing (RecentRouting). */
  routingHints(seqId: number): RoutingHint | undefined {
    return this.recent?.hint(seqId);
  }

  lastStepDistinctExperts(): number | undefined {
    return this.lastDistinct;
  }

  release(seqId: number): void {
    // KV blocks belong to the scheduler's pool; the engine keeps no per-sequence state
    // (routing replay: only its recent routing, for hints).
    this.recent?.delete(seqId);
  }

  close(): void {
    this.engine.close();
  }
}
