// The contract between the HTTP side (main thread) and the engine (a worker thread).
// The server tokenizes, detokenizes and matches stop strings; the engine schedules,
// runs the model and samples. Everything crossing the boundary is plain data.

import type { SamplingParams } from './sampling.js';

export interface GenerationRequest {
  /** Unique among live requests. */
  id: string;
  promptTokens: number[];
  /** Tokens to generate at most; the server has already checked prompt + maxTokens against the context. */
  maxTokens: number;
  sampling: SamplingParams;
  /** The request's own random stream: the same seed and prompt give the same tokens, whatever else is batched. Null: random. */
  seed: number | null;
  penalties: {
    /** OpenAI semantics: logit -= frequency * count(token in output). */
    frequency: number;
    /** OpenAI semantics: logit -= presence * (count > 0). */
    presence: number;
    /** HF / vLLM semantics over prompt and output tokens: positive logits divided, negative multiplied; 1 = off. */
    repetition: number;
    /**
     * OpenAI logit_bias: (token id, bias) pairs added to those tokens' logits before
     * sampling (after the other penalties); ids below the vocabulary, bias in [-100, 100].
     * Absent or empty: none.
     */
    logitBias?: [number, number][];
  };
  /** Token ids that finish the request with reason 'stop' (not emitted). */
  stopTokenIds: number[];
  /** Null: no logprobs. k >= 0: the sampled token's logprob and the k most likely alternatives. */
  logprobs: number | null;
}

export interface TokenLogprob {
  id: number;
  logprob: number;
}

export interface GeneratedToken {
  id: number;
  /** Present when the request asked for logprobs: log-softmax of the raw logits (before penalties and temperature). */
  logprob?: number;
  top?: TokenLogprob[];
}

export type FinishReason = 'stop' | 'length' | 'abort' | 'error';

export type EngineEvent =
  | { type: 'tokens'; requestId: string; tokens: GeneratedToken[] }
  | {
      type: 'finished';
      requestId: string;
      reason: FinishReason;
      promptTokens: number;
      completionTokens: number;
      /** Milliseconds from submission to the first scheduled step. */
      queueMs: number;
      /** Set when reason is 'error'. */
      error?: string;
    };

export interface ModelInfo {
  id: string;
  contextLength: number;
  vocabSize: number;
  eosTokenIds: number[];
}

/** A snapshot the engine publishes after every step (and when idle). */
export interface EngineStats {
  running: number;
  waiting: number;
  kvBlocksUsed: number;
  kvBlocksTotal: number;
  /** Counters since start. */
  preemptions: number;
  steps: number;
  promptTokens: number;
  generationTokens: number;
  /** Expert offloading counters; present when the runner offloads experts. */
  offload?: OffloadStats;
  /** Batch formation: the policy's counters and what its steps touched. */
  batching?: BatchingStats;
}

/** Cumulative counters of batch formation (since the engine started). */
export interface BatchingStats {
  policy: string;
  /**
   * Distinct experts per step (mean over layers) of the steps whose routing the runner
   * saw: cumulative counts per bucket (distinctCounts[i]: steps with a value <=
   * distinctBuckets[i]), their sum and number. Absent values: the runner does not see routing.
   */
  distinctBuckets: number[];
  distinctCounts: number[];
  distinctSum: number;
  distinctSteps: number;
  /** Picks the policy made that FCFS would not have made (expert-aware policies). */
  regroupedPicks: number;
  /** Picks forced by the fairness bound (sequences at their extra-wait bound). */
  duePicks: number;
  /** Seconds spent in the policy's pick(), and its calls. */
  pickSeconds: number;
  pickCalls: number;
  /**
   * Seconds spent forming steps, every policy: the scheduler's whole schedule() call, with
   * what an expert-aware policy reads beyond FCFS (the runner's routing hints and resident
   * experts), its pick() and the list of the next steps' sequences (not the runner's
   * planUpcoming, which turns that list into the cache's weights).
   */
  scheduleSeconds: number;
  /**
   * Decode tokens' extra wait in steps beyond round-robin FCFS's (the scheduler's
   * WaitStats): cumulative counts per bucket, sum, tokens.
   */
  extraWaitBuckets: number[];
  extraWaitCounts: number[];
  extraWaitSum: number;
  extraWaitTokens: number;
}

