// The native engine with its routed experts offloaded: the experts live in a file (the
// slow tier, read with direct I/O by the addon's I/O threads) and each layer has a fixed
// number of expert slots in RAM (the fast tier). The cache policy (TypeScript, pure)
// decides what is resident; the addon performs the loads it asks for.
//
// One step (the step in pieces):
//   beginStep → for each layer l:
//     attention(l) → router logits → top-k (the model's gating rule, or routing replay)
//     → cancel the stale prefetches of l (queued reads of experts this visit does not need)
//     → policy.request(l, distinct experts) → evictSlot / loadExpert for its decision
//     → prefetch: predictRouter(l, l+d) (pre-gating) combined with each sequence's
//       previous experts at those layers → PrefetchHints with probabilities →
//       policy.prefetch(l+i, hints, room) → loadExpert
//     → experts(l, ids, weights, k) (the addon waits there for experts still loading)
//   → endStep → logits.
// A miss stalls only until its expert has arrived; the arithmetic is the resident
// engine's, so logits are bitwise those of the all-resident NativeRunner.
//
// Capacity. The budget is split equally across layers (capacity.ts): every layer has
// `slotsPerLayer` slots. A layer's experts are computed in one call, so a visit needs all
// of its distinct experts resident at once: when a step's batch needs more experts at
// some layer than the layer has slots (a long prompt chunk, many sequences), the step is
// split: the tokens are packed, in order, into smaller steps whose routing fits every
// layer seen so far, and those run one after the other (a sequence's chunk becomes
// consecutive sub-chunks; KV entries written by the abandoned attempt are rewritten with
// the same values). With f32/bf16/f16 weights the engine's results do not depend on the
// batch's composition, so split steps are still bitwise equal to the resident run; with
// q8/q4 the 8-bit activation kernels group tokens differently and results agree within
// the engine's batch variance, not bit for bit.
//
// Prefetch probabilities. For a target layer m = l + d and each token, the expert ids in
// the token's pre-gating top-k at m are used with probability precision(d) (measured
// online: hits / predicted at that distance), and each sequence's experts at m for its
// previous token are reused with probability reuse(m) (measured online). A batch needs
// e with P = 1 - Π (1 - p_token(e)); hints at or above `prefetchMinProbability` are
// offered best first. Prefetch reads are kept few (`maxQueuedPrefetches` queued at
// once) so that demand reads never wait behind a long prefetch queue.

