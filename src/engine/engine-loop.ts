// The engine's step loop, independent of threads: it owns the scheduler, the model
// runner and one sampler per request. step() = schedule → runner.step → sample → emit
// events → update the scheduler. The worker drives it; tests can drive it directly.
// A failure inside a step fails the requests it touched (reason 'error'), never the loop.

import { createPolicy, type BatchPolicy, type PolicyOptions, type SequenceHints } from '../scheduler/policy.js';
import { EXTRA_WAIT_BUCKETS, KvCapacityError, Scheduler, type LiveHints, type SchedulerOutput } from '../scheduler/scheduler.js';
import type { BatchingStats, EngineEvent, EngineStats, FinishReason, GenerationRequest } from './protocol.js';
import type { ModelRunner } from './runner.js';
import { RequestSampler } from './sampler.js';

/** Empty steps in a row, with requests in the engine, taken as a stalled policy. */
const MAX_EMPTY_STEPS = 100;

/** Bucket upper bounds of the distinct-experts-per-step histogram (mean over layers). */
export const DISTINCT_EXPERT_BUCKETS = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512];

/** Counters some policies keep about themselves (ExpertAwarePolicy's); read when present. */
interface PolicyCounters {
  totalPickMicros?: number;
  pickCalls?: number;
  totalRegrouped?: number;
  lastDue?: number;
}

export interface EngineLoopOptions {
  kvBlockSize: number;
  kvBlocks: number;
  maxBatchTokens: number;
  maxRunning: number;
  maxWaiting: number;
  /** A policy, or its name ('fcfs', 'expert-aware'). */
  policy: string | BatchPolicy;
  /** Options of a policy given by name. */
  policyOptions?: PolicyOptions;
  /** Admit waiting prompts before stepping running decodes (SchedulerConfig.prefillFirst). */
  prefillFirst?: boolean;
  /** Only ids below it are sampled: the tokenizer's ids, not the embedding's padding rows. */
  vocabLimit: number;
  /** Positions the model handles (max_position_embeddings). */
  contextLength: number;
  /** Milliseconds clock; default performance.now. */
  now?: () => number;
}

export class EngineLoop {
  private readonly scheduler: Scheduler;
  private readonly samplers = new Map<string, RequestSampler>();
  /** Consecutive steps that scheduled nothing although requests were in the engine. */
  private emptySteps = 0;
  private readonly policy: BatchPolicy;
  /** Exponential mean of the step time (schedule, model step, sampling), ms. */
  private stepMsMean: number | undefined;
  private readonly batching: BatchingStats;

  constructor(
    private readonly runner: ModelRunner,
    private readonly opts: EngineLoopOptions,
    private readonly emit: (e: EngineEvent) => void,
  ) {
    this.policy = typeof opts.policy === 'string' ? createPolicy(opts.policy, opts.policyOptions) : opts.policy;
    this.batching = {
      policy: this.policy.name,
      distinctBuckets: DISTINCT_EXPERT_BUCKETS,
      distinctCounts: DISTINCT_EXPERT_BUCKETS.map(() => 0),
      distinctSum: 0,
      distinctSteps: 0,
      regroupedPicks: 0,
      duePicks: 0,
      pickSeconds: 0,
      pickCalls: 0,
      scheduleSeconds: 0,
      extraWaitBuckets: [...EXTRA_WAIT_BUCKETS],
      extraWaitCounts: EXTRA_WAIT_BUCKETS.map(() => 0),
      extraWaitSum: 0,
      extraWaitTokens: 0,
    };
    this.scheduler = new Scheduler({
      blockSize: opts.kvBlockSize,
      numBlocks: opts.kvBlocks,
      maxBatchTokens: opts.maxBatchTokens,
      maxRunning: opts.maxRunning,
      maxWaiting: opts.maxWaiting,
      policy: this.policy,
      now: opts.now,
      live: this.policy.usesHints ? this.liveHints() : undefined,
      prefillFirst: opts.prefillFirst,
    });
  }

