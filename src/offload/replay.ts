// Routing replay: the engine takes each token's experts from a recorded moe-trace v1 file
// instead of its router, so that a generated model's expert accesses (what the expert
// cache sees) follow a real model's routing while the arithmetic stays the model's.
//
// Mapping (stated once, used everywhere):
// - Sequence i of the server (the scheduler's sequence id) replays trace request
//   (i mod R), R = requests in the file, in file order.
// - The token at position p replays that request's token p mod N (N = its tokens,
//   prefill then decode rows): positions past the trace's end wrap around.
// - Model layer l uses trace layer (l mod L_trace); trace expert e becomes model expert
//   (e mod E_model). k = min(top_k of the trace, E_model) experts per token.
// - Ids are kept in the trace's rank order; when the expert mapping folds two of a row's
//   ids onto one, or a (token, layer) has no row (llama.cpp skips the last layer of
//   prompt tokens it needs no logits for), the missing ids are the router's best
//   remaining experts, so every token still gets k distinct experts.
// - Gate weights are the model's: softmax of the router logits restricted to the k
//   chosen ids (renormalised over them), in the same order.

import type { TraceHeader, TraceRequest } from './trace.js';
import { loadTrace, NO_EXPERT, type TraceToken } from './trace.js';

/**
 * A trace row's ids on a model of E experts: e mod E in rank order, ids folded onto an
 * expert already taken skipped, at most k of them, written to out[off..] and marked in
 * `chosen`. Returns how many (fewer than k when ids fold).
 */
function foldRow(row: ArrayLike<number>, E: number, k: number, chosen: Uint8Array, out: Int32Array | Uint16Array, off: number): number {
  let n = 0;
  for (let i = 0; i < row.length && n < k; i++) {
    const e = row[i] % E;
    if (chosen[e]) continue;
    chosen[e] = 1;
    out[off + n++] = e;
  }
  return n;
}

/** Sequence and position of each token of a step, in batch order. */
export interface StepTokens {
  seq: Int32Array;
  pos: Int32Array;
}

/** k experts per token: ids (tokens, k) and gate weights in the same order. */
export interface Routing {
  ids: Int32Array;
  weights: Float32Array;
  k: number;
}

export interface ReplayShape {
  layers: number;
  experts: number;
}

export interface ReplayStats {
  /** (token, layer) routings taken from the trace. */
  routed: number;
  /** Of those, ids filled by the router: folded duplicates and rows the trace lacks. */
  filledIds: number;
  /** (token, layer) without a trace row (filled entirely by the router). */
  missingRows: number;
}

export class RoutingReplay {
  readonly k: number;
  private readonly s: ReplayStats = { routed: 0, filledIds: 0, missingRows: 0 };

  constructor(
    readonly header: TraceHeader,
    private readonly requests: readonly TraceRequest[],
    readonly shape: ReplayShape,
    /** Shown in messages and stats (the trace's path). */
    readonly name = header.model || 'trace',
  ) {
    if (requests.length === 0) throw new Error(`routing replay: ${name} has no requests`);
    if (!(shape.layers >= 1 && shape.experts >= 1)) throw new Error('routing replay: the model needs at least one layer and one expert');
    this.k = Math.min(header.topK, shape.experts);
  }

  /** Reads a moe-trace v1 file (whole, in its compact form: 2 bytes per expert id). */
  static async load(path: string, shape: ReplayShape): Promise<RoutingReplay> {
    const { header, requests } = await loadTrace(path);
    return new RoutingReplay(header, requests, shape, path);
  }

  get numRequests(): number {
    return this.requests.length;
  }

  /** One line describing the mapping, for logs. */
  describe(): string {
    const h = this.header;
    return (
      `routing replay of ${this.name} (${h.model || 'unnamed model'}: ${h.layers} layers, ${h.experts} experts, top-${h.topK}, ${this.requests.length} requests) ` +
      `onto ${this.shape.layers} layers × ${this.shape.experts} experts: sequence i → request i mod ${this.requests.length}, position p → token p mod its length, ` +
      `layer l → ${h.layers === this.shape.layers ? 'l' : `l mod ${h.layers}`}, expert e → ${h.experts === this.shape.experts ? 'e' : `e mod ${this.shape.experts}`}, k = ${this.k}`
    );
  }

  stats(): ReplayStats {
    return { ...this.s };
  }