import { randomBytes } from 'node:crypto';
import { accessSync, constants, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { SafetensorsCheckpoint } from '../model/safetensors.js';
import { paramCounts, type ModelSpec } from '../model/spec.js';
import { loadNative, type NativeEngine } from '../engine/native.js';
import {
  availableBytes,
  BYTES_PER_WEIGHT,
  engineOptions,
  loadTensors,
  ModelTooLargeError,
  packBatch,
  stepTokens,
  WEIGHT_FORMATS,
  type NativeRunnerOptions,
} from '../engine/native-runner.js';
import type { ExpertCacheState, OffloadLayerStats, OffloadStats } from '../engine/protocol.js';
import type { KvGeometry, ModelRunner, RoutingEvent, StepOutput, StepSequence } from '../engine/runner.js';
import type { ExpertCachePolicy, PrefetchHint } from './cache-policy.js';
import { expertSlotBytes, slotsPerLayer } from './capacity.js';
import { createOnlinePolicy, DEFAULT_ONLINE_POLICY } from './policies.js';
import { PredictionCounters, topKIds } from './prediction.js';
import type { RoutingReplay, StepTokens } from './replay.js';

/** The engine calls the runner makes (a NativeEngine built with `offload`, or a test double). */
export type OffloadEngine = Pick<
  NativeEngine,
  | 'beginStep'
  | 'attention'
  | 'experts'
  | 'endStep'
  | 'route'
  | 'predictRouter'
  | 'loadExpert'
  | 'cancelLoad'
  | 'evictSlot'
  | 'expertState'
  | 'storeStats'
  | 'close'
>;

export const DEFAULT_LOOKAHEAD = 2;
export const DEFAULT_IO_THREADS = 2;

export interface OffloadSettings {
  /** Expert cache policy by name (default: the project's default, predictive). */
  policy?: string;
  /** Layers ahead to prefetch; 0 turns prefetching off (default 2). */
  lookahead?: number;
  /** Smallest estimated probability of use for a prefetch (default 0.3). */
  prefetchMinProbability?: number;
  /** Prefetch reads queued (not started) at most, over all layers (default 2 × I/O threads, at least 2). */
  maxQueuedPrefetches?: number;
  /** Routing replay (the trace's experts instead of the router's). */
  replay?: RoutingReplay;
  /** Called with every layer's routing of the steps that completed. */
  onRouting?: (e: RoutingEvent) => void;
}

export interface OffloadRunnerOptions extends NativeRunnerOptions, OffloadSettings {
  /** Fast-tier budget: fraction of all experts ("0.25", "25%") or bytes ("12GiB"). */
  capacity: string;
  /** I/O threads of the expert store (default 2). */
  ioThreads?: number;
  /** Directory of the expert file (default: the OS temporary directory). */
  dir?: string;
  /** Direct I/O (default true; the addon falls back when the file system refuses it). */
  direct?: boolean;
}

const STATE_QUEUED = 1;
const STATE_READING = 2;
const STATE_RESIDENT = 3;

/** A run of one sequence's new tokens inside a (possibly split) step. */
interface Piece {
  /** Index of the sequence in the step's batch. */
  entry: number;
  /** Offsets into that sequence's new tokens. */
  from: number;
  to: number;
}

type PartResult = { logits: Float32Array } | { overflowLayer: number; routings: Int32Array[] };

function emptyLayerStats(): OffloadLayerStats {
  return { visits: 0, stalledVisits: 0, hits: 0, misses: 0, prefetchIssued: 0, prefetchUsed: 0, prefetchWasted: 0, prefetchCancelled: 0, stallSeconds: 0 };
}

export class OffloadRunner implements ModelRunner {
  readonly slotsPerLayer: number;
  readonly policy: ExpertCachePolicy;
  readonly lookahead: number;
  /** Experts per token in the routing (the model's top-k, or the replayed trace's k). */
  readonly k: number;
  private readonly L: number;
  private readonly E: number;
  private readonly replay?: RoutingReplay;
  private readonly onRouting?: (e: RoutingEvent) => void;
  private readonly minProb: number;
  private readonly maxQueued: number;
  private readonly layerStats: OffloadLayerStats[];
  private readonly prediction: PredictionCounters;
  /** (layer, expert): prefetched and not used yet (mirrors the policy's own flag). */
  private readonly unusedPrefetch: Uint8Array;
  /** Per layer: prefetches issued for its next visit. */
  private readonly outstanding: Set<number>[];
  /** Per layer: experts reused by a sequence's next token, of the previous token's experts. */
  private readonly reuseHits: Float64Array;
  private readonly reusePrev: Float64Array;
  /** Per live sequence, per layer: the experts of its last token. */
  private readonly lastRouting = new Map<number, (Int32Array | null)[]>();
  private readonly pinned: Set<number>[];
  private splitSteps = 0;
  private closed = false;

  constructor(
    readonly spec: ModelSpec,
    readonly kv: KvGeometry,
    readonly engine: OffloadEngine,
    slots: number,
    o: OffloadSettings = {},
  ) {
    this.L = spec.numLayers;
    this.E = spec.numExperts;
    this.replay = o.replay;
    this.onRouting = o.onRouting;
    this.k = o.replay ? o.replay.k : spec.topK;
    if (!Number.isInteger(slots) || slots < this.k || slots > this.E) {
      throw new Error(`expert slots per layer must be an integer in [${this.k}, ${this.E}] (top-k .. experts), got ${slots}`);
    }
    const lookahead = o.lookahead ?? DEFAULT_LOOKAHEAD;
    if (!Number.isInteger(lookahead) || lookahead < 0) throw new Error(`offload lookahead must be an integer >= 0, got ${lookahead}`);
    this.slotsPerLayer = slots;
    this.lookahead = Math.min(lookahead, this.L - 1);
    this.minProb = o.prefetchMinProbability ?? 0.3;
    this.maxQueued = Math.max(1, o.maxQueuedPrefetches ?? 2 * DEFAULT_IO_THREADS);
    this.policy = createOnlinePolicy(o.policy ?? DEFAULT_ONLINE_POLICY, { layers: this.L, experts: this.E, topK: this.k, capacity: slots }, { prefetch: this.lookahead > 0 });
    this.layerStats = Array.from({ length: this.L }, emptyLayerStats);
    this.prediction = new PredictionCounters(Math.max(1, this.lookahead));
    this.unusedPrefetch = new Uint8Array(this.L * this.E);
    this.outstanding = Array.from({ length: this.L }, () => new Set<number>());
    this.reuseHits = new Float64Array(this.L);
    this.reusePrev = new Float64Array(this.L);
    this.pinned = Array.from({ length: this.L }, () => new Set<number>());
  }

  /** Packs the checkpoint's weights into an engine whose routed experts are offloaded to a file. */
  static fromCheckpoint(spec: ModelSpec, ckpt: SafetensorsCheckpoint, o: OffloadRunnerOptions): OffloadRunner {
    const format = WEIGHT_FORMATS[o.weights];
    const { slotBytes } = expertSlotBytes(format, spec.hiddenSize, spec.expertIntermediateSize);
    const k = Math.max(spec.topK, o.replay ? o.replay.k : 0);
    const slots = slotsPerLayer(o.capacity, { layers: spec.numLayers, experts: spec.numExperts, topK: k, slotBytes });
    const ioThreads = o.ioThreads ?? DEFAULT_IO_THREADS;
    if (!Number.isInteger(ioThreads) || ioThreads < 1 || ioThreads > 256) throw new Error(`offload I/O threads must be an integer in [1, 256], got ${ioThreads}`);
    const dir = o.dir && o.dir !== '' ? o.dir : tmpdir();
    try {
      if (!statSync(dir).isDirectory()) throw new Error('not a directory');
      accessSync(dir, constants.W_OK);
    } catch (e) {
      throw new Error(`offload directory ${JSON.stringify(dir)} is not a writable directory (${(e as Error).message}); set offloadDir`);
    }
    // Resident bytes: everything but the routed experts, the slots, and the KV cache.
    const c = paramCounts(spec);
    const h = spec.hiddenSize;
    const f32Params = spec.numLayers * (2 * h + spec.numExperts * h + (spec.sharedExpertIntermediateSize > 0 ? h : 0)) + h;
    const resident = (c.nonExpertParams - f32Params) * BYTES_PER_WEIGHT[o.weights] + f32Params * 4 + slots * spec.numLayers * slotBytes;
    const kvBytes = 2 * spec.numLayers * o.kvBlocks * o.kvBlockSize * spec.numKvHeads * spec.headDim * 4;
    const avail = availableBytes();
    if (resident + kvBytes > avail) {
      const gib = (b: number) => (b / 2 ** 30).toFixed(2);
      throw new ModelTooLargeError(
        `with ${slots} expert slots per layer the engine needs ${gib(resident)} GiB of resident ${o.weights} weights and slots and ${gib(kvBytes)} GiB of KV cache, ` +
          `but only ${gib(avail)} GiB of memory is available; lower offloadCapacity, choose a smaller weight format or fewer KV blocks`,
      );
    }
    const file = join(dir, `moe-serve-experts-${process.pid}-${randomBytes(6).toString('hex')}.bin`);
    const { NativeEngine } = loadNative();
    const engine = new NativeEngine({ ...engineOptions(spec, o), offload: { file, slotsPerLayer: slots, ioThreads, direct: o.direct ?? true } });
    try {
      if (engine.info().offload !== true) {
        throw new Error('this build of the native addon does not support expert offloading; rebuild it (npm run build:native)');
      }
      loadTensors(engine, spec, ckpt);
      engine.finalize();
    } catch (e) {
      engine.close();
      throw e;
    }
    return new OffloadRunner(spec, { blockSize: o.kvBlockSize, numBlocks: o.kvBlocks }, engine, slots, {
      ...o,
      maxQueuedPrefetches: o.maxQueuedPrefetches ?? 2 * ioThreads,
    });
  }

  step(batch: StepSequence[]): StepOutput {
    if (this.closed) throw new Error('the offload runner is closed');
    const V = this.spec.vocabSize;
    const rowsWanted = batch.filter((s) => s.wantLogits).length;
    const logits = new Float32Array(rowsWanted * V);
    const rowOf = new Int32Array(batch.length).fill(-1);
    let r = 0;
    batch.forEach((s, i) => {
      if (s.wantLogits) rowOf[i] = r++;
    });
    const queue: Piece[][] = [batch.map((s, i) => ({ entry: i, from: 0, to: s.tokens.length }))];
    let split = false;
    while (queue.length > 0) {
      const part = queue.shift()!;
      const sub = part.map((p) => {
        const s = batch[p.entry];
        return {
          seqId: s.seqId,
          tokens: s.tokens.subarray(p.from, p.to),
          startPos: s.startPos + p.from,
          blockTable: s.blockTable,
          wantLogits: s.wantLogits && p.to === s.tokens.length,
        };
      });
      const res = this.runPart(sub);
      if ('logits' in res) {
        let row = 0;
        sub.forEach((s, i) => {
          if (!s.wantLogits) return;
          logits.set(res.logits.subarray(row * V, (row + 1) * V), rowOf[part[i].entry] * V);
          row++;
        });
      } else {
        split = true;
        queue.unshift(...this.splitPart(part, res.routings));
      }
    }
    if (split) this.splitSteps++;
    return { logits, rows: rowsWanted };
  }

  /**
   * Packs a part's tokens, in order, into parts whose distinct experts fit the slots at
   * every layer of `routings` (the routing of each layer reached before the overflow).
   */
  private splitPart(part: Piece[], routings: Int32Array[]): Piece[][] {
    const K = this.k;
    const C = this.slotsPerLayer;
    const layers = routings.length;
    const sets = Array.from({ length: layers }, () => new Set<number>());
    const out: Piece[][] = [];
    let cur: Piece[] = [];
    const close = () => {
      if (cur.length > 0) out.push(cur);
      cur = [];
      for (const s of sets) s.clear();
    };
    let t = 0; // token index in the part
    for (const p of part) {
      let start = p.from;
      for (let i = p.from; i < p.to; i++, t++) {
        let fits = true;
        for (let l = 0; l < layers && fits; l++) {
          let extra = 0;
          for (let j = 0; j < K; j++) if (!sets[l].has(routings[l][t * K + j])) extra++;
          if (sets[l].size + extra > C) fits = false;
        }
        if (!fits) {
          if (i > start) cur.push({ entry: p.entry, from: start, to: i });
          close();
          start = i;
        }
        for (let l = 0; l < layers; l++) for (let j = 0; j < K; j++) sets[l].add(routings[l][t * K + j]);
      }
      if (p.to > start) cur.push({ entry: p.entry, from: start, to: p.to });
    }
    close();
    return out;
  }

  /** Runs one step of the engine over `batch`; reports the first layer whose experts do not fit the slots. */
  private runPart(batch: StepSequence[]): PartResult {
    const e = this.engine;
    const L = this.L;
    const E = this.E;
    const K = this.k;
    const { tokens, seqs, blocks } = packBatch(batch);
    const meta = stepTokens(batch);
    const T = tokens.length;
    const routings: Int32Array[] = [];
    const weightsOf: Float32Array[] = [];
    const predicted: { distance: number; ids: Int32Array }[][] = Array.from({ length: L }, () => []);
    const firstOfSeq = new Map<number, number>();
    const lastOfSeq = new Map<number, number>();
    for (let t = 0; t < T; t++) {
      if (!firstOfSeq.has(meta.seq[t])) firstOfSeq.set(meta.seq[t], t);
      lastOfSeq.set(meta.seq[t], t);
    }
    e.beginStep(tokens, seqs, blocks);
    for (let l = 0; l < L; l++) {
      const routerLogits = e.attention(l);
      let ids: Int32Array;
      let w: Float32Array;
      if (this.replay) {
        const r = this.replay.route(l, routerLogits, meta);
        ids = r.ids;
        w = r.weights;
      } else {
        const r = e.route(routerLogits, T);
        ids = r.ids;
        w = r.weights;
      }
      routings.push(ids);
      weightsOf.push(w);
      const distinct = distinctIds(ids, E);
      if (distinct.length > this.slotsPerLayer) return { overflowLayer: l, routings };
      this.serveLayer(l, distinct, meta, ids);
      if (this.lookahead > 0 && l + 1 < L) this.prefetchAfter(l, T, predicted, firstOfSeq);
      const st = this.layerStats[l];
      st.visits++;
      for (const x of distinct) {
        if (e.expertState(l, x) !== STATE_RESIDENT) {
          st.stalledVisits++;
          break;
        }
      }
      e.experts(l, ids, w, K);
    }
    const logits = e.endStep();
    this.commit(meta, T, routings, weightsOf, predicted, firstOfSeq, lastOfSeq);
    return { logits };
  }

  /** Makes a visit's experts resident or loading, as the policy decides. */
  private serveLayer(l: number, distinct: number[], meta: StepTokens, ids: Int32Array): void {
    const e = this.engine;
    const E = this.E;
    const st = this.layerStats[l];
    const out = this.outstanding[l];
    if (out.size > 0) {
      const need = new Set(distinct);
      for (const x of out) {
        if (need.has(x) || !this.unusedPrefetch[l * E + x]) continue;
        // Stale: not needed by the visit it was fetched for. Withdraw it if its read has not started.
        if (e.expertState(l, x) === STATE_QUEUED && e.cancelLoad(l, x)) {
          this.policy.cancelPrefetch(l, x);
          this.unusedPrefetch[l * E + x] = 0;
          st.prefetchCancelled++;
        }
      }
      out.clear();
    }
    const observer = this.policy as unknown as { observeRouting?: (layer: number, tokens: { seq: number; experts: ArrayLike<number> }[]) => void };
    if (typeof observer.observeRouting === 'function') {
      const K = this.k;
      const tokens: { seq: number; experts: Int32Array }[] = [];
      for (let t = 0; t < meta.seq.length; t++) tokens.push({ seq: meta.seq[t], experts: ids.subarray(t * K, (t + 1) * K) });
      observer.observeRouting(l, tokens);
    }
    const d = this.policy.request(l, distinct);
    for (const ev of d.evictions) {
      this.noteEvicted(l, ev.expert);
      e.evictSlot(l, ev.slot);
    }
    for (const ld of d.loads) e.loadExpert(l, ld.expert, ld.slot);
    for (const x of d.prefetchHits) {
      if (this.unusedPrefetch[l * E + x]) {
        this.unusedPrefetch[l * E + x] = 0;
        st.prefetchUsed++;
      }
    }
    st.hits += d.hits.length;
    st.misses += d.loads.length;
  }

  private noteEvicted(l: number, expert: number): void {
    const i = l * this.E + expert;
    if (this.unusedPrefetch[i]) {
      this.unusedPrefetch[i] = 0;
      this.layerStats[l].prefetchWasted++;
    }
    this.pinned[l].delete(expert);
  }

  /** Pre-gating after layer l's attention: predictions for l+1 .. l+lookahead, and prefetches from them. */
  private prefetchAfter(l: number, T: number, predicted: { distance: number; ids: Int32Array }[][], firstOfSeq: Map<number, number>): void {
    const e = this.engine;
    const E = this.E;
    const K = this.k;
    const to = Math.min(this.L - 1, l + this.lookahead);
    const pred = e.predictRouter(l, to);
    if (pred.length !== (to - l) * T * E) throw new Error(`predictRouter(${l}, ${to}) returned ${pred.length} logits, expected ${(to - l) * T * E}`);
    let room = this.maxQueued - this.queuedPrefetches();
    for (let d = 1; d <= to - l; d++) {
      const m = l + d;
      const ids = topKIds(pred.subarray((d - 1) * T * E, d * T * E), T, E, K);
      predicted[m].push({ distance: d, ids });
      if (room <= 0) continue;
      const hints = this.hints(m, d, ids, T, firstOfSeq);
      if (hints.length === 0) continue;
      const issued = this.policy.prefetch(m, hints, room);
      for (const p of issued) {
        if (p.evicted >= 0) {
          this.noteEvicted(m, p.evicted);
          e.evictSlot(m, p.slot);
        }
        e.loadExpert(m, p.expert, p.slot);
        this.unusedPrefetch[m * E + p.expert] = 1;
        this.outstanding[m].add(p.expert);
        this.layerStats[m].prefetchIssued++;
        room--;
      }
    }
  }

  /** Prefetch reads issued and not started yet. */
  private queuedPrefetches(): number {
    let n = 0;
    for (let m = 0; m < this.L; m++) for (const x of this.outstanding[m]) if (this.unusedPrefetch[m * this.E + x] && this.engine.expertState(m, x) === STATE_QUEUED) n++;
    return n;
  }

  /** P(the visit of layer m needs e) for the step's tokens, from pre-gating at distance d and recent routing. */
  private hints(m: number, d: number, predIds: Int32Array, T: number, firstOfSeq: Map<number, number>): PrefetchHint[] {
    const E = this.E;
    const K = this.k;
    const a = this.prediction.precision(d);
    const rho = (this.reuseHits[m] + 1) / (this.reusePrev[m] + 2);
    const pNot = new Float64Array(E).fill(1);
    for (let t = 0; t < T; t++) for (let i = 0; i < K; i++) pNot[predIds[t * K + i]] *= 1 - a;
    for (const seq of firstOfSeq.keys()) {
      const prev = this.lastRouting.get(seq)?.[m];
      if (prev) for (const x of prev) pNot[x] *= 1 - rho;
    }
    const hints: PrefetchHint[] = [];
    for (let x = 0; x < E; x++) {
      const p = 1 - pNot[x];
      if (p >= this.minProb) hints.push({ expert: x, priority: p });
    }
    return hints.sort((u, v) => v.priority - u.priority || u.expert - v.expert);
  }

  /** After a completed step: prediction and reuse counters, each sequence's last routing, routing events. */
  private commit(
    meta: StepTokens,
    T: number,
    routings: Int32Array[],
    weights: Float32Array[],
    predicted: { distance: number; ids: Int32Array }[][],
    firstOfSeq: Map<number, number>,
    lastOfSeq: Map<number, number>,
  ): void {
    const K = this.k;
    for (let m = 0; m < this.L; m++) {
      const used = routings[m];
      for (const p of predicted[m]) this.prediction.add(p.distance, p.ids, K, used, K, T);
      for (const [seq, t] of firstOfSeq) {
        const prev = this.lastRouting.get(seq)?.[m];
        if (!prev) continue;
        const cur = used.subarray(t * K, (t + 1) * K);
        let hit = 0;
        for (const x of prev) if (cur.includes(x)) hit++;
        this.reuseHits[m] += hit;
        this.reusePrev[m] += prev.length;
      }
    }
    for (const [seq, t] of lastOfSeq) {
      let hist = this.lastRouting.get(seq);
      if (!hist) this.lastRouting.set(seq, (hist = new Array(this.L).fill(null)));
      for (let m = 0; m < this.L; m++) hist[m] = routings[m].slice(t * K, (t + 1) * K);
    }
    if (this.onRouting) for (let m = 0; m < this.L; m++) this.onRouting({ layer: m, ids: routings[m], weights: weights[m], k: K, seq: meta.seq, pos: meta.pos });
  }

  /** Keeps a resident expert from eviction (false when not resident or too many are pinned). */
  pin(layer: number, expert: number): boolean {
    const ok = this.policy.pin(layer, expert);
    if (ok) this.pinned[layer].add(expert);
    return ok;
  }

  unpin(layer: number, expert: number): void {
    this.policy.unpin(layer, expert);
    this.pinned[layer].delete(expert);
  }

  release(seqId: number): void {
    this.lastRouting.delete(seqId);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.engine.close();
  }

  offloadStats(): OffloadStats {
    const s = this.engine.storeStats();
    return {
      policy: this.policy.name,
      slotsPerLayer: this.slotsPerLayer,
      slotBytes: s.slotBytes,
      lookahead: this.lookahead,
      direct: s.direct,
      loads: s.loads,
      bytesLoaded: s.bytesRead,
      splitSteps: this.splitSteps,
      layers: this.layerStats.map((x, l) => ({ ...x, stallSeconds: s.stallSeconds[l] ?? 0 })),
      prediction: this.lookahead > 0 ? this.prediction.snapshot() : [],
    };
  }

  expertCacheState(): ExpertCacheState {
    const stats = this.offloadStats();
    const E = this.E;
    const layers: ExpertCacheState['layers'] = [];
    for (let l = 0; l < this.L; l++) {
      const resident: { expert: number; slot: number }[] = [];
      const loading: { expert: number; slot: number; state: 'queued' | 'reading' }[] = [];
      const prefetched: number[] = [];
      for (let x = 0; x < E; x++) {
        const slot = this.policy.slotOf(l, x);
        if (slot < 0) continue;
        const st = this.engine.expertState(l, x);
        if (st === STATE_RESIDENT) resident.push({ expert: x, slot });
        else if (st === STATE_QUEUED || st === STATE_READING) loading.push({ expert: x, slot, state: st === STATE_QUEUED ? 'queued' : 'reading' });
        if (this.unusedPrefetch[l * E + x]) prefetched.push(x);
      }
      resident.sort((u, v) => u.slot - v.slot);
      loading.sort((u, v) => u.slot - v.slot);
      layers.push({
        layer: l,
        capacity: this.slotsPerLayer,
        resident,
        loading,
        pinned: [...this.pinned[l]].sort((u, v) => u - v),
        prefetched,
        freeSlots: this.slotsPerLayer - resident.length - loading.length,
        counters: stats.layers[l],
      });
    }
    return { policy: stats.policy, slotsPerLayer: this.slotsPerLayer, slotBytes: stats.slotBytes, lookahead: this.lookahead, layers, stats };
  }

  /**
   * Consistency of the policy's slots with the store: every expert the policy holds is
   * queued, reading or resident in the store, and nothing else is. Returns the mismatches.
   */
  audit(): string[] {
    const bad: string[] = [];
    for (let l = 0; l < this.L; l++) {
      for (let x = 0; x < this.E; x++) {
        const held = this.policy.slotOf(l, x) >= 0;
        const st = this.engine.expertState(l, x);
        if (held !== (st !== 0)) bad.push(`layer ${l} expert ${x}: policy ${held ? 'holds it' : 'does not hold it'}, store state ${st}`);
      }
    }
    return bad;
  }
}

/** Distinct ids in first-seen order. */
function distinctIds(ids: Int32Array, experts: number): number[] {
  const seen = new Uint8Array(experts);
  const out: number[] = [];
  for (let i = 0; i < ids.length; i++) {
    const x = ids[i];
    if (!seen[x]) {
      seen[x] = 1;
      out.push(x);
    }
  }
  return out;
}
