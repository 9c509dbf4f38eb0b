// "forecast": an expert cache policy that ranks residents by a learned, distance-aware
// forecast of their reuse, estimated online from what the server knows at the visit.
//
// Eviction score. For an expert e of layer l at the layer's visit n, the policy
// estimates P(e is needed again within the next h visits of l) for h in HORIZONS and
// keeps the residents with the largest sum over h. The sum is a discretised closeness
// of the next use: an expert needed at the next visit counts in every term, one needed
// in 8 visits in one term only, one not needed for long in none. Belady keeps the
// nearest next use; this is its forecast version (with the true next uses in place of
// the forecasts the same rule stays within 1% of Belady at 2x the active experts).
//
// Each P(h) is a logistic model of one feature vector shared by the horizons and layers:
//   - recency: one-hot buckets of the visits since e's last use at l;
//   - frequency: log(1 + uses decayed with half-lives 1..32 visits, and undecayed), so
//     the model weighs short and long memory itself instead of a fixed half-life;
//   - next token, same layer: P(e at l for the next token | the current tokens' experts
//     at l), and from two tokens back, from online transition counts per layer;
//   - next token, layer below (cross-layer): P(e at l for the next token | the current
//     tokens' experts at l - 1), counts of "i at (token t, l-1), e at (token t+1, l)";
//   - nearest neighbours (cross-layer, whole token): the past tokens whose routing at
//     layers 0..l overlaps most with the current token's; how often e follows them at l
//     (next token, and within 4 tokens);
//   with several sequences in the batch, the forecasts of the sequences are combined as
//   P(any of them needs e).
// The weights are learned online (Adagrad on the logistic loss): after each visit the
// policy records the features of the layer's residents and recently used experts; their
// labels (used within h visits?) are known h visits later, and only then does the model
// learn from them. Nothing is read from the future. The weights (and Adagrad's sums)
// start from a prior, FORECAST_PRIOR (forecast-prior.ts): what this online learning had
// reached after replaying a real routing trace of another model (Gemma 4 26B-A4B) three
// times. The features describe an expert's own history and the routing around it, not
// expert ids, so what they mean carries across models: a policy no longer starts each
// run knowing nothing. `prior: null` starts from zero.
//
// Online use. request()/prefetch() are the ExpertCachePolicy interface. The per-token
// routing (which sequence chose which experts, in router rank order) arrives through the
// optional observeRouting() (the simulator calls observe(), the VisitObserver form); call
// it for a layer before request() of that layer. A sequence may bring several consecutive
// tokens to one visit (a prompt chunk): each is linked to the token before it and to its
// own routing at the layer below, so a prompt teaches what its tokens would one by one.
// Without these calls the policy still works: each visit's expert set is taken as the
// routing of one sequence.
//
// Prefetch. After layer l is routed, RoutingPredictor's cross-layer co-occurrence (or the
// engine's pre-gating) gives P(needed at l+1). A hint is issued only when its probability
// is at least prefetchMin and beats the victim's forecast of use at the next visit; the
// experts the layer's last visit used are never displaced by a prefetch. A prefetch is a
// full load whether or not it is used, so it can never lower the load count (demand
// loading with the best evictions is optimal for counting loads): it only hides load
// latency. With prefetch: false the policy is demand-only.

import { SlotCache, type PolicyShape, type PrefetchHint } from './cache-policy.js';
import { RoutingPredictor } from '../router/predictor.js';
import type { VisitObserver } from './simulator.js';
import type { StepToken } from './schedule.js';
import { NO_EXPERT } from './trace.js';
import { nextLayerPrefetchHints } from './predictive.js';
import { FORECAST_PRIOR } from './forecast-prior.js';

/** Horizons (visits of the layer) of the reuse forecasts summed by the eviction score. */
const HORIZONS = [1, 2, 4, 8];
/** Half-lives (visits) of the decayed use counts; Infinity = lifetime count. */
const HALF_LIVES = [1, 2, 4, 8, 16, 32, Infinity];
/** Decay factors 2^(-dt / half-life) for dt < DECAY_TABLE_VISITS visits (1 for the lifetime count). */
const DECAY_TABLE_VISITS = 256;
const DECAY = Float64Array.from({ length: DECAY_TABLE_VISITS * HALF_LIVES.length }, (_, k) => {
  const hl = HALF_LIVES[k % HALF_LIVES.length];
  return Number.isFinite(hl) ? Math.pow(2, -Math.floor(k / HALF_LIVES.length) / hl) : 1;
});
/** The factor that decays a count of half-life HALF_LIVES[j] over dt visits (1 when dt <= 0, and for the lifetime count). */
function decayFactor(dt: number, j: number): number {
  if (dt <= 0) return 1;
  if (dt < DECAY_TABLE_VISITS) return DECAY[dt * HALF_LIVES.length + j];
  const hl = HALF_LIVES[j];
  return Number.isFinite(hl) ? Math.pow(2, -dt / hl) : 1;
}
/** Upper bounds of the recency buckets (visits since the last use, 0 = this visit). */
const AGE_EDGES = [0, 1, 2, 4, 8, 16, 64];
const N_AGE = AGE_EDGES.length + 1;
const F_COUNT = 0;
const F_AGE = F_COUNT + HALF_LIVES.length;
const F_TRANS = F_AGE + N_AGE;
const F_KNN = F_TRANS + 8;
const F_BIAS = F_KNN + 3;
const N_FEAT = F_BIAS + 1;
/** Adagrad step size (the features are O(1)). */
const LEARNING_RATE = 0.03;
/**
 * Training examples of a visit: the residents and every expert of the layer used within
 * this many visits, so the model learns from more than the policy's own choices. Training
 * is most of the policy's cost: 16 visits instead of 64 took its simulated time down by
 * about 30% (compiled, best of 3, both real traces at 2x and 4x the active experts) for
 * loads within 0.4% either way (Qwen3 2x: 19467 -> 19507, 4x: 12118 -> 12161; Gemma 4
 * 2x: 12051 -> 12040, 4x: 7486 -> 7500).
 */
