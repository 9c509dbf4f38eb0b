// The expert cache policy: a pure object the engine drives, one call per (step, layer).
// It decides which needed experts are hits, which must be loaded into which slot, and
// what is evicted; it takes prefetch hints and pins. It never touches memory or files:
// the native side performs the loads and evictions it returns (expert slots, direct
// I/O), and the trace simulator replays it on recorded routing.
//
// The cache is split per layer: layer l has capacityOf(l) slots numbered
// 0..capacityOf(l)-1 (the same number for every layer with the equal split, or one per
// layer: capacity.ts), and an expert (l, e) can only live in a slot of layer l. Eviction
// is therefore a per-layer choice, which is also how Belady's optimum is defined here.
//
// Visit rule shared by all policies: the experts a visit needs are served hits first,
// then misses in the given order; a miss takes a free slot, else evicts the subclass's
// victim among residents that are neither pinned nor needed by this visit. Only when
// every unpinned resident is needed by the visit (more distinct experts than slots,
// possible at concurrency > 1) may an already served expert of the visit be evicted:
// the layer then streams its experts through the slots.

export interface SlotAssignment {
  expert: number;
  slot: number;
}

export interface CacheDecision {
  layer: number;
  /** Needed and resident (including prefetched ones, listed again in prefetchHits). */
  hits: number[];
  /** Needed experts that were resident because of a prefetch not used before. */
  prefetchHits: number[];
  /** Needed and not resident: load into `slot` (after the eviction of that slot, if any). */
  loads: SlotAssignment[];
  /** Experts removed to make room, with the slot they held. */
  evictions: SlotAssignment[];
}

export interface PrefetchHint {
  expert: number;
  /** Higher first; for our policy an estimated probability of use at the target visit. */
  priority: number;
}

export interface PrefetchIssue extends SlotAssignment {
  /** Expert evicted from the slot, or -1 when it was free. */
  evicted: number;
}

export interface CacheStats {
  /** Needed (expert, visit) pairs that were resident. */
  hits: number;
  /** Needed (expert, visit) pairs that had to be loaded on demand. */
  misses: number;
  prefetchIssued: number;
  /** Prefetched experts that were needed before being evicted. */
  prefetchUsed: number;
  /** Prefetched experts evicted unused (each was a full load). */
  prefetchWasted: number;
  /** Prefetches withdrawn before their load started (no load happened). */
  prefetchCancelled: number;
}

export interface ExpertCachePolicy {
  readonly name: string;
  readonly layers: number;
  readonly experts: number;
  /** Slots of each layer (capacities[l] = capacityOf(l)). */
  readonly capacities: readonly number[];
  /** Slots of `layer`. */
  capacityOf(layer: number): number;
  /** Makes `experts` (distinct ids) of `layer` resident for the current visit. */
  request(layer: number, experts: ArrayLike<number>): CacheDecision;
  /**
   * Offers prefetches for a later visit of `layer`, best first. Issues at most `max` of
   * them; a hint is dropped when its expert is resident or when no slot can be taken
   * without evicting something the policy values more. Demand-only policies issue none.
   */
  prefetch(layer: number, hints: readonly PrefetchHint[], max: number): PrefetchIssue[];
  /** Withdraws a prefetch whose load has not started (stale): its slot becomes free. */
  cancelPrefetch(layer: number, expert: number): void;
  /** Keeps a resident expert from eviction (false when not resident or too many pinned). */
  pin(layer: number, expert: number): boolean;
  unpin(layer: number, expert: number): void;
  /** Slot of a resident expert, or -1. */
  slotOf(layer: number, expert: number): number;
  stats(): CacheStats;
  /**
   * Optional: bookkeeping the policy deferred (learning) done now. The offload runner
   * calls it while the engine would otherwise only wait for a read; a policy that defers
   * work also does it at its next request(), so decisions never depend on the call.
   */
  idle?(): void;
  /**
   * Optional: what the next steps are expected to need, from the scheduler's order of the
   * running sequences that did not run this step and their recent routing: per
   * (layer × experts + expert), a weight > 0 for an expert one of them is expected to use
   * (larger: surer, or sooner). Until the next call, eviction takes a resident of weight 0
   * before any of positive weight, and a lower weight before a higher one; the policy's own
   * rank decides among equal weights, and a prefetch never displaces a weighted expert (a
   * SlotCache may instead add the weight to its rank: upcomingScale).
   * null: no such knowledge (every weight 0). The array is read, not copied: the caller
   * keeps it unchanged until its next call.
   */
  setUpcoming?(weights: Float64Array | null): void;
}

