// A test double of the native expert store: a resident NativeEngine (every expert in
// RAM, so the arithmetic is the real engine's) with the offloading calls of the addon
// contract simulated in TypeScript. It enforces what the real store enforces:
// experts(l) / expertsPart(l) only run experts that are queued, reading or resident in a
// slot of layer l (experts() only the ones no expertsPart ran); a slot holds one expert;
// a load replaces what the slot held. Reads complete in FIFO order,
// `readsPerLayer` of them at every attention() call (I/O progressing while the step
// computes), and experts() completes the ones it needs (counting a stall).
// predictRouter is approximated by repeating the current layer's router logits (the
// resident engine of this build may not have it), which is a deterministic, imperfect
// predictor: enough to exercise prefetching and its counters; or it is noise, or what a
// test gives.

import type { NativeEngine, NativeStoreStats } from '../../src/engine/native.js';
import type { OffloadEngine } from '../../src/offload/offload-runner.js';

export class FakeOffloadStore implements OffloadEngine {
  readonly L: number;
  readonly E: number;
  private readonly state: Uint8Array; // (layer, expert): 0 absent, 1 queued, 2 reading, 3 resident
  private readonly slotOf: Int32Array; // (layer, expert)
  private readonly slotE: Int32Array; // base[layer] + slot
  /** Slots of each layer, and the index of each layer's slot 0 in slotE. */
  readonly slotsByLayer: readonly number[];
  private readonly base: Int32Array;
  private readonly queue: { layer: number; expert: number }[] = [];
  private lastLogits: Float32Array = new Float32Array(0);
  private tokens = 0;
  private noise = 0;
  readonly calls = { loadExpert: 0, cancelLoad: 0, cancelled: 0, cancelledAhead: 0, evictSlot: 0, predictRouter: 0, experts: 0 };
  /** Layer of the last attention() call. */
  private layerNow = -1;
  private loads = 0;
  private stalls: number[];
  /** Experts of the current layer already run by expertsPart. */
  private ran = new Set<number>();
  /** Visits streamed through expertsPart. */
  parts = 0;
  /** The priority of every loadExpert call, in order. */
  readonly priorities: number[] = [];
  /** Makes the next read of this (layer, expert) fail: the slot is emptied and the call that needs it throws. */
  failNext: { layer: number; expert: number } | null = null;

  constructor(
    readonly inner: NativeEngine,
    shape: { layers: number; experts: number },
    /** Slots per layer: one number for every layer, or one per layer. */
    slots: number | readonly number[],
    readonly opts: {
      readsPerLayer?: number;
      slotBytes?: number;
      /** predictRouter returns noise (a useless predictor). */
      noisyPrediction?: boolean;
      /** predictRouter returns what this gives (e.g. logits of the true routing, from a resident run of the same step). */
      prediction?: (from: number, to: number) => Float32Array;
    } = {},
  ) {
    this.L = shape.layers;
    this.E = shape.experts;
    this.state = new Uint8Array(this.L * this.E);
    this.slotOf = new Int32Array(this.L * this.E).fill(-1);
    this.slotsByLayer = typeof slots === 'number' ? new Array<number>(this.L).fill(slots) : [...slots];
    if (this.slotsByLayer.length !== this.L) throw new Error(`fake store: ${this.slotsByLayer.length} slot counts for ${this.L} layers`);
    this.base = new Int32Array(this.L + 1);
    for (let l = 0; l < this.L; l++) this.base[l + 1] = this.base[l] + this.slotsByLayer[l];
    this.slotE = new Int32Array(this.base[this.L]).fill(-1);
    this.stalls = new Array(this.L).fill(0);
  }

  beginStep(tokens: Int32Array, seqs: Int32Array, blocks: Int32Array): void {
    this.tokens = tokens.length;
    this.inner.beginStep(tokens, seqs, blocks);
  }

  attention(layer: number): Float32Array {
    for (let i = 0; i < (this.opts.readsPerLayer ?? 1); i++) this.completeOne();
    this.layerNow = layer;
    this.lastLogits = this.inner.attention(layer);
    this.ran.clear();
    return this.lastLogits;
  }

  experts(layer: number, ids: Int32Array, weights: Float32Array, k: number): void {
    this.calls.experts++;
    this.acquire(layer, ids.filter((e) => !this.ran.has(e)), 'experts');
    this.inner.experts(layer, ids, weights, k);
  }

  expertsPart(layer: number, ids: Int32Array, weights: Float32Array, k: number, subset: Int32Array): number {
    this.parts++;
    for (const e of subset) if (this.ran.has(e)) throw new Error(`fake store: expert ${e} of layer ${layer} already ran`);
    this.acquire(layer, subset, 'expertsPart');
    for (const e of subset) this.ran.add(e);
    return this.inner.expertsPart(layer, ids, weights, k, subset);
  }