const TRAIN_AGE = 16;
/**
 * Schedule-aware eviction (SlotCache.setUpcoming, upcoming.ts): the upcoming steps' weight
 * of an expert is added to its eviction score × this. The score already forecasts the
 * batch's sequences from their own history, so the weights only nudge it: in
 * `moe-serve sim --scheduler S --cache forecast --max-extra-wait 1` (64 runnable, steps of
 * 8, 64 of 128 slots) on 256-request traces synthesized like the real Qwen3 one, loads per
 * token at 0 / 0.25 / 1 x the weight, or evicting weighted experts last as LRU does:
 * no request variation, fcfs 5.906 / 5.914 / 6.012 / 6.450; variation 0.5 over 8 topics,
 * expert-aware 43.38 / 42.20 / 41.72 / 41.92 and fcfs 49.31 / 48.56 / - / 49.39.
 */
const UPCOMING_SCALE = 0.25;
/** Floor inside log p of the transition features. */
const P_EPS = 1e-3;
/** Tokens remembered for the nearest-neighbour forecast (all sequences, most recent). */
const KNN_WINDOW = 512;
/** Neighbours whose successors vote. */
const KNN_K = 4;
/** Successor tokens of a neighbour that vote for "needed soon". */
const KNN_AHEAD = 4;

export interface ForecastOptions {
  /** Issue prefetches (default true). */
  prefetch?: boolean;
  /** Minimum predicted probability for a prefetch hint (default 0.6). */
  prefetchMin?: number;
  /** Share a predictor with the engine (prefetch hints, pre-gating); one is created otherwise. */
  predictor?: RoutingPredictor;
  /**
   * Keep the predictor behind prefetchHints() up to date (default true). The simulator's
   * prefetch path reads it; the engine's runner makes its own predictions and turns it off
   * (prefetchHints() then refuses), which saves its updates at every visit.
   */
  routingPredictor?: boolean;
  /** Adagrad step size of the online model (default LEARNING_RATE). */
  learningRate?: number;
  /** Starting weights and Adagrad sums (default FORECAST_PRIOR; null: zero, an untrained model). */
  prior?: ForecastModel | null;
}

/** The online model's state: weights and Adagrad sums, HORIZONS x N_FEAT each (forecast-prior.ts). */
export interface ForecastModel {
  horizons: readonly number[];
  features: number;
  w: readonly number[];
  g2: readonly number[];
}

/** One sequence's routing at one layer, as the engine knows it when the layer runs. */
export interface SeqRouting {
  seq: number;
  /** Distinct experts the sequence's current token chose at the layer (empty: skipped). */
  experts: ArrayLike<number>;
}

/** A routed token: its experts per layer (null until the layer ran) and its successor. */
interface TokenRec {
  routing: (Int32Array | null)[];
  next: TokenRec | null;
  /** While current: similarity of each window token (by ring slot), over the layers run so far. */
  sim: Float32Array | null;
  /** Its slot in the window ring. */
  slot: number;
}

interface SeqHistory {
  /** Current (last routed) token's experts per layer, and the previous token's. */
  cur: (Int32Array | null)[];
  prev: (Int32Array | null)[];
  token: TokenRec | null;
  /**
   * Per layer: the routing of the tokens of the sequence's latest visit of the layer (one
   * token in decode, a prompt chunk in prefill), and of the token before them.
   */
  chunk: (Int32Array[] | null)[];
  before: (Int32Array | null)[];
  /** The window records of the latest chunk's tracked tokens (its last ones), in order. */
  chunkToks: TokenRec[];
}

/** Training examples of one visit: features at time `at`, labelled as visits pass. */
interface Pending {
  at: number;
  layer: number;
  experts: Int32Array;
  feats: Float32Array; // experts.length x N_FEAT
  /** Visits from `at` to each expert's first use after it; -1 while not used. */
  firstUse: Int32Array;
}