export interface PolicyShape {
  layers: number;
  experts: number;
  /** Slots per layer (>= 1): one number for every layer, or one per layer. Each is clamped to `experts`. */
  capacity: number | readonly number[];
}

/** The slots of each layer for a shape's capacity (a number for all layers, or one per layer); throws on a bad one. */
export function layerCapacities(shape: PolicyShape): number[] {
  const { layers, experts, capacity } = shape;
  const caps = typeof capacity === 'number' ? new Array<number>(layers).fill(capacity) : Array.from(capacity);
  if (caps.length !== layers) throw new Error(`cache capacity: ${caps.length} layer capacities for ${layers} layers`);
  caps.forEach((c, l) => {
    if (!Number.isInteger(c) || c < 1) throw new Error(`cache capacity per layer must be an integer >= 1, got ${c}${typeof capacity === 'number' ? '' : ` for layer ${l}`}`);
  });
  return caps.map((c) => Math.min(c, experts));
}

/**
 * Slot bookkeeping shared by every policy; subclasses rank eviction candidates.
 * Times are per-layer visit counters: the n-th request() of layer l happens at time n.
 */
export abstract class SlotCache implements ExpertCachePolicy {
  abstract readonly name: string;
  readonly layers: number;
  readonly experts: number;
  readonly capacities: readonly number[];
  protected readonly slotOfE: Int32Array; // (layer, expert): slot or -1
  protected readonly slotE: Int32Array; // slotBase[layer] + slot: expert or -1
  private readonly slotBase: Int32Array; // per layer: index of its slot 0 in slotE (layers + 1 entries)
  protected readonly used: Int32Array; // slots used per layer
  protected readonly pinned: Uint8Array; // (layer, expert)
  protected readonly pinnedCount: Int32Array;
  protected readonly prefetched: Uint8Array; // (layer, expert): resident by an unused prefetch
  protected readonly visits: Int32Array; // per layer: visits so far (the current time)
  private readonly mark: Uint32Array; // (layer, expert): stamp of the visit that needs it
  private stamp = 0;
  /** setUpcoming()'s weights, or null. */
  private upcoming: Float64Array | null = null;
  /**
   * How eviction uses the upcoming weights: null, evict weighted experts last (for ranks
   * that are not comparable with a weight, as LRU's times); a number, add it × the weight
   * to keepScore (for a policy whose score is a forecast of use, which already sees part of
   * what the weights say).
   */
  protected upcomingScale: number | null = null;
  protected readonly s: CacheStats = { hits: 0, misses: 0, prefetchIssued: 0, prefetchUsed: 0, prefetchWasted: 0, prefetchCancelled: 0 };

  constructor(shape: PolicyShape) {
    const { layers, experts } = shape;
    const caps = layerCapacities(shape);
    this.layers = layers;
    this.experts = experts;
    this.capacities = Object.freeze(caps);
    this.slotBase = new Int32Array(layers + 1);
    for (let l = 0; l < layers; l++) this.slotBase[l + 1] = this.slotBase[l] + caps[l];
    this.slotOfE = new Int32Array(layers * experts).fill(-1);
    this.slotE = new Int32Array(this.slotBase[layers]).fill(-1);
    this.used = new Int32Array(layers);
    this.pinned = new Uint8Array(layers * experts);
    this.pinnedCount = new Int32Array(layers);
    this.prefetched = new Uint8Array(layers * experts);
    this.visits = new Int32Array(layers);
    this.mark = new Uint32Array(layers * experts);
  }

