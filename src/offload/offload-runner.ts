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
// Capacity. The budget is split across layers equally or by one weight per layer
// (capacity.ts: offloadCapacity, offloadSplit): layer l has slotsByLayer[l] slots, in
// the store (its own arena) and in the policy alike. When a visit needs more distinct
// experts than its layer has slots (a long prompt chunk, many sequences at once), the
// policy's decision streams them through the slots: a load that evicts an expert of
// the same visit comes after that expert has run. The runner follows the decision in
// order and, before such an eviction, runs the visit's experts held so far with
// expertsPart(); experts() runs the rest and completes the layer. The engine combines
// the parts exactly as one call, so streamed visits are bitwise equal too, in every
// weight format.
//
// Prefetch probabilities. For a target layer m = l + d and each token, the expert ids in
// the token's pre-gating top-k at m are used with probability precision(d) (measured
// online: hits / predicted at that distance); each sequence's experts at m for its
// previous token are reused with probability reuse(m) (measured online); and the token's
// experts at l vote for its experts at m through same-token co-occurrence counts learned
// online ("i at layer m - d, j at layer m": real routers correlate across layers, and
// under routing replay this is the one layer-ahead signal left). A batch needs
// e with P = 1 - Π (1 - p_token(e)). Tokens are not independent, so P is then calibrated
// online against what the visits needed (per distance, in probability bins); hints at
// or above `prefetchMinProbability` are offered best first. A queued prefetch that a
// closer prediction (a later layer's pre-gating) puts below half that threshold is
// withdrawn before its read starts, like one its visit shows unneeded. Each prefetch is
// pinned until its visit, so that later prefetches for the same visit cannot take its slot.
//
// Pre-gating pays only where it predicts. Once a distance has made
// PREGATING_EVIDENCE_TOKENS tokens' predictions, its pre-gating runs only while its recent
// precision is at least pregatingMinLift times chance (top-k / experts). Under routing
// replay the model's routers do not predict the trace: pre-gating stops there, and so does
// the cost of reading the next layers' routers each layer. One step in
// PREGATING_PROBE_STEPS runs it at every distance, so that it resumes when it predicts
// again. Co-occurrence and each sequence's previous experts prefetch either way.
//
// Read priorities. The store starts queued reads by priority: demand loads (0) first,
// then prefetches for this step's later layers (1), then prefetches for the next step (2);
// prefetches occupy at most all I/O threads but one, so a demand read starts at once, and
// a prefetch being read pauses between its pieces while a demand read is in flight (one
// read saturates the disk: sharing it would slow the read that compute waits for); an
// expert the visit waits for is never paused. At most `maxQueuedPrefetches` prefetches wait.
//
// Next-step prefetch. After each visit of layer l, a policy that forecasts its own next
// visit (forecast: nextVisitHints) names the experts not resident that it expects at l
// for the next token; they are prefetched (priority 2, a whole step ahead) when the
// policy values them above the resident they would displace (its eviction score), never
// displacing the visit's own experts.
//
// Resident first. When a visit has to wait for reads, its resident experts run first
// (expertsPart) while the rest load, then experts() runs the others: the engine combines
// the parts exactly as one call, so the logits stay bitwise equal.