export class ForecastPolicy extends SlotCache implements VisitObserver {
  readonly name = 'forecast';
  readonly predictor: RoutingPredictor;
  private readonly predictorOn: boolean;
  private readonly prefetchOn: boolean;
  private readonly prefetchMin: number;
  private readonly lr: number;
  // Per (layer, expert) history.
  private readonly lastUse: Float64Array;
  private readonly counts: Float64Array; // (layer, expert, half-life) as of countAt
  private readonly countAt: Float64Array;
  // Transition counts per layer, (from i, to j): next token same layer; two tokens ahead;
  // next token from the layer below.
  private readonly trans: Float32Array;
  private readonly transN: Float32Array;
  private readonly trans2: Float32Array;
  private readonly trans2N: Float32Array;
  private readonly cross: Float32Array;
  private readonly crossN: Float32Array;
  private readonly hist = new Map<number, SeqHistory>();
  private explicitEnds = false;
  /** Sequences of each layer's latest visit (the pseudo-sequence -1 without observeRouting). */
  private readonly visitSeqs: number[][];
  private readonly routedAt: Int32Array; // per layer: visit time observeRouting was called for
  // Forecasts for the layer's next visit per (layer, expert), refreshed at each visit.
  private readonly pSame: Float64Array;
  private readonly pSame2: Float64Array;
  private readonly pCross: Float64Array;
  private readonly vote1: Float64Array;
  private readonly voteAhead: Float64Array;
  private readonly knnSim: Float64Array; // per layer: similarity of the best neighbour (0..1)
  // Nearest-neighbour window.
  private readonly ring: (TokenRec | null)[] = new Array(KNN_WINDOW).fill(null);
  private ringHead = 0;
  /** (layer, expert, ring slot) → 1 when the window token in the slot chose the expert at the layer. */
  private readonly members: Uint8Array;
  /**
   * The same index as lists: (layer, expert) → the ring slots whose token chose the expert
   * at the layer (memberSlots[(layer, expert) × KNN_WINDOW + j] for j < memberCount), in no
   * particular order. An expert is chosen by a few of the window's tokens, so a new token's
   * overlaps are summed over these lists instead of over the whole window.
   */
  private readonly memberSlots: Int16Array;
  private readonly memberCount: Int32Array;
  private readonly knnBest = new Int32Array(KNN_K);
  // Model.
  private readonly w: Float64Array; // horizon x N_FEAT
  private readonly g2: Float64Array;
  private readonly pending: Pending[][]; // per layer, oldest first
  private readonly toTrain: Pending[] = []; // labelled, not learned from yet (idle())
  private readonly featuresDue: Pending[] = []; // recorded, features not taken yet (idle())
  private readonly x = new Float64Array(N_FEAT);
  private readonly nz = new Int32Array(N_FEAT);
  private readonly scoreAt: Float64Array; // (layer, expert): visit time of the cached score
  private readonly score: Float64Array;
  private readonly p1: Float64Array; // cached P(needed at the next visit)
  private readonly p1At: Float64Array; // (layer, expert): visit time of a p1 computed without the score
  /** (layer, expert) × N_FEAT: features as of featAt (the visit record() took them after). */
  private readonly featCache: Float64Array;
  private readonly featAt: Float64Array;
  private inPrefetch = false;
  /** In prefetchNextVisit: victims and hints are compared on the full eviction score. */
  private byScore = false;
  private readonly scratch: Float64Array;
  private readonly flags: Uint8Array;

  constructor(shape: PolicyShape, opts: ForecastOptions = {}) {
    super(shape);
    const { layers: L, experts: E } = shape;
    this.predictor = opts.predictor ?? new RoutingPredictor(shape);
    this.predictorOn = opts.routingPredictor ?? true;
    this.prefetchOn = opts.prefetch ?? true;
    this.prefetchMin = opts.prefetchMin ?? 0.6;
    this.lr = opts.learningRate ?? LEARNING_RATE;
    if (!(this.lr > 0)) throw new Error(`forecast learning rate must be > 0, got ${this.lr}`);
    this.lastUse = new Float64Array(L * E).fill(-Infinity);
    this.counts = new Float64Array(L * E * HALF_LIVES.length);
    this.countAt = new Float64Array(L * E);
    this.trans = new Float32Array(L * E * E);
    this.transN = new Float32Array(L * E);
    this.trans2 = new Float32Array(L * E * E);
    this.trans2N = new Float32Array(L * E);
    this.cross = new Float32Array(L * E * E);
    this.crossN = new Float32Array(L * E);
    this.visitSeqs = Array.from({ length: L }, () => []);
    this.routedAt = new Int32Array(L).fill(-1);
    this.pSame = new Float64Array(L * E);
    this.pSame2 = new Float64Array(L * E);
    this.pCross = new Float64Array(L * E);
    this.vote1 = new Float64Array(L * E);
    this.voteAhead = new Float64Array(L * E);
    this.knnSim = new Float64Array(L);
    this.members = new Uint8Array(L * E * KNN_WINDOW);
    this.memberSlots = new Int16Array(L * E * KNN_WINDOW);
    this.memberCount = new Int32Array(L * E);
    this.w = new Float64Array(HORIZONS.length * N_FEAT);
    this.g2 = new Float64Array(HORIZONS.length * N_FEAT).fill(1e-8);
    const prior = opts.prior === undefined ? FORECAST_PRIOR : opts.prior;
    if (prior) {
      const n = HORIZONS.length * N_FEAT;
      if (prior.features !== N_FEAT || prior.horizons.join() !== HORIZONS.join() || prior.w.length !== n || prior.g2.length !== n) {
        throw new Error(`forecast prior: made for ${prior.horizons.length} horizons x ${prior.features} features, the model has ${HORIZONS.length} x ${N_FEAT} (fit it again: scripts/fit-forecast-prior.ts)`);
      }
      if (![...prior.w, ...prior.g2].every(Number.isFinite) || !prior.g2.every((x) => x > 0)) throw new Error('forecast prior: weights must be finite and Adagrad sums > 0');
      this.w.set(prior.w);
      this.g2.set(prior.g2);
    }
    this.pending = Array.from({ length: L }, () => []);
    this.scoreAt = new Float64Array(L * E).fill(-1);
    this.score = new Float64Array(L * E);
    this.p1 = new Float64Array(L * E);
    this.p1At = new Float64Array(L * E).fill(-1);
    this.featCache = new Float64Array(L * E * N_FEAT);
    this.featAt = new Float64Array(L * E).fill(-2);
    this.scratch = new Float64Array(E);
    this.flags = new Uint8Array(E);
    this.upcomingScale = UPCOMING_SCALE;
  }

