// Expert-routing predictors that a trace can exercise, learned online from observed
// routing only (never from the future):
//
// - next token, same layer: P(e at layer l for a sequence's next token | the experts its
//   current token chose at l), from transition counts per layer (expert i at token t
//   followed by expert j at token t+1 of the same sequence).
// - next layer, same token: P(e at layer l+1 | the experts this token chose at l), from
//   cross-layer co-occurrence counts.
// - pre-gating hook: the engine may feed probabilities computed from the hidden state
//   (applying layer l+1's router to layer l's hidden state); when present they replace
//   the co-occurrence estimate for that (sequence, layer).
//
// Counts are per (layer, expert, expert): L × E² floats (Qwen3-30B: 48 × 128² × 2 × 4 B ≈ 6 MB).

/**
 * Pseudo-observations added to a conditioning expert's count for the cross-layer
 * estimate, which drives prefetches (each costs a load): shrink it while evidence is thin.
 */
const PRIOR_TOKENS = 2;

export interface TokenRouting {
  /** Sequence (request) id; the next-token predictor links tokens of one sequence. */
  seq: number;
  /** Experts chosen at the layer (distinct ids); empty when the layer was skipped. */
  experts: ArrayLike<number>;
}

export interface PredictorShape {
  layers: number;
  experts: number;
}

export class RoutingPredictor {
  readonly layers: number;
  readonly experts: number;
  private readonly trans: Float32Array; // (layer, i, j): i at token t then j at t+1, same layer
  private readonly transN: Float32Array; // (layer, i): tokens with i followed by a next token
  private readonly cross: Float32Array; // (layer, i, j): i at layer l-1 and j at layer l, same token
  private readonly crossN: Float32Array; // (layer, i): tokens with i at layer l-1 seen at layer l
  // Per live sequence and layer: the last routed token's experts, and the routing of the
  // tokens of the latest call (null where a token skipped the layer).
  private readonly last = new Map<number, { last: (number[] | null)[]; chunk: ((number[] | null)[] | null)[] }>();
  private readonly preGate = new Map<number, Map<number, Float32Array>>(); // seq -> layer -> probs

  constructor(shape: PredictorShape) {
    this.layers = shape.layers;
    this.experts = shape.experts;
    const E = shape.experts;
    this.trans = new Float32Array(shape.layers * E * E);
    this.transN = new Float32Array(shape.layers * E);
    this.cross = new Float32Array(shape.layers * E * E);
    this.crossN = new Float32Array(shape.layers * E);
  }

  /**
   * Records the routing of the current tokens at `layer` (call for layers in order). A
   * sequence may have several consecutive tokens in one call (a prompt chunk, in position
   * order): each is linked to the token before it at this layer and to its own routing
   * at the layer below, which the previous call held for the same tokens.
   */
  observe(layer: number, tokens: readonly TokenRouting[]): void {
    const E = this.experts;
    const bySeq = new Map<number, ArrayLike<number>[]>();
    for (const t of tokens) {
      let list = bySeq.get(t.seq);
      if (!list) bySeq.set(t.seq, (list = []));
      list.push(t.experts);
    }
    for (const [seq, list] of bySeq) {
      let hist = this.last.get(seq);
      if (!hist) this.last.set(seq, (hist = { last: new Array(this.layers).fill(null), chunk: new Array(this.layers).fill(null) }));
      // The same tokens at the layer below (layers are observed in order); a different
      // token count there (a skipped layer) gives no cross-layer pairs.
      const below = layer > 0 && hist.chunk[layer - 1]?.length === list.length ? hist.chunk[layer - 1] : null;
      const chunk: (number[] | null)[] = [];
      for (let j = 0; j < list.length; j++) {
        const experts = list[j];
        const routed = experts.length > 0 ? Array.from(experts) : null;
        chunk.push(routed);
        if (!routed) continue;
        const prevTok = hist.last[layer];
        if (prevTok) {
          for (const i of prevTok) {
            this.transN[layer * E + i]++;
            const row = (layer * E + i) * E;
            for (const j2 of routed) this.trans[row + j2]++;
          }
        }
        const same = below?.[j];
        if (same) {
          for (const i of same) {
            this.crossN[layer * E + i]++;
            const row = (layer * E + i) * E;
            for (const j2 of routed) this.cross[row + j2]++;
          }
        }
        hist.last[layer] = routed;
      }
      hist.chunk[layer] = chunk;
      this.preGate.get(seq)?.delete(layer);
    }
  }

  /** Forgets a finished sequence. */
  endSequence(seq: number): void {
    this.last.delete(seq);
    this.preGate.delete(seq);
  }

  /** Live sequences (those observed and not ended). */
  sequences(): number[] {
    return [...this.last.keys()];
  }

  /** Hook for the engine's hidden-state pre-gating: probabilities for seq's next visit of layer. */
  setPreGating(seq: number, layer: number, probs: Float32Array): void {
    if (probs.length !== this.experts) throw new Error(`pre-gating: expected ${this.experts} probabilities, got ${probs.length}`);
    let m = this.preGate.get(seq);
    if (!m) this.preGate.set(seq, (m = new Map()));
    m.set(layer, probs);
  }

  /**
   * out[e] = estimated P(seq's next token uses e at layer), from its current token's
   * experts at layer (mean over them of the transition frequencies); 0 when unknown.
   */
  nextToken(seq: number, layer: number, out: Float64Array): Float64Array {
    out.fill(0);
    const cur = this.last.get(seq)?.last[layer];
    if (!cur || cur.length === 0) return out;
    return this.mix(this.trans, this.transN, layer, cur, out, 0);
  }

  /**
   * out[e] = estimated P(seq's current token uses e at layer), from its experts at
   * layer - 1 (co-occurrence) or from pre-gating when the engine supplied it.
   */
  nextLayer(seq: number, layer: number, out: Float64Array): Float64Array {
    out.fill(0);
    const pg = this.preGate.get(seq)?.get(layer);
    if (pg) {
      for (let e = 0; e < this.experts; e++) out[e] = pg[e];
      return out;
    }
    const below = layer > 0 ? this.last.get(seq)?.last[layer - 1] : null;
    if (!below || below.length === 0) return out;
    return this.mix(this.cross, this.crossN, layer, below, out, PRIOR_TOKENS);
  }

  private mix(counts: Float32Array, n: Float32Array, layer: number, given: readonly number[], out: Float64Array, prior: number): Float64Array {
    const E = this.experts;
    let used = 0;
    for (const i of given) {
      const ni = n[layer * E + i];
      if (ni === 0) continue;
      used++;
      const row = (layer * E + i) * E;
      // Shrunk towards 0 while evidence is thin: one sighting of i then j is not P = 1.
      const d = ni + prior;
      for (let e = 0; e < E; e++) out[e] += counts[row + e] / d;
    }
    if (used > 0) for (let e = 0; e < E; e++) out[e] /= used;
    return out;
  }
}
