// Least recently used: evict the resident expert whose last use is oldest.

import { SlotCache, type PolicyShape } from './cache-policy.js';

export class LruPolicy extends SlotCache {
  readonly name = 'lru';
  private readonly lastUse: Float64Array; // (layer, expert): visit time of the last use

  constructor(shape: PolicyShape) {
    super(shape);
    this.lastUse = new Float64Array(shape.layers * shape.experts).fill(-1);
  }

  protected touch(layer: number, expert: number, now: number): void {
    this.lastUse[layer * this.experts + expert] = now;
  }

  protected keepScore(layer: number, expert: number): number {
    return this.lastUse[layer * this.experts + expert];
  }
}