  /** The online model as it is now (a prior for later runs: scripts/fit-forecast-prior.ts). */
  model(): ForecastModel {
    this.idle();
    return { horizons: [...HORIZONS], features: N_FEAT, w: Array.from(this.w), g2: Array.from(this.g2) };
  }

  // ---- routing input -------------------------------------------------------------

  /** VisitObserver: per-token routing of a visit (the simulator calls this before request()). */
  observe(_step: number, layer: number, tokens: readonly StepToken[]): void {
    const K = tokens.length ? tokens[0].token.experts.length / this.layers : 0;
    const out: SeqRouting[] = [];
    for (const t of tokens) {
      const ex = t.token.experts.subarray(layer * K, (layer + 1) * K);
      out.push({ seq: t.request, experts: ex[0] === NO_EXPERT ? ex.subarray(0, 0) : ex });
    }
    this.observeRouting(layer, out);
  }

  /**
   * Optional online input: which sequence chose which experts at `layer`, for the visit
   * about to be requested (call before request(layer, union of the experts)). A sequence
   * absent from the last layer's visit after being in it is taken as finished, unless the
   * caller ends sequences itself (endSequence): a server whose batch policy lets running
   * sequences sit out steps must, or their history would be lost. Without these calls
   * the visit's expert set is taken as the routing of a single sequence.
   */
  /**
   * Ends a sequence explicitly (its history is dropped). After the first call, sequences
   * are no longer taken as finished when they are absent from a visit.
   */
  endSequence(seq: number): void {
    this.explicitEnds = true;
    this.hist.delete(seq);
    if (this.predictorOn) this.predictor.endSequence(seq);
  }

  /** Sequences end only through endSequence (the runner calls this when it drives the policy). */
  useExplicitEnds(): void {
    this.explicitEnds = true;
  }

  observeRouting(layer: number, tokens: readonly SeqRouting[]): void {
    if (this.predictorOn) this.predictor.observe(layer, tokens);
    // A sequence may bring several tokens to one visit (a prompt chunk, in position order).
    const bySeq = new Map<number, ArrayLike<number>[]>();
    for (const t of tokens) {
      if (t.experts.length === 0) continue;
      let list = bySeq.get(t.seq);
      if (!list) bySeq.set(t.seq, (list = []));
      list.push(t.experts);
    }
    // The visit's new tokens share half the nearest-neighbour window.
    const track = Math.max(1, Math.min(KNN_WINDOW >> 2, Math.floor((KNN_WINDOW >> 1) / Math.max(1, bySeq.size))));
    for (const [seq, list] of bySeq) this.learnRouting(seq, layer, list, track);
    const seqs = [...bySeq.keys()];
    if (layer === this.layers - 1 && !this.explicitEnds) {
      const live = new Set(seqs);
      for (const s of this.visitSeqs[layer]) {
        if (!live.has(s)) {
          this.hist.delete(s);
          if (this.predictorOn) this.predictor.endSequence(s);
        }
      }
    }
    this.visitSeqs[layer] = seqs;
    this.routedAt[layer] = this.visits[layer];
  }

  /** Learns from one sequence's tokens at a visit of `layer` (consecutive tokens, in order). */
  private learnRouting(seq: number, layer: number, tokens: readonly ArrayLike<number>[], track = 1): void {
    let h = this.hist.get(seq);
    if (!h) {
      const L = this.layers;
      h = { cur: new Array(L).fill(null), prev: new Array(L).fill(null), token: null, chunk: new Array(L).fill(null), before: new Array(L).fill(null), chunkToks: [] };
      this.hist.set(seq, h);
    }
    const n = tokens.length;
    const list = tokens.map((x) => Int32Array.from(x));
    this.trackTokens(h, layer, list, track);
    // The same tokens' routing at the layer below, when that visit had them all (layers
    // run in order; a skipped layer or a different chunk leaves the cross counts alone).
    const belowChunk = layer > 0 && h.chunk[layer - 1]?.length === n ? h.chunk[layer - 1] : null;
    const belowBefore = layer > 0 ? h.before[layer - 1] : null;
    h.before[layer] = h.cur[layer];
    for (let j = 0; j < n; j++) {
      const experts = list[j];
      // h.cur[layer] is still the previous token's routing at this layer and h.prev[layer]
      // the one before.
      const last = h.cur[layer];
      if (last) this.count(this.trans, this.transN, layer, last, experts);
      const last2 = h.prev[layer];
      if (last2) this.count(this.trans2, this.trans2N, layer, last2, experts);
      // The previous token at the layer below.
      const below = belowChunk ? (j > 0 ? belowChunk[j - 1] : belowBefore) : null;
      if (below) this.count(this.cross, this.crossN, layer, below, experts);
      h.prev[layer] = last;
      h.cur[layer] = experts;
    }
    h.chunk[layer] = list;
  }

  private count(counts: Float32Array, n: Float32Array, layer: number, from: Int32Array, to: ArrayLike<number>): void {
    const E = this.experts;
    for (const i of from) {
      n[layer * E + i]++;
      const row = (layer * E + i) * E;
      for (let k = 0; k < to.length; k++) counts[row + to[k]]++;
    }
  }