/** Counters of one layer's expert cache since the engine started. */
export interface OffloadLayerStats {
  /** Visits of the layer (one per step). */
  visits: number;
  /** Visits that had to wait for at least one expert still being read. */
  stalledVisits: number;
  /** Visits that needed more experts than the layer's slots and streamed them through the slots. */
  streamedVisits: number;
  /** Needed (expert, visit) pairs that were resident or loading (prefetched ones included). */
  hits: number;
  /** Needed (expert, visit) pairs loaded on demand. */
  misses: number;
  /** Prefetch loads requested; issued = used + wasted + cancelled + still outstanding. */
  prefetchIssued: number;
  /** Prefetched experts needed before their eviction. */
  prefetchUsed: number;
  /** Prefetched experts evicted unused (each was a full load). */
  prefetchWasted: number;
  /** Prefetches withdrawn before their read started (stale: the visit did not need them). */
  prefetchCancelled: number;
  /** Seconds the step waited for this layer's experts to arrive. */
  stallSeconds: number;
}

export interface OffloadStats {
  policy: string;
  /** Expert slots of each layer (the capacity, split across layers by the offloadSplit setting). */
  slotsByLayer: number[];
  /** Expert slots over all layers. */
  totalSlots: number;
  /** Bytes of one expert slot. */
  slotBytes: number;
  /** Layers ahead that are prefetched (0: no prefetch). */
  lookahead: number;
  /**
   * Smallest estimated probability of use for a prefetch, as set or measured at start-up
   * (offloadPrefetchMinProbability), and the measured fraction of its speed the compute
   * loses while the slow tier reads (null: not measured, the threshold was set).
   */
  prefetchMinProbability?: number;
  readSlowdown?: number | null;
  /** Reads bypass the page cache (O_DIRECT). */
  direct: boolean;
  /** Expert reads completed by the store, and the bytes read (completed reads, and what abandoned prefetch reads read). */
  loads: number;
  bytesLoaded: number;
  /** Times a prefetch read paused between its pieces for a demand read, and prefetch reads stopped early because their slot was taken. */
  prefetchPauses?: number;
  prefetchAbandoned?: number;
  /** Times a failed step left the cache unknown and the runner started over with it empty. */
  cacheResets: number;
  layers: OffloadLayerStats[];
  /** Pre-gating quality per lookahead distance (predicted top-k vs the routing used). */
  prediction: { distance: number; predicted: number; actual: number; hits: number; recall: number; precision: number }[];
  /** Layer visits whose pre-gating was skipped at some distance: its recent precision was near chance (OffloadSettings.pregatingMinLift). */
  pregatingSkipped?: number;
  /** The same for the same-token co-occurrence forecast (layer m - d's experts to layer m's), learned online. */
  coPrediction?: { distance: number; predicted: number; actual: number; hits: number; recall: number; precision: number }[];
  /**
   * Seconds the runner spent in its own TypeScript between the engine's calls of the
   * steps, by part: `visit` (the cache policy's decisions for the layer visits),
   * `prefetch` (predictions and prefetch decisions), `learn` (after each step: prediction
   * counters, co-occurrence counts), all on the step's critical path; `idle` (the policy's
   * deferred learning, run while a visit waits for reads).
   */
  policySeconds?: { visit: number; prefetch: number; learn: number; idle: number };
}

/** GET /v1/internal/experts: the expert cache as it is now. */
export interface ExpertCacheState {
  policy: string;
  /** Expert slots of each layer (layers[l].capacity). */
  slotsByLayer: number[];
  totalSlots: number;
  slotBytes: number;
  lookahead: number;
  layers: {
    layer: number;
    /** Expert slots of this layer. */
    capacity: number;
    /** Resident experts (read complete), slot order. */
    resident: { expert: number; slot: number }[];
    /** Experts assigned a slot whose read is queued or in progress. */
    loading: { expert: number; slot: number; state: 'queued' | 'reading' }[];
    /** Experts kept from eviction: pinned by the operator, or prefetched and pinned until the visit they were fetched for. */
    pinned: number[];
    /** Prefetched and not used yet (resident or loading). */
    prefetched: number[];
    freeSlots: number;
    counters: OffloadLayerStats;
  }[];
  stats: OffloadStats;
}