  /** Waits for the experts a call runs; each must be queued, reading or resident. */
  private acquire(layer: number, experts: Int32Array, call: string): void {
    for (const e of experts) {
      if (this.failNext && this.failNext.layer === layer && this.failNext.expert === e) {
        this.failNext = null;
        if (this.state[layer * this.E + e] !== 0) this.drop(layer, e);
        throw new Error(`fake store: read of expert ${e} of layer ${layer} failed`);
      }
      const st = this.state[layer * this.E + e];
      if (st === 0) throw new Error(`fake store: ${call}(${layer}) got expert ${e}, which is neither resident nor loading`);
      if (st !== 3) {
        // Wait: complete reads in FIFO order until this one is done.
        while (this.state[layer * this.E + e] !== 3) this.completeOne();
        this.stalls[layer] += 1e-6;
      }
    }
  }

  endStep(out?: Float32Array): Float32Array {
    return this.inner.endStep(out);
  }

  route(logits: Float32Array, tokens: number): { ids: Int32Array; weights: Float32Array } {
    return this.inner.route(logits, tokens);
  }

  predictRouter(from: number, to: number): Float32Array {
    this.calls.predictRouter++;
    if (!(to > from)) throw new Error(`predictRouter(${from}, ${to}): to must be above from`);
    if (this.lastLogits.length !== this.tokens * this.E) throw new Error('predictRouter before attention');
    if (this.opts.prediction) return this.opts.prediction(from, to);
    const out = new Float32Array((to - from) * this.lastLogits.length);
    for (let d = 0; d < to - from; d++) out.set(this.lastLogits, d * this.lastLogits.length);
    if (this.opts.noisyPrediction) for (let i = 0; i < out.length; i++) out[i] = (((i + 1) * 2654435761 + this.noise++ * 40503) >>> 0) / 2 ** 32;
    return out;
  }

  loadExpert(layer: number, expert: number, slot: number, priority = 0): void {
    this.priorities.push(priority);
    this.calls.loadExpert++;
    if (slot < 0 || slot >= this.slotsByLayer[layer]) throw new Error(`fake store: slot ${slot} out of range (layer ${layer} has ${this.slotsByLayer[layer]})`);
    const i = layer * this.E + expert;
    if (this.state[i] !== 0) throw new Error(`fake store: expert ${expert} of layer ${layer} is already in slot ${this.slotOf[i]} (state ${this.state[i]})`);
    this.evictSlot(layer, slot, false);
    this.state[i] = 1;
    this.slotOf[i] = slot;
    this.slotE[this.base[layer] + slot] = expert;
    this.queue.push({ layer, expert });
  }

  cancelLoad(layer: number, expert: number): boolean {
    this.calls.cancelLoad++;
    const i = layer * this.E + expert;
    if (this.state[i] !== 1) return false;
    this.calls.cancelled++;
    // Withdrawn before its layer's visit (from a closer prediction), not at the visit.
    if (layer > this.layerNow) this.calls.cancelledAhead++;
    this.drop(layer, expert);
    return true;
  }

  evictSlot(layer: number, slot: number, count = true): void {
    if (count) this.calls.evictSlot++;
    if (slot < 0 || slot >= this.slotsByLayer[layer]) throw new Error(`fake store: slot ${slot} out of range (layer ${layer} has ${this.slotsByLayer[layer]})`);
    const e = this.slotE[this.base[layer] + slot];
    if (e >= 0) this.drop(layer, e);
  }

  expertState(layer: number, expert: number): number {
    return this.state[layer * this.E + expert];
  }

  storeStats(): NativeStoreStats {
    const slotBytes = this.opts.slotBytes ?? 4096;
    return { loads: this.loads, bytesRead: this.loads * slotBytes, stallSeconds: Float64Array.from(this.stalls), cancelled: this.calls.cancelled, direct: false, slotBytes };
  }

  close(): void {
    this.inner.close();
  }

  /** Experts held per layer (any state). */
  held(layer: number): number {
    let n = 0;
    for (let s = 0; s < this.slotsByLayer[layer]; s++) if (this.slotE[this.base[layer] + s] >= 0) n++;
    return n;
  }

  private drop(layer: number, expert: number): void {
    const i = layer * this.E + expert;
    const q = this.queue.findIndex((x) => x.layer === layer && x.expert === expert);
    if (q >= 0) this.queue.splice(q, 1);
    this.slotE[this.base[layer] + this.slotOf[i]] = -1;
    this.slotOf[i] = -1;
    this.state[i] = 0;
  }

  private completeOne(): void {
    const q = this.queue.shift();
    if (!q) return;
    this.state[q.layer * this.E + q.expert] = 3;
    this.loads++;
  }
}
