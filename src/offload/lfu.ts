// Least frequently used: evict the resident expert with the fewest uses, ties broken by
// least recent use. Counts are kept for every expert, resident or not ("perfect" LFU):
// an expert's popularity does not restart when it is evicted. With `halfLife` (in
// visits of the layer) the counts decay exponentially, which ranks experts by recent
// popularity instead of lifetime popularity.

import { SlotCache, type PolicyShape } from './cache-policy.js';

export interface LfuOptions {
  /** Visits after which a use counts half; Infinity (default) = plain counts. */
  halfLife?: number;
}

export class LfuPolicy extends SlotCache {
  readonly name: string;
  private readonly count: Float64Array; // (layer, expert): decayed uses as of `updated`
  private readonly updated: Float64Array; // (layer, expert): time `count` refers to
  private readonly lastUse: Float64Array;
  private readonly halfLife: number;

  constructor(shape: PolicyShape, opts: LfuOptions = {}) {
    super(shape);
    const hl = opts.halfLife ?? Infinity;
    if (!(hl > 0)) throw new Error(`LFU half-life must be > 0, got ${hl}`);
    this.name = Number.isFinite(hl) ? 'lfu-decay' : 'lfu';
    this.halfLife = hl;
    this.count = new Float64Array(shape.layers * shape.experts);
    this.updated = new Float64Array(shape.layers * shape.experts);
    this.lastUse = new Float64Array(shape.layers * shape.experts).fill(-1);
  }

  private decayed(i: number, now: number): number {
    return Number.isFinite(this.halfLife) ? this.count[i] * Math.pow(2, -(now - this.updated[i]) / this.halfLife) : this.count[i];
  }

  protected override beforeVisit(layer: number, experts: ArrayLike<number>, now: number): void {
    for (let k = 0; k < experts.length; k++) {
      const i = layer * this.experts + experts[k];
      this.count[i] = this.decayed(i, now) + 1;
      this.updated[i] = now;
    }
  }

  protected touch(layer: number, expert: number, now: number): void {
    this.lastUse[layer * this.experts + expert] = now;
  }

  protected keepScore(layer: number, expert: number, now: number): number {
    const i = layer * this.experts + expert;
    // Recency breaks ties only: (lastUse + 1) / (now + 2) is in [0, 1), below any
    // difference of whole counts; decayed counts rarely tie, so it is scaled down there.
    const tie = (this.lastUse[i] + 1) / (now + 2);
    return Number.isFinite(this.halfLife) ? this.decayed(i, now) + 1e-9 * tie : this.count[i] + tie;
  }
}
