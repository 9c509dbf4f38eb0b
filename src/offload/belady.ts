// Belady's optimum for demand loading (MIN): on a miss with a full layer, evict the
// resident expert whose next use is furthest in the future (never used again = furthest).
// It needs the whole future access sequence, so it only runs offline on a trace; it is
// the limit every online policy is measured against at the same slots per layer. Layers
// never share slots, so the rule applied at each layer with that layer's own capacity
// (equal or split unequally across layers) is the optimum of each layer, hence of the
// sum. With set requests (a visit needs all its experts at once, |set| <= the layer's
// capacity) the furthest-next-use rule stays optimal; test/offload-policies checks it
// against brute force.

import { SlotCache, type PolicyShape, type PrefetchHint, type PrefetchIssue } from './cache-policy.js';

/** The future: `set(layer, t)` = experts needed by the t-th visit of `layer` (its t-th request()). */
export interface FutureAccesses {
  visits: number;
  set(layer: number, t: number): ArrayLike<number>;
}

export class BeladyPolicy extends SlotCache {
  readonly name = 'belady';
  private readonly uses: Int32Array[]; // (layer, expert) -> ascending visit times
  private readonly ptr: Int32Array; // (layer, expert): index of the first use >= now

  constructor(shape: PolicyShape, future: FutureAccesses) {
    super(shape);
    const { layers, experts } = shape;
    const counts = new Int32Array(layers * experts);
    for (let l = 0; l < layers; l++) {
      for (let t = 0; t < future.visits; t++) {
        const set = future.set(l, t);
        for (let i = 0; i < set.length; i++) counts[l * experts + set[i]]++;
      }
    }
    this.uses = Array.from(counts, (n) => new Int32Array(n));
    const fill = new Int32Array(layers * experts);
    for (let l = 0; l < layers; l++) {
      for (let t = 0; t < future.visits; t++) {
        const set = future.set(l, t);
        for (let i = 0; i < set.length; i++) {
          const j = l * experts + set[i];
          this.uses[j][fill[j]++] = t;
        }
      }
    }
    this.ptr = new Int32Array(layers * experts);
  }

  /** Next visit time of (layer, expert) strictly after `now`, Infinity when none. */
  nextUse(layer: number, expert: number, now: number): number {
    const j = layer * this.experts + expert;
    const u = this.uses[j];
    let p = this.ptr[j];
    while (p < u.length && u[p] <= now) p++;
    this.ptr[j] = p;
    return p < u.length ? u[p] : Infinity;
  }

  protected touch(): void {}

  private inPrefetch = false;

  /**
   * Prefetches are for the layer's coming visit, time `visits[layer]` (request() has not
   * counted it yet): the ranking then counts that visit as a use, so an expert it needs,
   * prefetched or resident, is the last a prefetch would displace.
   */
  override prefetch(layer: number, hints: readonly PrefetchHint[], max: number): PrefetchIssue[] {
    this.inPrefetch = true;
    try {
      return super.prefetch(layer, hints, max);
    } finally {
      this.inPrefetch = false;
    }
  }

  protected keepScore(layer: number, expert: number, now: number): number {
    return -this.nextUse(layer, expert, this.inPrefetch ? now - 1 : now);
  }
}