  /**
   * Nearest-neighbour bookkeeping: each token's routing in the window and, for the
   * sequence's last token, its similarity to the window. A visit's tokens start new
   * window records at their first routed layer and fill them in at the later layers; of a
   * long prompt chunk only the last `track` tokens enter the window.
   */
  private trackTokens(h: SeqHistory, layer: number, list: readonly Int32Array[], track: number): void {
    const W = KNN_WINDOW;
    const E = this.experts;
    const first = Math.max(0, list.length - track);
    const n = list.length - first;
    let toks = h.chunkToks;
    if (toks.length !== n || toks[0].routing[layer] !== null) {
      // The tokens are new (this is their first routed layer).
      toks = [];
      for (let j = 0; j < n; j++) {
        const slot = this.ringHead;
        const nt: TokenRec = { routing: new Array(this.layers).fill(null), next: null, sim: new Float32Array(W), slot };
        const prev = j > 0 ? toks[j - 1] : h.token;
        if (prev) {
          prev.sim = null;
          prev.next = nt;
        }
        // The slot's previous occupant is gone: drop it from the index and forget its
        // similarity to the live tokens.
        const old = this.ring[slot];
        if (old) {
          for (let l = 0; l < this.layers; l++) {
            const r = old.routing[l];
            if (r) for (let k = 0; k < r.length; k++) this.unindex(l * E + r[k], slot);
          }
        }
        this.ring[slot] = nt;
        this.ringHead = (slot + 1) % W;
        for (const other of this.hist.values()) if (other.token?.sim) other.token.sim[slot] = 0;
        toks.push(nt);
        h.token = nt;
      }
      h.chunkToks = toks;
    }
    const lists = this.memberSlots;
    const counts = this.memberCount;
    for (let j = 0; j < n; j++) {
      const tok = toks[j];
      const cur = list[first + j];
      tok.routing[layer] = cur;
      // A record whose slot was taken since (more new tokens in one step than the window
      // holds) is out of the window.
      if (this.ring[tok.slot] !== tok) continue;
      // Overlap at this layer with every window token routed there: the index row of each
      // of the token's experts marks the window tokens that chose it (the token itself is
      // not in the index yet). Only the sequence's last token keeps a similarity.
      const sim = tok.sim;
      if (sim) {
        for (let k = 0; k < cur.length; k++) {
          const i = layer * E + cur[k];
          const base = i * W;
          for (let j = base, end = base + counts[i]; j < end; j++) sim[lists[j]] += 1;
        }
      }
      for (let k = 0; k < cur.length; k++) this.index(layer * E + cur[k], tok.slot);
    }
  }

  /** Adds ring slot `slot` to the index of (layer, expert) `i`. */
  private index(i: number, slot: number): void {
    const flag = i * KNN_WINDOW + slot;
    if (this.members[flag]) return;
    this.members[flag] = 1;
    this.memberSlots[i * KNN_WINDOW + this.memberCount[i]++] = slot;
  }

  /** Removes ring slot `slot` from the index of (layer, expert) `i`. */
  private unindex(i: number, slot: number): void {
    const flag = i * KNN_WINDOW + slot;
    if (!this.members[flag]) return;
    this.members[flag] = 0;
    const base = i * KNN_WINDOW;
    const last = base + --this.memberCount[i];
    for (let j = base; j <= last; j++) {
      if (this.memberSlots[j] === slot) {
        this.memberSlots[j] = this.memberSlots[last];
        return;
      }
    }
  }

  /**
   * Adds to v1 / vAhead the votes of the successors (next token; within KNN_AHEAD tokens)
   * of the KNN_K window tokens most similar to `tok` at layers 0..layer, at `layer`.
   * Returns the best similarity as a fraction of the token's routed experts.
   */
  private knnVote(tok: TokenRec, layer: number, v1: Float64Array, vAhead: Float64Array): number {
    const sim = tok.sim;
    if (!sim) return 0;
    // The KNN_K most similar, best first (ties: the lower slot first).
    const ring = this.ring;
    const best = this.knnBest;
    let nb = 0;
    // The similarity first: most window tokens fall short of the K best so far (while
    // fewer than K are found, only the dissimilar ones).
    let floor = 0;
    for (let r = 0; r < KNN_WINDOW; r++) {
      const v = sim[r];
      if (v <= floor) continue;
      const o = ring[r];
      if (!o || o === tok || !o.next || o.next === tok || !o.next.routing[layer]) continue;
      if (nb === KNN_K) nb--;
      let k = nb;
      while (k > 0 && sim[best[k - 1]] < v) {
        best[k] = best[k - 1];
        k--;
      }
      best[k] = r;
      nb++;
      if (nb === KNN_K) floor = sim[best[KNN_K - 1]];
    }
    if (nb === 0) return 0;
    const w = 1 / KNN_K;
    const seen = this.flags;
    for (let b = 0; b < nb; b++) {
      const r = best[b];
      seen.fill(0);
      let o: TokenRec | null = ring[r]!.next;
      for (let d = 1; d <= KNN_AHEAD && o && o !== tok && o.routing[layer]; d++, o = o.next) {
        for (const e of o.routing[layer]!) {
          if (d === 1) v1[e] += w;
          if (!seen[e]) {
            seen[e] = 1;
            vAhead[e] += w;
          }
        }
      }
    }
    let total = 0;
    for (let l = 0; l <= layer; l++) total += tok.routing[l]?.length ?? 0;
    return total > 0 ? sim[best[0]] / total : 0;
  }

  // ---- VisitObserver prefetch -----------------------------------------------------

  prefetchHints(layer: number, tokens: readonly StepToken[]): PrefetchHint[] {
    if (!this.prefetchOn) return [];
    if (!this.predictorOn) throw new Error('forecast policy: prefetchHints() needs the routing predictor (made with routingPredictor: false)');
    return nextLayerPrefetchHints(this.predictor, layer, tokens, this.prefetchMin, this.scratch);
  }