  /**
   * The replayed routing of layer `layer` for a step's tokens; `routerLogits` are the
   * model's (tokens, experts) logits of that layer (for the gate weights and fills).
   */
  route(layer: number, routerLogits: Float32Array, tokens: StepTokens): Routing {
    const T = tokens.seq.length;
    const E = this.shape.experts;
    const K = this.k;
    const Kt = this.header.topK;
    if (routerLogits.length !== T * E) throw new Error(`routing replay: expected ${T} × ${E} router logits, got ${routerLogits.length}`);
    const tl = layer % this.header.layers;
    const ids = new Int32Array(T * K);
    const weights = new Float32Array(T * K);
    const chosen = new Uint8Array(E);
    for (let t = 0; t < T; t++) {
      const req = this.requests[tokens.seq[t] % this.requests.length];
      const tok = req.tokens[tokens.pos[t] % req.tokens.length];
      const row = tok.experts.subarray(tl * Kt, (tl + 1) * Kt);
      const z = routerLogits.subarray(t * E, (t + 1) * E);
      let n = 0;
      if (row[0] === NO_EXPERT) this.s.missingRows++;
      else n = foldRow(row, E, K, chosen, ids, t * K);
      this.s.filledIds += K - n;
      // Fill from the router: best remaining logits, lowest id first on ties.
      while (n < K) {
        let best = -1;
        for (let e = 0; e < E; e++) if (!chosen[e] && (best < 0 || z[e] > z[best])) best = e;
        chosen[best] = 1;
        ids[t * K + n++] = best;
      }
      // Softmax of the router logits over the chosen ids.
      let mx = -Infinity;
      for (let i = 0; i < K; i++) mx = Math.max(mx, z[ids[t * K + i]]);
      let sum = 0;
      const p = new Float64Array(K);
      for (let i = 0; i < K; i++) sum += p[i] = Math.exp(z[ids[t * K + i]] - mx);
      for (let i = 0; i < K; i++) {
        weights[t * K + i] = p[i] / sum;
        chosen[ids[t * K + i]] = 0;
      }
      this.s.routed++;
    }
    return { ids, weights, k: K };
  }
}

/**
 * What sequences 0..R-1 (R = the trace's requests) see under RoutingReplay when each runs
 * positions 0..positions-1 of a model of `shape`, as trace requests a simulator can run
 * (one token per position, phase 'decode'): so that `moe-serve sim` and the batching
 * simulator can replay exactly the routing an end-to-end benchmark gives the engine.
 * Model layer l takes trace layer (l mod L_trace), expert e becomes (e mod E_model), k =
 * min(top_k, E_model); positions past a request's end wrap as in the replay. The replay
 * fills some ids from the model's router (two ids folded onto one expert, or a row the
 * trace lacks), which no simulator knows: a folded row is an error here, and a missing
 * row stays missing (the simulator skips that layer visit where the engine would run the
 * router's choice).
 */
export function replayedRequests(
  header: TraceHeader,
  requests: readonly TraceRequest[],
  shape: ReplayShape,
  positions: number,
): { header: TraceHeader; requests: TraceRequest[] } {
  if (!Number.isInteger(positions) || positions < 1) throw new Error(`positions must be an integer >= 1, got ${positions}`);
  if (!(shape.layers >= 1 && shape.experts >= 1)) throw new Error('routing replay: the model needs at least one layer and one expert');
  const L = shape.layers;
  const E = shape.experts;
  const Kt = header.topK;
  const K = Math.min(Kt, E);
  const chosen = new Uint8Array(E);
  const out = requests.map((req, r) => {
    if (req.tokens.length === 0) throw new Error(`routing replay: request ${req.id} has no tokens`);
    const tokens: TraceToken[] = [];
    for (let p = 0; p < positions; p++) {
      const src = req.tokens[p % req.tokens.length];
      const experts = new Uint16Array(L * K).fill(NO_EXPERT);
      for (let l = 0; l < L; l++) {
        const tl = l % header.layers;
        if (src.experts[tl * Kt] === NO_EXPERT) continue;
        const n = foldRow(src.experts.subarray(tl * Kt, (tl + 1) * Kt), E, K, chosen, experts, l * K);
        for (let i = 0; i < n; i++) chosen[experts[l * K + i]] = 0;
        if (n < K) {
          throw new Error(
            `routing replay: request ${r} position ${p} layer ${l}: the trace's ids fold onto ${n} of ${K} distinct experts of ${E}; the engine fills the rest from its router, which a simulator cannot know`,
          );
        }
      }
      tokens.push({ position: p, phase: 'decode', experts });
    }
    return { id: r, tokens, prefillTokens: 0 };
  });
  return { header: { ...header, layers: L, experts: E, topK: K }, requests: out };
}