  capacityOf(layer: number): number {
    return this.capacities[layer];
  }

  /** Called for each needed expert at the current time (hit or load). */
  protected abstract touch(layer: number, expert: number, now: number): void;
  /** Eviction rank: the resident with the lowest value is evicted first. */
  protected abstract keepScore(layer: number, expert: number, now: number): number;
  /** Hook before a visit's experts are served (e.g. count uses of all needed experts). */
  protected beforeVisit(_layer: number, _experts: ArrayLike<number>, _now: number): void {}

  request(layer: number, experts: ArrayLike<number>): CacheDecision {
    const now = this.visits[layer]++;
    const E = this.experts;
    const stamp = ++this.stamp;
    const d: CacheDecision = { layer, hits: [], prefetchHits: [], loads: [], evictions: [] };
    this.beforeVisit(layer, experts, now);
    for (let i = 0; i < experts.length; i++) this.mark[layer * E + experts[i]] = stamp;
    for (let i = 0; i < experts.length; i++) {
      const e = experts[i];
      if (this.slotOfE[layer * E + e] < 0) continue;
      d.hits.push(e);
      if (this.prefetched[layer * E + e]) {
        this.prefetched[layer * E + e] = 0;
        d.prefetchHits.push(e);
        this.s.prefetchUsed++;
      }
      this.touch(layer, e, now);
    }
    this.s.hits += d.hits.length;
    for (let i = 0; i < experts.length; i++) {
      const e = experts[i];
      if (this.slotOfE[layer * E + e] >= 0) continue;
      const slot = this.takeSlot(layer, now, stamp, -Infinity, d.evictions);
      if (slot < 0) throw new Error(`layer ${layer}: every slot is pinned (capacity ${this.capacities[layer]})`);
      this.place(layer, e, slot);
      d.loads.push({ expert: e, slot });
      this.s.misses++;
      this.touch(layer, e, now);
    }
    for (let i = 0; i < experts.length; i++) this.mark[layer * E + experts[i]] = 0;
    return d;
  }

  prefetch(layer: number, hints: readonly PrefetchHint[], max: number): PrefetchIssue[] {
    const out: PrefetchIssue[] = [];
    const E = this.experts;
    const now = this.visits[layer];
    for (const h of hints) {
      if (out.length >= max) break;
      if (this.slotOfE[layer * E + h.expert] >= 0) continue;
      const ev: SlotAssignment[] = [];
      const slot = this.takeSlot(layer, now, 0, this.prefetchFloor(layer, h, now), ev);
      if (slot < 0) continue;
      this.place(layer, h.expert, slot);
      this.prefetched[layer * E + h.expert] = 1;
      this.s.prefetchIssued++;
      this.onPrefetch(layer, h.expert, now);
      out.push({ expert: h.expert, slot, evicted: ev.length ? ev[0].expert : -1 });
    }
    return out;
  }

  /**
   * A prefetch may only evict a resident scoring below this (keepScore units). The
   * default, Infinity, lets it take any victim; demand-only policies are simply never
   * offered hints by the simulator.
   */
  protected prefetchFloor(_layer: number, _hint: PrefetchHint, _now: number): number {
    return Infinity;
  }
  protected onPrefetch(_layer: number, _expert: number, _now: number): void {}

  cancelPrefetch(layer: number, expert: number): void {
    const i = layer * this.experts + expert;
    if (!this.prefetched[i]) return;
    this.prefetched[i] = 0;
    this.s.prefetchIssued--;
    this.s.prefetchCancelled++;
    this.remove(layer, expert);
  }

  setUpcoming(weights: Float64Array | null): void {
    if (weights !== null && weights.length !== this.layers * this.experts) {
      throw new Error(`upcoming weights: ${weights.length} values for ${this.layers} layers x ${this.experts} experts`);
    }
    this.upcoming = weights;
  }

  pin(layer: number, expert: number): boolean {
    const i = layer * this.experts + expert;
    if (this.slotOfE[i] < 0) return false;
    if (this.pinned[i]) return true;
    if (this.pinnedCount[layer] >= this.capacities[layer] - 1) return false; // keep a slot for demand loads
    this.pinned[i] = 1;
    this.pinnedCount[layer]++;
    return true;
  }