  /** What the runner knows for the policy: each sequence's predicted experts, the resident set, the step time. */
  private liveHints(): LiveHints {
    const r = this.runner;
    return {
      hints: r.routingHints
        ? (seqId: number): SequenceHints | undefined => {
            const h = r.routingHints!(seqId);
            return h ? { predictedExperts: h.experts, ...(h.weights ? { predictedWeights: h.weights } : {}) } : undefined;
          }
        : undefined,
      resident: r.residentExperts ? () => r.residentExperts!() : undefined,
      stepMs: () => this.stepMsMean,
    };
  }

  /**
   * Queues a request. Throws QueueFullError (protocol.ts) when the waiting queue is full, and an Error
   * when the id is live already; a request the engine cannot serve (bad tokens, no room
   * in the context or the KV pool) gets a 'finished' event with reason 'error' instead.
   */
  submit(req: GenerationRequest): void {
    if (this.samplers.has(req.id)) throw new Error(`request ${req.id} is already in the engine`);
    const refuse = (error: string) =>
      this.emit({ type: 'finished', requestId: req.id, reason: 'error', promptTokens: req.promptTokens.length, completionTokens: 0, queueMs: 0, error });
    const V = this.runner.spec.vocabSize;
    const bad = req.promptTokens.find((id) => !Number.isInteger(id) || id < 0 || id >= V);
    if (req.promptTokens.length === 0) return refuse('the prompt is empty');
    if (bad !== undefined) return refuse(`prompt token ${bad} is outside the vocabulary (${V})`);
    if (!Number.isInteger(req.maxTokens) || req.maxTokens < 1) return refuse(`maxTokens must be a positive integer, got ${req.maxTokens}`);
    // The last generated token is sampled, never fed: prompt + maxTokens - 1 positions.
    const room = this.opts.contextLength - req.promptTokens.length + 1;
    if (req.promptTokens.length > this.opts.contextLength) return refuse(`the prompt has ${req.promptTokens.length} tokens; the model's context is ${this.opts.contextLength}`);
    const maxTokens = Math.min(req.maxTokens, room);
    try {
      this.scheduler.addRequest({ requestId: req.id, promptTokens: req.promptTokens, maxTokens });
    } catch (e) {
      if (e instanceof KvCapacityError) return refuse(e.message);
      throw e;
    }
    this.samplers.set(req.id, new RequestSampler(req, this.opts.vocabLimit, maxTokens));
  }

  /** Stops a request and frees its KV blocks now; emits its 'finished' with reason 'abort'. No-op if unknown. */
  cancel(requestId: string): void {
    this.finish([requestId], 'abort');
  }

  /** Aborts every request (engine shutdown). */
  abortAll(): void {
    this.finish(this.scheduler.requestIds(), 'abort');
  }

  /** Whether any request is in the engine (a step may have work). */
  hasWork(): boolean {
    return this.scheduler.hasUnfinished();
  }

  /** Runs one step; false when there was nothing to run. */
  step(): boolean {
    if (!this.scheduler.hasUnfinished()) return false;
    const t0 = performance.now();
    const worked = this.runStep();
    if (worked) {
      const ms = performance.now() - t0;
      this.stepMsMean = this.stepMsMean === undefined ? ms : 0.8 * this.stepMsMean + 0.2 * ms;
    }
    return worked;
  }