  /**
   * Prefetch hints for the layer's next visit from the reuse forecast itself: experts not
   * resident whose forecast P(needed at the next visit) is at least `min` (default
   * prefetchMin), best first. Call after the layer's visit (request()); prefetch() then
   * takes a slot only from a resident forecast less likely to be needed.
   */
  nextVisitHints(layer: number, min = this.prefetchMin): PrefetchHint[] {
    if (!this.prefetchOn) return [];
    const E = this.experts;
    const at = this.visits[layer] - 1;
    if (at < 0) return [];
    const hints: PrefetchHint[] = [];
    // An expert whose logit is bounded below the threshold's is skipped without its
    // features (most are: they are the cost of this loop). The bound is exact, so the
    // hints are those of the full forecast; the margin covers the sums' rounding.
    const zMin = min > 0 && min < 1 ? Math.log(min / (1 - min)) : -Infinity;
    const prune = zMin > -29;
    for (let e = 0; e < E; e++) {
      const i = layer * E + e;
      if (this.slotOfE[i] >= 0) continue;
      if (prune && this.scoreAt[i] !== at && this.p1At[i] !== at && this.nextVisitBound(layer, e, at) < zMin - 1e-9) continue;
      const p = this.nextVisitP(layer, e, at);
      if (p >= min) hints.push({ expert: e, priority: p });
    }
    return hints.sort((a, b) => b.priority - a.priority || a.expert - b.expert);
  }

  /**
   * An upper bound of the logit of P(needed at the next visit) (the first horizon's model)
   * of (layer, expert) after the visit at `at`: the other features exactly, and the decayed
   * use counts each bounded by the lifetime count (decay only lowers them; log1p >= 0), so
   * that the bound needs no decay or featCache entry.
   */
  private nextVisitBound(layer: number, expert: number, at: number): number {
    const i = layer * this.experts + expert;
    const w = this.w; // horizon 0: the first N_FEAT weights
    const H = HALF_LIVES.length;
    const life = Math.log1p(this.counts[i * H + H - 1]);
    let z = 0;
    for (let j = 0; j < H; j++) if (w[F_COUNT + j] > 0) z += w[F_COUNT + j] * life;
    const x = this.x;
    this.otherFeatures(layer, expert, at, x, 0);
    for (let f = F_AGE; f < N_FEAT; f++) z += w[f] * x[f];
    return z;
  }

  /**
   * Prefetch for the layer's next visit with the eviction rule itself as admission: a
   * hint takes a slot only from a resident whose eviction score (the forecast summed over
   * the horizons) is below the hint expert's own, so a prefetch never displaces what the
   * policy values more than the prediction; the last visit's experts are never displaced.
   */
  prefetchNextVisit(layer: number, hints: readonly PrefetchHint[], max: number) {
    this.inPrefetch = true;
    this.byScore = true;
    try {
      return super.prefetch(layer, hints, max);
    } finally {
      this.inPrefetch = false;
      this.byScore = false;
    }
  }

  override prefetch(layer: number, hints: readonly PrefetchHint[], max: number) {
    this.inPrefetch = true;
    try {
      return super.prefetch(layer, hints, max);
    } finally {
      this.inPrefetch = false;
    }
  }

  /** In prefetch, keepScore is the forecast P(needed at the next visit): the hint must beat it. */
  protected override prefetchFloor(layer: number, hint: PrefetchHint, now: number): number {
    if (this.byScore) {
      this.ensureScore(layer, hint.expert, now - 1);
      return this.score[layer * this.experts + hint.expert];
    }
    return hint.priority;
  }

  // ---- visits ----------------------------------------------------------------------

  override request(layer: number, experts: ArrayLike<number>) {
    this.idle();
    const d = super.request(layer, experts);
    this.record(layer, this.visits[layer] - 1);
    return d;
  }

  /**
   * Takes the features of the visits recorded since the last call (see record()): at
   * idle(), while the engine waits for a read, or at the next request() at the latest.
   */
  private takeFeatures(): void {
    const q = this.featuresDue;
    const cache = this.featCache;
    for (let j = 0; j < q.length; j++) {
      const p = q[j];
      const ex = p.experts;
      for (let k = 0; k < ex.length; k++) {
        const off = this.featuresAt(p.layer, ex[k], p.at);
        p.feats.set(cache.subarray(off, off + N_FEAT), k * N_FEAT);
      }
    }
    q.length = 0;
  }

  protected override beforeVisit(layer: number, experts: ArrayLike<number>, now: number): void {
    const E = this.experts;
    if (this.routedAt[layer] !== now) {
      // No per-sequence routing was given for this visit: one pseudo-sequence.
      this.learnRouting(-1, layer, [experts]);
      this.visitSeqs[layer] = [-1];
    }
    this.routedAt[layer] = -1;
    const need = this.flags;
    need.fill(0);
    for (let k = 0; k < experts.length; k++) need[experts[k]] = 1;
    this.learnFrom(layer, now, need);
    const H = HALF_LIVES.length;
    for (let k = 0; k < experts.length; k++) {
      const i = layer * E + experts[k];
      this.decayTo(i, now);
      for (let j = 0; j < H; j++) this.counts[i * H + j] += 1;
      this.lastUse[i] = now;
    }
    this.forecastNext(layer);
  }