/** Expert offloading of the native runner (EngineOptions.offload). */
export interface OffloadOptions {
  /** Fast-tier budget: fraction of all experts ("0.25", "25%") or bytes ("12GiB"). */
  capacity: string;
  /** How the budget is split across layers: "equal" (default) or one weight per layer ("2,2,1,1"). */
  split?: string;
  /** How errors about the split name it (default "setting offloadSplit"; `generate` names its flag). */
  splitName?: string;
  /** Expert cache policy by name (lru, lfu, lfu-decay, predictive, forecast; default forecast). */
  policy: string;
  /** Layers ahead to prefetch from pre-gating and recent routing; 0 turns prefetching off. */
  lookahead: number;
  /** Smallest probability of use for a prefetch, or 'auto': measured at start-up (read-cost.ts; default 0.3 when absent). */
  prefetchMinProbability?: number | 'auto';
  /** Steps ahead whose sequences' expected experts eviction keeps (upcoming.ts; default 4, 0: off). */
  planSteps?: number;
  /** I/O threads of the expert store. */
  ioThreads: number;
  /** Directory of the expert file (default: the OS temporary directory). */
  dir?: string;
}

export class QueueFullError extends Error {
  constructor(
    readonly waiting: number,
    /** Suggested seconds before retrying. */
    readonly retryAfterSeconds: number,
  ) {
    super(`the engine's waiting queue is full (${waiting} requests)`);
    this.name = 'QueueFullError';
  }
}

export interface EngineClient {
  /** Resolves when the model is loaded and the engine accepts work; rejects if loading fails. */
  readonly ready: Promise<ModelInfo>;
  /**
   * Queues a request; `onEvent` receives its token batches and, last, exactly one 'finished'.
   * Throws QueueFullError when the waiting queue is at its bound.
   */
  submit(req: GenerationRequest, onEvent: (e: EngineEvent) => void): void;
  /** Stops a request and frees its KV blocks at once; its 'finished' event has reason 'abort'. No-op if unknown. */
  cancel(requestId: string): void;
  stats(): EngineStats;
  /** The expert cache's state; absent (or resolving to null) when the engine does not offload experts. */
  expertCache?(): Promise<ExpertCacheState | null>;
  /** Finishes nothing: aborts what is in flight and stops the worker. */
  close(): Promise<void>;
}

/** What the engine worker is started with (the server's configuration maps onto it). */
export interface EngineOptions {
  modelDir: string;
  /** The id clients use in the `model` field. */
  modelId: string;
  /** 'reference' runs the TypeScript reference pass; 'native' the addon's engine (when built). */
  runner: 'reference' | 'native';
  /** Native runner: weights in memory (f32, bf16, f16, q8, q4, or auto = as stored). */
  weights?: 'auto' | 'f32' | 'bf16' | 'f16' | 'q8' | 'q4';
  /** Native runner: compute threads (default: all cores). */
  threads?: number;
  kvBlockSize: number;
  kvBlocks: number;
  /** Native runner: KV cache elements, f32 (default) or f16. */
  kvCacheType?: 'f32' | 'f16';
  /** Token budget of one step: decode tokens plus prompt chunk tokens. */
  maxBatchTokens: number;
  /** Sequences running at once at most. */
  maxRunning: number;
  /** Requests waiting at most; beyond it submit() throws QueueFullError. */
  maxWaiting: number;
  /** Batch-formation policy by name ('fcfs', 'expert-aware'). */
  policy: string;
  /** The policy's options (fairness bounds of expert-aware). */
  policyOptions?: { maxExtraWaitSteps?: number; maxExtraWaitMs?: number; maxGapFactor?: number; missPenalty?: number };
  /** Admit waiting prompts before stepping running decodes (SchedulerConfig.prefillFirst). */
  prefillFirst?: boolean;
  /** Native runner: keep routed experts in a file and cache them in RAM (absent: all resident). */
  offload?: OffloadOptions;
  /** Native runner: take each token's experts from this moe-trace v1 file instead of the router (src/offload/replay.ts). */
  replayTrace?: string;
}