  private runStep(): boolean {
    let out: SchedulerOutput;
    const p = this.policy as PolicyCounters;
    const callsBefore = p.pickCalls;
    try {
      const t0 = performance.now();
      out = this.scheduler.schedule();
      this.batching.scheduleSeconds += (performance.now() - t0) / 1000;
      // Due picks of the step's (last) pick() call.
      if (p.pickCalls !== callsBefore && typeof p.lastDue === 'number') this.batching.duePicks += p.lastDue;
    } catch (e) {
      // The scheduler's state is suspect: every request fails rather than hang.
      this.finish(this.scheduler.requestIds(), 'error', `scheduler: ${message(e)}`);
      return true;
    }
    for (const p of out.preempted) this.release(p.seqId);
    if (out.batch.length === 0) {
      // Only a policy that passes over every running sequence can get here (a request
      // alone always fits the pool); with nothing changing, it would never end.
      if (++this.emptySteps >= MAX_EMPTY_STEPS) {
        this.finish(this.scheduler.requestIds(), 'error', `the batch policy scheduled nothing for ${this.emptySteps} steps`);
        this.emptySteps = 0;
      }
      return false;
    }
    this.emptySteps = 0;

    let logits: Float32Array;
    try {
      this.runner.planUpcoming?.(out.upcoming);
      const res = this.runner.step(out.batch);
      const want = out.entries.filter((e) => e.wantLogits).length;
      if (res.rows !== want) throw new Error(`the runner returned ${res.rows} logit rows for ${want} sequences`);
      logits = res.logits;
      const d = this.runner.lastStepDistinctExperts?.();
      if (d !== undefined) {
        const b = this.batching;
        b.distinctSteps++;
        b.distinctSum += d;
        for (let i = 0; i < b.distinctBuckets.length; i++) if (d <= b.distinctBuckets[i]) b.distinctCounts[i]++;
      }
    } catch (e) {
      this.finish(
        out.entries.map((e) => e.requestId),
        'error',
        `model step: ${message(e)}`,
      );
      return true;
    }

    const V = this.runner.spec.vocabSize;
    const sampled = new Map<string, number>();
    const finished = new Map<string, FinishReason>();
    const failed = new Map<string, string>();
    let row = 0;
    for (const e of out.entries) {
      if (!e.wantLogits) continue;
      const r = row++;
      const sampler = this.samplers.get(e.requestId);
      if (!sampler) continue;
      try {
        const res = sampler.next(logits, r, V);
        if (res.token) {
          sampled.set(e.requestId, res.token.id);
          this.emit({ type: 'tokens', requestId: e.requestId, tokens: [res.token] });
        }
        if (res.finish) finished.set(e.requestId, res.finish);
      } catch (err) {
        failed.set(e.requestId, `sampling: ${message(err)}`);
      }
    }
    this.scheduler.updateFromOutput(out, sampled);
    for (const [id, reason] of finished) this.finish([id], reason);
    for (const [id, error] of failed) this.finish([id], 'error', error);
    return true;
  }

  stats(): EngineStats {
    return { ...this.scheduler.stats(), batching: this.batchingStats() };
  }

  /** Batch formation counters: the policy's own (when it keeps them) and the scheduler's fairness counters. */
  batchingStats(): BatchingStats {
    const p = this.policy as PolicyCounters;
    const w = this.scheduler.waitStats();
    const b = this.batching;
    return {
      ...b,
      distinctCounts: [...b.distinctCounts],
      regroupedPicks: p.totalRegrouped ?? 0,
      pickSeconds: (p.totalPickMicros ?? 0) / 1e6,
      pickCalls: p.pickCalls ?? 0,
      extraWaitCounts: w.extraWaitCounts,
      extraWaitSum: w.extraWaitSum,
      extraWaitTokens: w.extraWaitTokens,
    };
  }

  /** Suggested seconds before a client turned away by a full queue retries. */
  retryAfterSeconds(): number {
    return this.scheduler.retryAfterSeconds();
  }

  private finish(ids: Iterable<string>, reason: FinishReason, error?: string): void {
    for (const f of this.scheduler.finishRequests(ids, reason)) {
      this.release(f.seqId);
      this.samplers.delete(f.requestId);
      this.emit({
        type: 'finished',
        requestId: f.requestId,
        reason,
        promptTokens: f.promptTokens,
        completionTokens: f.completionTokens,
        queueMs: f.queueMs,
        ...(error !== undefined ? { error } : {}),
      });
    }
  }

  /** Drops the runner's state of a sequence; a failure here must not stop the loop. */
  private release(seqId: number): void {
    try {
      this.runner.release(seqId);
    } catch {
      // The runner recreates a sequence's state when it starts again at position 0.
    }
  }
}

function message(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