  /** Forecasts for the layer's next visit: for each e, P(any of the visit's sequences needs e). */
  private forecastNext(layer: number): void {
    const E = this.experts;
    const at = (a: Float64Array) => a.subarray(layer * E, (layer + 1) * E);
    const ps = at(this.pSame);
    const p2 = at(this.pSame2);
    const pc = at(this.pCross);
    const v1 = at(this.vote1);
    const va = at(this.voteAhead);
    for (const a of [ps, p2, pc, v1, va]) a.fill(0);
    let bestSim = 0;
    const tmp = this.scratch;
    const anyOf = (acc: Float64Array) => {
      for (let e = 0; e < E; e++) acc[e] = 1 - (1 - acc[e]) * (1 - tmp[e]);
    };
    const seqs = this.visitSeqs[layer];
    for (const s of seqs) {
      const h = this.hist.get(s);
      if (!h) continue;
      if (h.token) bestSim = Math.max(bestSim, this.knnVote(h.token, layer, v1, va));
      const cur = h.cur[layer];
      if (cur && cur.length) {
        this.mix(this.trans, this.transN, layer, cur, tmp);
        anyOf(ps);
      }
      const prev = h.prev[layer];
      if (prev && prev.length) {
        this.mix(this.trans2, this.trans2N, layer, prev, tmp);
        anyOf(p2);
      }
      const below = layer > 0 ? h.cur[layer - 1] : null;
      if (below && below.length) {
        this.mix(this.cross, this.crossN, layer, below, tmp);
        anyOf(pc);
      }
    }
    const n = Math.max(1, seqs.length);
    for (let e = 0; e < E; e++) {
      v1[e] = Math.min(1, v1[e] / n);
      va[e] = Math.min(1, va[e] / n);
    }
    this.knnSim[layer] = bestSim;
  }

  /**
   * The routing forecasts behind the latest visit of `layer` for its next visit, per
   * expert (copies): from the current tokens' experts at the layer, from the tokens two
   * back, from the current tokens at the layer below, and the nearest neighbours' votes
   * (next token; within KNN_AHEAD tokens).
   */
  routingForecast(layer: number): { nextToken: Float64Array; twoBack: Float64Array; crossLayer: Float64Array; neighbours: Float64Array; neighboursAhead: Float64Array } {
    const E = this.experts;
    const at = (a: Float64Array) => a.slice(layer * E, (layer + 1) * E);
    return { nextToken: at(this.pSame), twoBack: at(this.pSame2), crossLayer: at(this.pCross), neighbours: at(this.vote1), neighboursAhead: at(this.voteAhead) };
  }

  /** out[e] = mean over i in `given` of count(i -> e) / (n(i) + 1). */
  private mix(counts: Float32Array, n: Float32Array, layer: number, given: Int32Array, out: Float64Array): void {
    const E = this.experts;
    out.fill(0);
    for (const i of given) {
      const ni = n[layer * E + i];
      if (ni === 0) continue;
      const row = (layer * E + i) * E;
      const d = ni + 1;
      for (let e = 0; e < E; e++) out[e] += counts[row + e] / d;
    }
    for (let e = 0; e < E; e++) out[e] /= given.length;
  }

  private decayTo(i: number, now: number): void {
    const H = HALF_LIVES.length;
    const dt = now - this.countAt[i];
    if (dt > 0) {
      for (let j = 0; j < H; j++) this.counts[i * H + j] *= decayFactor(dt, j);
      this.countAt[i] = now;
    }
  }

  /** Features of (layer, expert) after the layer's visit at `now`. */
  private features(layer: number, expert: number, now: number, x: Float64Array | Float32Array, off = 0): void {
    const i = layer * this.experts + expert;
    const H = HALF_LIVES.length;
    // The counts decayed to `now`, read without writing them back: they change only when
    // the expert is used (beforeVisit), so their value does not depend on when, or
    // whether, features were taken in between.
    const dt = now - this.countAt[i];
    for (let j = 0; j < H; j++) x[off + F_COUNT + j] = Math.log1p(this.counts[i * H + j] * decayFactor(dt, j));
    this.otherFeatures(layer, expert, now, x, off);
  }

  /** The features after the use counts (F_AGE onwards) of (layer, expert) after the visit at `now`. */
  private otherFeatures(layer: number, expert: number, now: number, x: Float64Array | Float32Array, off: number): void {
    const i = layer * this.experts + expert;
    for (let j = 0; j < N_AGE; j++) x[off + F_AGE + j] = 0;
    const age = now - this.lastUse[i];
    let b = 0;
    while (b < AGE_EDGES.length && age > AGE_EDGES[b]) b++;
    x[off + F_AGE + b] = 1;
    const ps = this.pSame[i];
    const pc = this.pCross[i];
    const p2 = this.pSame2[i];
    x[off + F_TRANS] = ps;
    x[off + F_TRANS + 1] = Math.log(ps + P_EPS) / 4;
    x[off + F_TRANS + 2] = pc;
    x[off + F_TRANS + 3] = Math.log(pc + P_EPS) / 4;
    x[off + F_TRANS + 4] = p2;
    x[off + F_TRANS + 5] = Math.log(p2 + P_EPS) / 4;
    x[off + F_TRANS + 6] = ps * pc * 4; // both transitions agree
    x[off + F_TRANS + 7] = age <= 2 ? ps * 2 : 0; // recent and predicted
    x[off + F_KNN] = this.vote1[i];
    x[off + F_KNN + 1] = this.voteAhead[i];
    x[off + F_KNN + 2] = this.vote1[i] * this.knnSim[layer];
    x[off + F_BIAS] = 1;
  }

  private predict(h: number, x: Float64Array | Float32Array, off = 0): number {
    let z = 0;
    const w = h * N_FEAT;
    for (let f = 0; f < N_FEAT; f++) z += this.w[w + f] * x[off + f];
    return 1 / (1 + Math.exp(-Math.max(-30, Math.min(30, z))));
  }