  unpin(layer: number, expert: number): void {
    const i = layer * this.experts + expert;
    if (!this.pinned[i]) return;
    this.pinned[i] = 0;
    this.pinnedCount[layer]--;
  }

  slotOf(layer: number, expert: number): number {
    return this.slotOfE[layer * this.experts + expert];
  }

  /** Resident experts of a layer (slot order). */
  resident(layer: number): number[] {
    const out: number[] = [];
    const base = this.slotBase[layer];
    for (let s = 0; s < this.capacities[layer]; s++) {
      const e = this.slotE[base + s];
      if (e >= 0) out.push(e);
    }
    return out;
  }

  stats(): CacheStats {
    return { ...this.s };
  }

  /** Prefetched experts still resident and unused count as wasted once the run ends. */
  finish(): CacheStats {
    for (let i = 0; i < this.prefetched.length; i++) {
      if (this.prefetched[i]) {
        this.prefetched[i] = 0;
        this.s.prefetchWasted++;
      }
    }
    return this.stats();
  }

  /**
   * A free slot, or the slot of the lowest-scoring evictable resident (score < floor
   * when floor is finite); -1 when none qualifies. Experts marked with `stamp` (needed
   * by the current visit) are skipped unless nothing else can go.
   */
  private takeSlot(layer: number, now: number, stamp: number, floor: number, evictions: SlotAssignment[]): number {
    const C = this.capacities[layer];
    const base = this.slotBase[layer];
    const E = this.experts;
    if (this.used[layer] < C) {
      for (let s = 0; s < C; s++) if (this.slotE[base + s] < 0) return s;
    }
    let best = -1;
    let bestScore = Infinity;
    let bestUp = Infinity;
    let fallback = -1;
    let fallbackScore = Infinity;
    const up = this.upcoming;
    for (let s = 0; s < C; s++) {
      const e = this.slotE[base + s];
      if (this.pinned[layer * E + e]) continue;
      const sc = this.keepScore(layer, e, now);
      if (stamp !== 0 && this.mark[layer * E + e] === stamp) {
        if (sc < fallbackScore) (fallbackScore = sc), (fallback = s);
        continue;
      }
      // The upcoming steps' expected experts: added to the rank (upcomingScale), or else
      // evicted last (lowest weight first), the policy's rank deciding among equal weights.
      let u = up === null ? 0 : up[layer * E + e];
      let r = sc;
      if (this.upcomingScale !== null) {
        r += this.upcomingScale * u;
        u = 0;
      }
      if (u < bestUp || (u === bestUp && r < bestScore)) (bestUp = u), (bestScore = r), (best = s);
    }
    if (best < 0 && Number.isFinite(floor)) return -1;
    if (best >= 0 && Number.isFinite(floor) && bestScore >= floor) return -1;
    // A prefetch (any floor but a demand load's -Infinity) never displaces an upcoming expert.
    if (best >= 0 && floor !== -Infinity && bestUp > 0) return -1;
    const s = best >= 0 ? best : fallback;
    if (s < 0) return -1;
    const victim = this.slotE[base + s];
    evictions.push({ expert: victim, slot: s });
    this.remove(layer, victim);
    return s;
  }

  private place(layer: number, expert: number, slot: number): void {
    this.slotE[this.slotBase[layer] + slot] = expert;
    this.slotOfE[layer * this.experts + expert] = slot;
    this.used[layer]++;
  }

  private remove(layer: number, expert: number): void {
    const i = layer * this.experts + expert;
    const slot = this.slotOfE[i];
    if (slot < 0) return;
    if (this.prefetched[i]) {
      this.prefetched[i] = 0;
      this.s.prefetchWasted++;
    }
    this.slotE[this.slotBase[layer] + slot] = -1;
    this.slotOfE[i] = -1;
    this.used[layer]--;
    this.onEvict(layer, expert);
  }

  protected onEvict(_layer: number, _expert: number): void {}
}