import { randomBytes } from 'node:crypto';
import { accessSync, constants, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { SafetensorsCheckpoint } from '../model/safetensors.js';
import type { ModelSpec } from '../model/spec.js';
import { loadNative, type NativeEngine } from '../engine/native.js';
import {
  availableBytes,
  kvCacheBytes,
  weightBytes,
  engineOptions,
  loadTensors,
  LogitsBuffer,
  ModelTooLargeError,
  packBatch,
  stepTokens,
  WEIGHT_FORMATS,
  type NativeRunnerOptions,
} from '../engine/native-runner.js';
import type { ExpertCacheState, OffloadLayerStats, OffloadStats } from '../engine/protocol.js';
import { logitRows, type KvGeometry, type ModelRunner, type RoutingEvent, type RoutingHint, type StepOutput, type StepSequence } from '../engine/runner.js';
import type { ExpertCachePolicy, PrefetchHint, PrefetchIssue } from './cache-policy.js';
import { CapacityError, expertSlotBytes, slotsByLayer } from './capacity.js';
import { createOnlinePolicy, DEFAULT_ONLINE_POLICY } from './policies.js';
import { NeedCalibration, PredictionCounters, topKIds } from './prediction.js';
import type { RoutingReplay, StepTokens } from './replay.js';
import { RecentRouting } from '../scheduler/recent-routing.js';
import { DEFAULT_PLAN_STEPS, upcomingWeights } from './upcoming.js';
import { measureReadCost, PREFETCH_MIN_PROBABILITY_FLOOR, prefetchThreshold, type ReadCost } from './read-cost.js';

/** The engine calls the runner makes (a NativeEngine built with `offload`, or a test double). */
export type OffloadEngine = Pick<
  NativeEngine,
  | 'beginStep'
  | 'attention'
  | 'experts'
  | 'expertsPart'
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
export const DEFAULT_MAX_QUEUED_PREFETCHES = 16;

export interface OffloadSettings {
  /** Expert cache policy by name (default: the project's default, forecast). */
  policy?: string;
  /** Layers ahead to prefetch; 0 turns prefetching off (default 2). */
  lookahead?: number;
  /**
   * Smallest estimated probability of use for a prefetch (default 0.3). 'auto' (the
   * server's default): measured when the engine starts (read-cost.ts), the fraction of
   * its speed the compute loses while the slow tier reads, at least 0.3; a prefetch pays
   * only when it is more likely to be used than that. fromCheckpoint measures it; a runner
   * built directly over an engine takes 'auto' as 0.3.
   */
  prefetchMinProbability?: number | 'auto';
  /** Prefetch reads queued (not started) at most, over all layers (default 16; demand reads start first either way). */
  maxQueuedPrefetches?: number;
  /**
   * After each layer's visit, prefetch for the layer's next visit (the next step) what
   * the cache policy itself forecasts (policies with nextVisitHints, e.g. forecast), at
   * a lower read priority than this step's prefetches (default true when lookahead > 0).
   */
  nextStepPrefetch?: boolean;
  /** Smallest forecast probability for a next-step prefetch (default: prefetchMinProbability). */
  nextStepMinProbability?: number;
  /** Next-step prefetches displace only residents the policy values less (its eviction score; default true), not only those less likely at the next visit. */
  nextStepByScore?: boolean;
  /** When a visit waits for reads, run its resident experts first, while the others load (default true; bitwise the same result). */
  residentFirst?: boolean;
  /** Prefetch also from same-token co-occurrence across layers, learned online (default true). */
  coOccurrence?: boolean;
  /**
   * Pre-gating at a distance runs only while its recent precision is at least this many
   * times chance (top-k / experts), once it has made PREGATING_EVIDENCE_TOKENS tokens'
   * predictions; every PREGATING_PROBE_STEPS-th step runs it anyway, to keep measuring
   * (default 1.5; 0: always run it). The other predictions (co-occurrence, each sequence's
   * previous experts) prefetch either way.
   */
  pregatingMinLift?: number;
  /**
   * Schedule-aware eviction (upcoming.ts): keep what the sequences of the next planSteps
   * steps (planUpcoming) are expected to need, by their recent routing (default
   * DEFAULT_PLAN_STEPS; 0: off).
   */
  planSteps?: number;
  /** Routing replay (the trace's experts instead of the router's). */
  replay?: RoutingReplay;
  /** Called with every layer's routing of the steps that completed. */
  onRouting?: (e: RoutingEvent) => void;
  /** Logits into one reused buffer, valid until the next step (NativeRunnerOptions.reuseLogits). */
  reuseLogits?: boolean;
}

export interface OffloadRunnerOptions extends NativeRunnerOptions, OffloadSettings {
  /** Fast-tier budget: fraction of all experts ("0.25", "25%") or bytes ("12GiB"). */
  capacity: string;
  /** How the budget is split across layers: "equal" (default) or one weight per layer ("2,2,1,1"). */
  split?: string;
  /** How errors about the split name it (default "setting offloadSplit"). */
  splitName?: string;
  /** I/O threads of the expert store (default 2). */
  ioThreads?: number;
  /** Directory of the expert file (default: the OS temporary directory). */
  dir?: string;
  /** Direct I/O (default true; the addon falls back when the file system refuses it). */
  direct?: boolean;
}

/** Pre-gating's top-k per token for a later layer, and the batch's need probability per expert. */
interface Predicted {
  distance: number;
  ids: Int32Array;
  /** Top-k of each token's co-occurrence forecast (empty before any counts). */
  coIds: Int32Array;
  pAny: Float64Array;
}

/** Pseudo-observations shrinking a co-occurrence forecast while its evidence is thin. */
const CO_PRIOR = 2;
/**
 * Tokens of a step whose co-occurrence forecasts are computed (T × k × experts each):
 * beyond this (prompt chunks), an even sample of them; a long chunk needs most of a
 * layer's experts anyway.
 */
const CO_MAX_TOKENS = 32;
/** Distances the co-occurrence forecast covers (its counts take layers × this × experts² floats). */
const CO_MAX_DISTANCE = 4;

/** Policies that keep per-sequence history (forecast) and are told when a sequence ends. */
interface SequenceAware {
  useExplicitEnds?(): void;
  endSequence?(seq: number): void;
}

/** Read priorities of the store: demand loads first, then prefetches for this step's later layers, then for the next step. */
const PRIORITY_DEMAND = 0;
const PRIORITY_PREFETCH = 1;
const PRIORITY_NEXT_STEP = 2;

/** Tokens' worth of recent pre-gating predictions at a distance before it may be skipped as useless. */
const PREGATING_EVIDENCE_TOKENS = 32;
/** While skipped, pre-gating still runs at every distance on one step in this many. */
const PREGATING_PROBE_STEPS = 16;
const NO_IDS = new Int32Array(0);

/** Policies that forecast their own next visit of a layer (forecast). */
interface NextVisitForecaster {
  nextVisitHints?(layer: number, min?: number): PrefetchHint[];
  prefetchNextVisit?(layer: number, hints: readonly PrefetchHint[], max: number): PrefetchIssue[];
}

const STATE_QUEUED = 1;
const STATE_READING = 2;
const STATE_RESIDENT = 3;

function emptyLayerStats(): OffloadLayerStats {
  return { visits: 0, stalledVisits: 0, streamedVisits: 0, hits: 0, misses: 0, prefetchIssued: 0, prefetchUsed: 0, prefetchWasted: 0, prefetchCancelled: 0, stallSeconds: 0 };
}

export class OffloadRunner implements ModelRunner {
  /** Expert slots of each layer. */
  readonly slotsByLayer: readonly number[];
  /** Expert slots over all layers. */
  readonly totalSlots: number;
  /** Per layer: index of its slot 0 in slotExpert (layers + 1 entries). */
  private readonly slotBase: Int32Array;
  /** The cache policy (replaced by a fresh one when a failed step leaves the cache unknown). */
  policy: ExpertCachePolicy;
  private readonly policyName: string;
  readonly lookahead: number;
  /** Experts per token in the routing (the model's top-k, or the replayed trace's k). */
  readonly k: number;
  private readonly L: number;
  private readonly E: number;
  private readonly replay?: RoutingReplay;
  private readonly logitsBuffer?: LogitsBuffer;
  /** Milliseconds in the runner's own decisions, by part (OffloadStats.policySeconds). */
  private readonly policyTime = { visit: 0, prefetch: 0, learn: 0, idle: 0 };
  private readonly onRouting?: (e: RoutingEvent) => void;
  private readonly minProb: number;
  /** The read-cost probe behind an 'auto' prefetch threshold (fromCheckpoint), or null. */
  readCost: ReadCost | null = null;
  /** Smallest estimated probability of use for a prefetch, as set or measured. */
  get prefetchMinProbability(): number {
    return this.minProb;
  }
  private readonly maxQueued: number;
  private readonly nextStep: boolean;
  private readonly residentFirst: boolean;
  private readonly nextStepByScore: boolean;
  private readonly nextStepMin: number;
  /** Per layer: outstanding prefetches from the policy's own next-visit forecast (pre-gating does not withdraw them). */
  private readonly forecastIssued: Set<number>[];
  private readonly layerStats: OffloadLayerStats[];
  private readonly prediction: PredictionCounters;
  /** Quality of the co-occurrence forecasts (top-k per token), per distance. */
  private readonly coPrediction: PredictionCounters;
  /** Same-token co-occurrence per distance d: ((m * D + d - 1) * E + i) * E + j counts i at m - d with j at m; coN the tokens with i at m - d. */
  private readonly coCounts: Float32Array;
  private readonly coN: Float32Array;
  private readonly coScratch: Float64Array;
  private readonly coOccurrence: boolean;
  private readonly pregatingMinLift: number;
  /** Steps run (pre-gating probes every PREGATING_PROBE_STEPS-th). */
  private steps = 0;
  /** Layer visits whose pre-gating was skipped at one distance or more. */
  private pregatingSkipped = 0;
  /** Distances with co-occurrence counts: min(lookahead, CO_MAX_DISTANCE). */
  private readonly coDistance: number;
  /** (layer, expert): prefetched and not used yet (mirrors the policy's own flag). */
  private readonly unusedPrefetch: Uint8Array;
  /** Per layer: prefetches issued for its next visit. */
  private readonly outstanding: Set<number>[];
  /** Per layer: outstanding prefetches pinned until that visit (so later prefetches do not evict them). */
  private readonly prefetchPins: Set<number>[];
  /** Per layer: experts reused by a sequence's next token, of the previous token's experts. */
  private readonly reuseHits: Float64Array;
  private readonly reusePrev: Float64Array;
  /** Calibration of need probabilities against what visits needed. */
  private readonly calibration: NeedCalibration;
  /** Per live sequence, per layer: the experts of its last token. */
  private readonly lastRouting = new Map<number, (Int32Array | null)[]>();
  /** Per live sequence: its recent routing, for the batch policy's hints. */
  private readonly recent: RecentRouting;
  readonly planSteps: number;
  /** planUpcoming()'s weights (the policy reads them until the next call). */
  private readonly upcoming: Float64Array;
  private upcomingOn = false;
  private readonly pinned: Set<number>[];
  /** The store's slots as the runner filled them: (layer, slot) → expert, (layer, expert) → slot. */
  private readonly slotExpert: Int32Array;
  private readonly expertSlot: Int32Array;
  private closed = false;
  /** Distinct experts per layer of the last completed step (mean over layers). */
  private lastDistinct: number | undefined;
  /** residentExperts()'s arrays, reused. */
  private residentView: Uint8Array[] | null = null;
  /** Times a failed step made the runner empty the cache. */
  private cacheResets = 0;

  constructor(
    readonly spec: ModelSpec,
    readonly kv: KvGeometry,
    readonly engine: OffloadEngine,
    /** Slots per layer: one number for every layer, or one per layer. */
    slots: number | readonly number[],
    o: OffloadSettings = {},
  ) {
    this.L = spec.numLayers;
    this.E = spec.numExperts;
    this.replay = o.replay;
    this.logitsBuffer = o.reuseLogits ? new LogitsBuffer() : undefined;
    this.onRouting = o.onRouting;
    this.k = o.replay ? o.replay.k : spec.topK;
    const perLayer = typeof slots === 'number' ? new Array<number>(this.L).fill(slots) : Array.from(slots);
    if (perLayer.length !== this.L) throw new Error(`expert slots: ${perLayer.length} layer counts for a model of ${this.L} layers`);
    perLayer.forEach((n, l) => {
      if (!Number.isInteger(n) || n < 1 || n > this.E) throw new Error(`expert slots per layer must be an integer in [1, ${this.E}], got ${n}${typeof slots === 'number' ? '' : ` for layer ${l}`}`);
    });
    const lookahead = o.lookahead ?? DEFAULT_LOOKAHEAD;
    if (!Number.isInteger(lookahead) || lookahead < 0) throw new Error(`offload lookahead must be an integer >= 0, got ${lookahead}`);
    this.slotsByLayer = Object.freeze(perLayer);
    this.slotBase = new Int32Array(this.L + 1);
    for (let l = 0; l < this.L; l++) this.slotBase[l + 1] = this.slotBase[l] + perLayer[l];
    this.totalSlots = this.slotBase[this.L];
    this.lookahead = Math.min(lookahead, this.L - 1);
    const minProb = o.prefetchMinProbability === 'auto' || o.prefetchMinProbability === undefined ? PREFETCH_MIN_PROBABILITY_FLOOR : o.prefetchMinProbability;
    if (!(minProb >= 0 && minProb <= 1)) throw new Error(`prefetch minimum probability must be in [0, 1] or 'auto', got ${o.prefetchMinProbability}`);
    this.minProb = minProb;
    this.maxQueued = Math.max(1, o.maxQueuedPrefetches ?? DEFAULT_MAX_QUEUED_PREFETCHES);
    this.nextStep = this.lookahead > 0 && (o.nextStepPrefetch ?? true);
    this.nextStepMin = o.nextStepMinProbability ?? this.minProb;
    this.residentFirst = o.residentFirst ?? true;
    this.nextStepByScore = o.nextStepByScore ?? true;
    this.forecastIssued = Array.from({ length: this.L }, () => new Set<number>());
    this.policyName = o.policy ?? DEFAULT_ONLINE_POLICY;
    this.policy = this.newPolicy();
    this.layerStats = Array.from({ length: this.L }, emptyLayerStats);
    this.prediction = new PredictionCounters(Math.max(1, this.lookahead));
    this.coPrediction = new PredictionCounters(Math.max(1, this.lookahead));
    this.coDistance = Math.min(this.lookahead, CO_MAX_DISTANCE);
    const D = Math.max(1, this.coDistance);
    this.coOccurrence = this.lookahead > 0 && (o.coOccurrence ?? true);
    this.pregatingMinLift = o.pregatingMinLift ?? 1.5;
    if (!(this.pregatingMinLift >= 0)) throw new Error(`pre-gating minimum lift must be a number >= 0, got ${o.pregatingMinLift}`);
    this.coCounts = new Float32Array(this.coOccurrence ? this.L * D * this.E * this.E : 0);
    this.coN = new Float32Array(this.coOccurrence ? this.L * D * this.E : 0);
    this.coScratch = new Float64Array(this.E);
    this.unusedPrefetch = new Uint8Array(this.L * this.E);
    this.outstanding = Array.from({ length: this.L }, () => new Set<number>());
    this.prefetchPins = Array.from({ length: this.L }, () => new Set<number>());
    this.recent = new RecentRouting(this.L);
    this.planSteps = o.planSteps ?? DEFAULT_PLAN_STEPS;
    if (!Number.isInteger(this.planSteps) || this.planSteps < 0) throw new Error(`offload plan steps must be an integer >= 0, got ${o.planSteps}`);
    this.upcoming = new Float64Array(this.planSteps > 0 ? this.L * this.E : 0);
    this.reuseHits = new Float64Array(this.L);
    this.reusePrev = new Float64Array(this.L);
    this.calibration = new NeedCalibration(Math.max(1, this.lookahead));
    this.pinned = Array.from({ length: this.L }, () => new Set<number>());
    this.slotExpert = new Int32Array(this.totalSlots).fill(-1);
    this.expertSlot = new Int32Array(this.L * this.E).fill(-1);
    // The policy starts empty: so does the store (an engine may be reused by a new runner).
    this.emptyStore();
  }

  private newPolicy(): ExpertCachePolicy {
    const p = createOnlinePolicy(this.policyName, { layers: this.L, experts: this.E, topK: this.k, capacity: this.slotsByLayer }, {
      prefetch: this.lookahead > 0,
      // The runner predicts for itself (pre-gating, reuse, co-occurrence); the forecast
      // policy's own predictor serves only the simulator's prefetch path.
      routingPredictor: false,
    });
    // Sequences end when the engine releases them, not when they sit out a step (an
    // expert-aware batch policy leaves running sequences out of steps on purpose).
    (p as SequenceAware).useExplicitEnds?.();
    return p;
  }

  /** Empties every slot of the store and the runner's record of them. */
  private emptyStore(): void {
    for (let l = 0; l < this.L; l++) {
      for (let s = 0; s < this.slotsByLayer[l]; s++) this.engine.evictSlot(l, s);
      this.outstanding[l].clear();
      this.forecastIssued[l].clear();
      this.prefetchPins[l].clear();
      this.pinned[l].clear();
    }
    this.slotExpert.fill(-1);
    this.expertSlot.fill(-1);
    this.unusedPrefetch.fill(0);
  }

  /**
   * After a failed step (a read error, a bad argument) the store may no longer hold what
   * the policy believes: start over with an empty store and a fresh policy, so that the
   * next steps run. Counters are kept; unused prefetches are counted as wasted.
   */
  private resetCache(): void {
    for (let i = 0; i < this.unusedPrefetch.length; i++) if (this.unusedPrefetch[i]) this.layerStats[Math.floor(i / this.E)].prefetchWasted++;
    this.emptyStore();
    this.policy = this.newPolicy();
    this.upcomingOn = false; // the next planUpcoming() tells the new policy
    this.cacheResets++;
  }

  /** Packs the checkpoint's weights into an engine whose routed experts are offloaded to a file. */
  static fromCheckpoint(spec: ModelSpec, ckpt: SafetensorsCheckpoint, o: OffloadRunnerOptions): OffloadRunner {
    const format = WEIGHT_FORMATS[o.weights];
    const { slotBytes } = expertSlotBytes(format, spec.hiddenSize, spec.expertIntermediateSize);
    let slots: number[];
    try {
      slots = slotsByLayer(o.capacity, o.split ?? 'equal', { layers: spec.numLayers, experts: spec.numExperts, slotBytes });
    } catch (e) {
      // The split's number of weights can only be checked against the model, here: name the setting (or flag).
      if (e instanceof CapacityError && /^expert cache split/.test(e.message)) throw new CapacityError(`${o.splitName ?? 'setting offloadSplit'}: ${e.message}`);
      throw e;
    }
    const totalSlots = slots.reduce((a, n) => a + n, 0);
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
    const resident = weightBytes(spec, o.weights, false) + totalSlots * slotBytes;
    const kvBytes = kvCacheBytes(spec, o);
    const avail = availableBytes();
    if (resident + kvBytes > avail) {
      const gib = (b: number) => (b / 2 ** 30).toFixed(2);
      throw new ModelTooLargeError(
        `with ${describeSlots(slots)} the engine needs ${gib(resident)} GiB of resident ${o.weights} weights and slots and ${gib(kvBytes)} GiB of KV cache, ` +
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
    let readCost: ReadCost | null = null;
    let opts = o;
    if (o.prefetchMinProbability === 'auto' && (o.lookahead ?? DEFAULT_LOOKAHEAD) > 0) {
      try {
        readCost = measureReadCost(engine, spec, slots, format, engine.info().threads);
      } catch (e) {
        engine.close();
        throw e;
      }
      opts = { ...o, prefetchMinProbability: prefetchThreshold(readCost) };
    }
    const runner = new OffloadRunner(spec, { blockSize: o.kvBlockSize, numBlocks: o.kvBlocks }, engine, slots, opts);
    runner.readCost = readCost;
    return runner;
  }

  step(batch: StepSequence[]): StepOutput {
    if (this.closed) throw new Error('the offload runner is closed');
    try {
      return this.runStep(batch);
    } catch (err) {
      try {
        this.resetCache();
      } catch {
        // The engine itself is unusable; the error below says why.
      }
      throw err;
    }
  }

  private runStep(batch: StepSequence[]): StepOutput {
    const e = this.engine;
    const L = this.L;
    const E = this.E;
    const K = this.k;
    const { tokens, seqs, blocks } = packBatch(batch);
    const meta = stepTokens(batch);
    const T = tokens.length;
    const routings: Int32Array[] = [];
    const weightsOf: Float32Array[] = [];
    const predicted: Predicted[][] = Array.from({ length: L }, () => []);
    const firstOfSeq = new Map<number, number>();
    const lastOfSeq = new Map<number, number>();
    for (let t = 0; t < T; t++) {
      if (!firstOfSeq.has(meta.seq[t])) firstOfSeq.set(meta.seq[t], t);
      lastOfSeq.set(meta.seq[t], t);
    }
    let distinctSum = 0;
    const probe = this.steps++ % PREGATING_PROBE_STEPS === 0;
    e.beginStep(tokens, seqs, blocks);
    for (let l = 0; l < L; l++) {
      const routerLogits = e.attention(l);
      const r = this.replay ? this.replay.route(l, routerLogits, meta) : e.route(routerLogits, T);
      const ids = r.ids;
      const w = r.weights;
      routings.push(ids);
      weightsOf.push(w);
      const distinct = distinctIds(ids, E);
      distinctSum += distinct.length;
      // Pre-gating reads the hidden state before any of the layer's experts run; its
      // prefetches are issued after the visit's demand loads, which the store serves first.
      const ahead = Math.min(L - 1, l + this.lookahead);
      const to = this.pregatingTo(l, ahead, probe);
      const pred = to > l ? e.predictRouter(l, to) : null;
      const { ran, stalled: streamStalled } = this.serveLayer(l, distinct, meta, ids, w);
      const tp = performance.now();
      if (ahead > l) this.prefetchAfter(l, ahead, to, pred, ids, T, predicted, firstOfSeq);
      if (this.nextStep) this.prefetchNextVisit(l);
      this.policyTime.prefetch += performance.now() - tp;
      const st = this.layerStats[l];
      st.visits++;
      let left = 0;
      let stalled = streamStalled;
      for (const x of distinct) {
        if (ran.has(x)) continue;
        left++;
        if (!stalled && e.expertState(l, x) !== STATE_RESIDENT) stalled = true;
      }
      if (stalled) st.stalledVisits++;
      if (left > 0 && stalled && this.residentFirst) {
        // Experts already resident run while the others are read; the engine combines the
        // parts exactly as one experts() call. Repeated while reads keep arriving.
        for (;;) {
          const ready = distinct.filter((x) => !ran.has(x) && e.expertState(l, x) === STATE_RESIDENT);
          if (ready.length === 0 || ready.length === left) break;
          e.expertsPart(l, ids, w, K, Int32Array.from(ready));
          for (const x of ready) ran.add(x);
          left -= ready.length;
        }
      }
      if (left > 0) {
        // The policy's deferred learning runs while the reads are still in flight.
        if (stalled && this.policy.idle) {
          const ti = performance.now();
          this.policy.idle();
          this.policyTime.idle += performance.now() - ti;
        }
        e.experts(l, ids, w, K);
      }
    }
    const logits = e.endStep(this.logitsBuffer?.take(logitRows(batch) * this.spec.vocabSize));
    const tc = performance.now();
    this.commit(meta, T, routings, weightsOf, predicted, firstOfSeq, lastOfSeq);
    this.policyTime.learn += performance.now() - tc;
    this.lastDistinct = distinctSum / L;
    return { logits, rows: logits.length / this.spec.vocabSize };
  }

  /**
   * Makes a visit's experts resident or loading, as the policy decides; when the decision
   * streams the visit through the slots, runs the experts held so far before evicting one
   * of them. Returns the experts that already ran, and whether they waited for a read.
   */
  private serveLayer(l: number, distinct: number[], meta: StepTokens, ids: Int32Array, w: Float32Array): { ran: Set<number>; stalled: boolean } {
    const e = this.engine;
    const E = this.E;
    const st = this.layerStats[l];
    const out = this.outstanding[l];
    for (const x of this.prefetchPins[l]) if (!this.pinned[l].has(x)) this.policy.unpin(l, x);
    this.prefetchPins[l].clear();
    if (out.size > 0) {
      const need = new Set(distinct);
      for (const x of out) {
        if (need.has(x) || !this.unusedPrefetch[l * E + x]) continue;
        // Stale: not needed by the visit it was fetched for. Withdraw it if its read has not started.
        if (e.expertState(l, x) === STATE_QUEUED && e.cancelLoad(l, x)) {
          this.policy.cancelPrefetch(l, x);
          this.setSlot(l, this.expertSlot[l * E + x], -1);
          this.unusedPrefetch[l * E + x] = 0;
          st.prefetchCancelled++;
        }
      }
      out.clear();
    }
    this.forecastIssued[l].clear();
    const tv = performance.now();
    const observer = this.policy as unknown as { observeRouting?: (layer: number, tokens: { seq: number; experts: ArrayLike<number> }[]) => void };
    if (typeof observer.observeRouting === 'function') {
      const K = this.k;
      const tokens: { seq: number; experts: Int32Array }[] = [];
      for (let t = 0; t < meta.seq.length; t++) tokens.push({ seq: meta.seq[t], experts: ids.subarray(t * K, (t + 1) * K) });
      observer.observeRouting(l, tokens);
    }
    const d = this.policy.request(l, distinct);
    this.policyTime.visit += performance.now() - tv;
    const base = this.slotBase[l];
    const need = new Set(distinct);
    const ran = new Set<number>();
    let stalled = false;
    let p = 0;
    for (const ld of d.loads) {
      const occ = this.slotExpert[base + ld.slot];
      if (occ >= 0) {
        // The policy evicted the slot's expert for this load (decisions list them in the same order).
        const ev = d.evictions[p++];
        if (!ev || ev.slot !== ld.slot || ev.expert !== occ) {
          throw new Error(`offload: layer ${l}: the policy's evictions do not match its loads (slot ${ld.slot} holds ${occ}, eviction ${JSON.stringify(ev)})`);
        }
        if (need.has(occ) && !ran.has(occ)) {
          // Streaming: run every expert of the visit held so far before the slot is reused.
          const part = distinct.filter((x) => this.expertSlot[l * E + x] >= 0 && !ran.has(x));
          stalled ||= part.some((x) => e.expertState(l, x) !== STATE_RESIDENT);
          e.expertsPart(l, ids, w, this.k, Int32Array.from(part));
          for (const x of part) ran.add(x);
        }
        this.noteEvicted(l, occ);
        e.evictSlot(l, ld.slot);
        this.setSlot(l, ld.slot, -1);
      }
      e.loadExpert(l, ld.expert, ld.slot);
      this.setSlot(l, ld.slot, ld.expert);
    }
    if (p !== d.evictions.length) throw new Error(`offload: layer ${l}: ${d.evictions.length - p} eviction(s) of the policy without a load`);
    if (ran.size > 0) st.streamedVisits++;
    for (const x of d.prefetchHits) {
      if (this.unusedPrefetch[l * E + x]) {
        this.unusedPrefetch[l * E + x] = 0;
        st.prefetchUsed++;
      }
    }
    st.hits += d.hits.length;
    st.misses += d.loads.length;
    return { ran, stalled };
  }

  /** Records what a slot of the store holds (-1: empty). */
  private setSlot(l: number, slot: number, expert: number): void {
    const i = this.slotBase[l] + slot;
    const old = this.slotExpert[i];
    if (old >= 0) this.expertSlot[l * this.E + old] = -1;
    this.slotExpert[i] = expert;
    if (expert >= 0) this.expertSlot[l * this.E + expert] = slot;
  }

  private noteEvicted(l: number, expert: number): void {
    const i = l * this.E + expert;
    if (this.unusedPrefetch[i]) {
      this.unusedPrefetch[i] = 0;
      this.layerStats[l].prefetchWasted++;
    }
    this.pinned[l].delete(expert);
  }

  /**
   * The last layer pre-gating predicts after layer l's attention (l: none), up to `ahead`:
   * the farthest distance whose pre-gating still pays (pregatingMinLift), or `ahead` on a
   * probe step.
   */
  private pregatingTo(l: number, ahead: number, probe: boolean): number {
    if (ahead <= l || probe || this.pregatingMinLift === 0) return ahead;
    const chance = this.k / this.E;
    let to = l;
    for (let d = 1; d <= ahead - l; d++) {
      const r = this.prediction.recent(d);
      if (r.predicted < PREGATING_EVIDENCE_TOKENS * this.k || r.precision >= this.pregatingMinLift * chance) to = l + d;
    }
    if (to < ahead) this.pregatingSkipped++;
    return to;
  }

  /**
   * Predictions for layers l+1 .. ahead after layer l's attention, and prefetches from them:
   * pre-gating (`pred`: logits of layers l+1 .. to, null when to = l), co-occurrence, and
   * each sequence's previous experts.
   */
  private prefetchAfter(l: number, ahead: number, to: number, pred: Float32Array | null, cur: Int32Array, T: number, predicted: Predicted[][], firstOfSeq: Map<number, number>): void {
    const E = this.E;
    const K = this.k;
    const n = pred ? pred.length : 0;
    if (n !== (to - l) * T * E) throw new Error(`predictRouter(${l}, ${to}) returned ${n} logits, expected ${(to - l) * T * E}`);
    let room = this.maxQueued - this.queuedPrefetches();
    for (let d = 1; d <= ahead - l; d++) {
      const m = l + d;
      const ids = pred && d <= to - l ? topKIds(pred.subarray((d - 1) * T * E, d * T * E), T, E, K) : NO_IDS;
      const co = this.coForecast(m, d, cur, T);
      const pAny = this.needProbability(m, d, ids, co, T, firstOfSeq);
      // Co-occurrence quality is counted on steps where every token has a forecast.
      predicted[m].push({ distance: d, ids, coIds: co && T <= CO_MAX_TOKENS ? topKIds(co, T, E, K) : NO_IDS, pAny });
      // Earlier prefetches for m (from further away) that this closer prediction no longer
      // supports and whose reads have not started are withdrawn, freeing their I/O.
      if (d < this.lookahead) room += this.withdrawUnsupported(m, d, pAny);
      if (room <= 0) continue;
      const hints = this.hints(d, pAny);
      if (hints.length === 0) continue;
      room -= this.issuePrefetches(m, hints, room, PRIORITY_PREFETCH);
    }
  }

  /**
   * Offers hints for the next visit of layer m to the policy, one at a time, each pinned
   * until that visit: a later prefetch for the same visit must not take the slot of an
   * earlier one (an unused prefetch is every recency policy's first victim). Returns the
   * prefetches issued (at most `room`).
   */
  private issuePrefetches(m: number, hints: PrefetchHint[], room: number, priority: number): number {
    const e = this.engine;
    const E = this.E;
    let n = 0;
    let h = 0;
    const f = this.policy as unknown as NextVisitForecaster;
    const byScore = priority === PRIORITY_NEXT_STEP && this.nextStepByScore && typeof f.prefetchNextVisit === 'function';
    while (n < room && h < hints.length) {
      const issued = byScore ? f.prefetchNextVisit!(m, hints.slice(h), 1) : this.policy.prefetch(m, hints.slice(h), 1);
      if (issued.length === 0) break;
      const p = issued[0];
      while (h < hints.length && hints[h].expert !== p.expert) h++;
      h++;
      if (p.evicted >= 0) {
        this.noteEvicted(m, p.evicted);
        e.evictSlot(m, p.slot);
        this.setSlot(m, p.slot, -1);
      }
      e.loadExpert(m, p.expert, p.slot, priority);
      this.setSlot(m, p.slot, p.expert);
      this.unusedPrefetch[m * E + p.expert] = 1;
      this.outstanding[m].add(p.expert);
      if (priority === PRIORITY_NEXT_STEP) this.forecastIssued[m].add(p.expert);
      if (this.policy.pin(m, p.expert)) this.prefetchPins[m].add(p.expert);
      this.layerStats[m].prefetchIssued++;
      n++;
    }
    return n;
  }

  /** After layer l's visit: prefetches for its next visit (the next step) from the policy's own forecast. */
  private prefetchNextVisit(l: number): void {
    const f = this.policy as unknown as NextVisitForecaster;
    if (typeof f.nextVisitHints !== 'function') return;
    const room = this.maxQueued - this.queuedPrefetches();
    if (room <= 0) return;
    const hints = f.nextVisitHints(l, this.nextStepMin);
    if (hints.length > 0) this.issuePrefetches(l, hints, room, PRIORITY_NEXT_STEP);
  }

  /** Cancels queued prefetches for layer m whose calibrated probability at distance d fell below half the threshold; returns how many. */
  private withdrawUnsupported(m: number, d: number, pAny: Float64Array): number {
    const E = this.E;
    let n = 0;
    for (const x of this.outstanding[m]) {
      if (!this.unusedPrefetch[m * E + x] || this.forecastIssued[m].has(x)) continue;
      if (this.calibration.calibrate(d, pAny[x]) >= this.minProb / 2) continue;
      if (this.engine.expertState(m, x) !== STATE_QUEUED || !this.engine.cancelLoad(m, x)) continue;
      if (this.prefetchPins[m].delete(x) && !this.pinned[m].has(x)) this.policy.unpin(m, x);
      this.policy.cancelPrefetch(m, x);
      this.setSlot(m, this.expertSlot[m * E + x], -1);
      this.unusedPrefetch[m * E + x] = 0;
      this.outstanding[m].delete(x);
      this.layerStats[m].prefetchCancelled++;
      n++;
    }
    return n;
  }

  /** Prefetch reads issued and not started yet. */
  private queuedPrefetches(): number {
    let n = 0;
    for (let m = 0; m < this.L; m++) for (const x of this.outstanding[m]) if (this.unusedPrefetch[m * this.E + x] && this.engine.expertState(m, x) === STATE_QUEUED) n++;
    return n;
  }

  /**
   * Model probability (before calibration) that the visit of layer m needs each expert,
   * from pre-gating at distance d (none when `predIds` is empty), co-occurrence and each
   * sequence's previous experts at m.
   */
  private needProbability(m: number, d: number, predIds: Int32Array, co: Float32Array | null, T: number, firstOfSeq: Map<number, number>): Float64Array {
    const E = this.E;
    const K = this.k;
    const a = this.prediction.precision(d);
    const rho = (this.reuseHits[m] + 1) / (this.reusePrev[m] + 2);
    const pNot = new Float64Array(E).fill(1);
    if (predIds.length > 0) for (let t = 0; t < T; t++) for (let i = 0; i < K; i++) pNot[predIds[t * K + i]] *= 1 - a;
    if (co) for (let t = 0; t < T; t++) for (let x = 0; x < E; x++) pNot[x] *= 1 - co[t * E + x];
    for (const seq of firstOfSeq.keys()) {
      const prev = this.lastRouting.get(seq)?.[m];
      if (prev) for (const x of prev) pNot[x] *= 1 - rho;
    }
    for (let x = 0; x < E; x++) pNot[x] = 1 - pNot[x];
    return pNot;
  }

  /**
   * Each token's co-occurrence forecast for layer m from its experts at m - d (`cur`,
   * T × k): (T, E) probabilities, the mean over its experts i of count(i, j) / (n(i) +
   * CO_PRIOR); null before any counts for these layers. Past CO_MAX_TOKENS tokens only
   * an even sample of them gets a forecast (the others' rows stay 0).
   */
  private coForecast(m: number, d: number, cur: Int32Array, T: number): Float32Array | null {
    if (!this.coOccurrence || d > this.coDistance) return null;
    const E = this.E;
    const K = this.k;
    const D = this.coDistance;
    const base = (m * D + d - 1) * E;
    let out: Float32Array | null = null;
    const acc = this.coScratch;
    const stride = Math.ceil(T / CO_MAX_TOKENS);
    for (let t = 0; t < T; t += stride) {
      acc.fill(0);
      let used = 0;
      for (let k = 0; k < K; k++) {
        const i = cur[t * K + k];
        if (i < 0) continue;
        const n = this.coN[base + i];
        if (n === 0) continue;
        used++;
        const row = (base + i) * E;
        const div = n + CO_PRIOR;
        for (let x = 0; x < E; x++) acc[x] += this.coCounts[row + x] / div;
      }
      if (used === 0) continue;
      out ??= new Float32Array(T * E);
      for (let x = 0; x < E; x++) out[t * E + x] = acc[x] / used;
    }
    return out;
  }

  /** Learns the step's same-token co-occurrences (distances 1..coDistance). */
  private learnCoOccurrence(routings: Int32Array[], T: number): void {
    const D = this.coDistance;
    if (!this.coOccurrence) return;
    const E = this.E;
    const K = this.k;
    for (let m = 1; m < this.L; m++) {
      const to = routings[m];
      for (let d = 1; d <= Math.min(D, m); d++) {
        const from = routings[m - d];
        const base = (m * D + d - 1) * E;
        for (let t = 0; t < T; t++) {
          for (let a = 0; a < K; a++) {
            const i = from[t * K + a];
            if (i < 0) continue;
            this.coN[base + i]++;
            const row = (base + i) * E;
            for (let b = 0; b < K; b++) {
              const j = to[t * K + b];
              if (j >= 0) this.coCounts[row + j]++;
            }
          }
        }
      }
    }
  }

  /**
   * Hints from need probabilities, calibrated by what such probabilities turned out to
   * mean at this distance (NeedCalibration). Tokens of one batch are not independent
   * (similar hidden states give similar predictions), so the model alone is
   * overconfident when predictions are poor.
   */
  private hints(d: number, pAny: Float64Array): PrefetchHint[] {
    const hints: PrefetchHint[] = [];
    for (let x = 0; x < this.E; x++) {
      if (!(pAny[x] > 0)) continue;
      const p = this.calibration.calibrate(d, pAny[x]);
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
    predicted: Predicted[][],
    firstOfSeq: Map<number, number>,
    lastOfSeq: Map<number, number>,
  ): void {
    const K = this.k;
    for (let m = 0; m < this.L; m++) {
      const used = routings[m];
      let need: Uint8Array | null = null;
      for (const p of predicted[m]) {
        if (p.ids.length > 0) this.prediction.add(p.distance, p.ids, K, used, K, T);
        if (p.coIds.length > 0) this.coPrediction.add(p.distance, p.coIds, K, used, K, T);
        if (!need) {
          need = new Uint8Array(this.E);
          for (let i = 0; i < used.length; i++) need[used[i]] = 1;
        }
        this.calibration.observe(p.distance, p.pAny, need);
      }
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
    for (let t = 0; t < T; t++) for (let m = 0; m < this.L; m++) this.recent.observe(meta.seq[t], m, routings[m], t * K, K);
    for (const [seq, t] of lastOfSeq) {
      let hist = this.lastRouting.get(seq);
      if (!hist) this.lastRouting.set(seq, (hist = new Array(this.L).fill(null)));
      for (let m = 0; m < this.L; m++) hist[m] = routings[m].slice(t * K, (t + 1) * K);
    }
    this.learnCoOccurrence(routings, T);
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
    this.recent.delete(seqId);
    (this.policy as SequenceAware).endSequence?.(seqId);
  }

  planUpcoming(steps: readonly (readonly number[])[]): void {
    if (this.planSteps === 0 || this.closed) return;
    const any = upcomingWeights(this.upcoming, this.L, this.E, steps, (seq) => this.recent.hint(seq), this.planSteps);
    if (!any && !this.upcomingOn) return;
    this.upcomingOn = any;
    this.policy.setUpcoming?.(any ? this.upcoming : null);
  }

  /** The sequence's recent routing (RecentRouting): what the batch policy predicts its next token needs. */
  routingHints(seqId: number): RoutingHint | undefined {
    return this.recent.hint(seqId);
  }

  /** Per layer: 1 for experts that hold a slot (resident, or being read into it). */
  residentExperts(): Uint8Array[] {
    const E = this.E;
    const view = (this.residentView ??= Array.from({ length: this.L }, () => new Uint8Array(E)));
    for (let l = 0; l < this.L; l++) {
      const r = view[l];
      for (let x = 0; x < E; x++) r[x] = this.expertSlot[l * E + x] >= 0 ? 1 : 0;
    }
    return view;
  }

  lastStepDistinctExperts(): number | undefined {
    return this.lastDistinct;
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
      slotsByLayer: [...this.slotsByLayer],
      totalSlots: this.totalSlots,
      slotBytes: s.slotBytes,
      lookahead: this.lookahead,
      prefetchMinProbability: this.minProb,
      readSlowdown: this.readCost ? this.readCost.slowdown : null,
      direct: s.direct,
      loads: s.loads,
      bytesLoaded: s.bytesRead,
      prefetchPauses: s.paused ?? 0,
      prefetchAbandoned: s.abandoned ?? 0,
      cacheResets: this.cacheResets,
      layers: this.layerStats.map((x, l) => ({ ...x, stallSeconds: s.stallSeconds[l] ?? 0 })),
      prediction: this.lookahead > 0 ? this.prediction.snapshot() : [],
      pregatingSkipped: this.pregatingSkipped,
      coPrediction: this.coOccurrence ? this.coPrediction.snapshot() : [],
      policySeconds: {
        visit: this.policyTime.visit / 1000,
        prefetch: this.policyTime.prefetch / 1000,
        learn: this.policyTime.learn / 1000,
        idle: this.policyTime.idle / 1000,
      },
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
        capacity: this.slotsByLayer[l],
        resident,
        loading,
        pinned: [...new Set([...this.pinned[l], ...this.prefetchPins[l]])].sort((u, v) => u - v),
        prefetched,
        freeSlots: this.slotsByLayer[l] - resident.length - loading.length,
        counters: stats.layers[l],
      });
    }
    return { policy: stats.policy, slotsByLayer: stats.slotsByLayer, totalSlots: this.totalSlots, slotBytes: stats.slotBytes, lookahead: this.lookahead, layers, stats };
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

/** "N expert slots per layer" for an equal split, else the total and the range per layer. */
function describeSlots(slots: readonly number[]): string {
  const lo = Math.min(...slots);
  const hi = Math.max(...slots);
  if (lo === hi) return `${lo} expert slots per layer`;
  return `${slots.reduce((a, n) => a + n, 0)} expert slots (${lo} to ${hi} per layer)`;
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