  /**
   * Labels the layer's pending examples with the visit at `now` (experts `need`) and
   * learns from those whose longest horizon has passed.
   */
  private learnFrom(layer: number, now: number, need: Uint8Array): void {
    const q = this.pending[layer];
    for (const p of q) {
      for (let k = 0; k < p.experts.length; k++) if (p.firstUse[k] < 0 && need[p.experts[k]]) p.firstUse[k] = now - p.at;
    }
    const hMax = HORIZONS[HORIZONS.length - 1];
    // Fully labelled examples are learned from at idle() or at the next request(),
    // whichever comes first: the training, most of the policy's cost, runs while the
    // engine waits for a read when there is such a wait, and the model the decisions
    // use lags by one visit either way.
    while (q.length && now - q[0].at >= hMax) this.toTrain.push(q.shift()!);
  }

  /** Learns from the examples labelled since the last call (see learnFrom). */
  idle(): void {
    this.takeFeatures();
    const q = this.toTrain;
    for (let i = 0; i < q.length; i++) this.train(q[i]);
    q.length = 0;
  }

  private train(p: Pending): void {
    // predict() and the Adagrad step written out over locals (the policy's hottest loop);
    // the arithmetic, and its order, are those of predict() and the plain update.
    const w = this.w;
    const g2 = this.g2;
    const lr = this.lr;
    const feats = p.feats;
    const H = HORIZONS.length;
    // A zero feature adds nothing to z and gets no update: each example's loops run over
    // its nonzero features only (the age one-hot and most votes are zero).
    const nz = this.nz;
    const xv = this.x;
    for (let k = 0; k < p.experts.length; k++) {
      const off = k * N_FEAT;
      let n = 0;
      for (let f = 0; f < N_FEAT; f++) {
        const v = feats[off + f];
        if (v !== 0) {
          nz[n] = f;
          xv[n++] = v;
        }
      }
      const d = p.firstUse[k];
      for (let hi = 0; hi < H; hi++) {
        const y = d >= 1 && d <= HORIZONS[hi] ? 1 : 0;
        const wo = hi * N_FEAT;
        let z = 0;
        for (let j = 0; j < n; j++) z += w[wo + nz[j]] * xv[j];
        const err = 1 / (1 + Math.exp(-Math.max(-30, Math.min(30, z)))) - y;
        for (let j = 0; j < n; j++) {
          const g = err * xv[j];
          if (g === 0) continue;
          const f = wo + nz[j];
          const s = (g2[f] += g * g);
          w[f] -= (lr * g) / Math.sqrt(s);
        }
      }
    }
  }

  /**
   * After a visit: the layer's residents and recent experts become examples to label
   * later. Which experts is decided now (prefetches may change the residents before the
   * layer's next visit); their features, most of the cost, are taken later (takeFeatures):
   * nothing they read changes before the layer's next visit, whose request() takes them
   * first, so the examples are the same either way.
   */
  private record(layer: number, now: number): void {
    const E = this.experts;
    const ex: number[] = [];
    for (let e = 0; e < E; e++) if (now - this.lastUse[layer * E + e] <= TRAIN_AGE || this.slotOf(layer, e) >= 0) ex.push(e);
    if (ex.length === 0) return;
    const p: Pending = { at: now, layer, experts: Int32Array.from(ex), feats: new Float32Array(ex.length * N_FEAT), firstUse: new Int32Array(ex.length).fill(-1) };
    this.pending[layer].push(p);
    this.featuresDue.push(p);
  }

  protected touch(): void {}

  protected keepScore(layer: number, expert: number, now: number): number {
    const i = layer * this.experts + expert;
    if (this.inPrefetch) {
      // For the coming visit (time now): never displace the last visit's experts.
      if (this.lastUse[i] === now - 1) return Infinity;
      this.ensureScore(layer, expert, now - 1);
      return this.byScore ? this.score[i] : this.p1[i];
    }
    this.ensureScore(layer, expert, now);
    return this.score[i];
  }

  /**
   * Offset in featCache of (layer, expert)'s features after the layer's visit at `at`,
   * computed on first use: the eviction scores, the examples (takeFeatures()) and the
   * next-visit forecasts of one visit share them (the layer's state does not change until
   * its next visit, and features() changes no state).
   */
  private featuresAt(layer: number, expert: number, at: number): number {
    const i = layer * this.experts + expert;
    if (this.featAt[i] !== at) {
      this.features(layer, expert, at, this.featCache, i * N_FEAT);
      this.featAt[i] = at;
    }
    return i * N_FEAT;
  }

  /** P(needed at the next visit) after the visit at `at`: the score's first horizon, computed alone when the score is not cached. */
  private nextVisitP(layer: number, expert: number, at: number): number {
    const i = layer * this.experts + expert;
    if (this.scoreAt[i] !== at && this.p1At[i] !== at) {
      this.p1[i] = this.predict(0, this.featCache, this.featuresAt(layer, expert, at));
      this.p1At[i] = at;
    }
    return this.p1[i];
  }

  private ensureScore(layer: number, expert: number, at: number): void {
    const i = layer * this.experts + expert;
    if (this.scoreAt[i] === at) return;
    const off = this.featuresAt(layer, expert, at);
    let s = 0;
    for (let h = 0; h < HORIZONS.length; h++) {
      const p = this.predict(h, this.featCache, off);
      if (h === 0) this.p1[i] = p;
      s += p;
    }
    // Ties (an untrained model) go to the more recently used expert.
    this.score[i] = s + 1e-9 * Math.max(-1, 1 - (at - this.lastUse[i]) / (at + 2));
    this.scoreAt[i] = at;
  }
}
