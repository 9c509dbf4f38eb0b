// The engine's step loop, independent of threads: it owns the scheduler, the model
// runner and one sampler per request. step() = schedule → runner.step → sample → emit
// events → update the scheduler. The worker drives it; tests can drive it directly.
// A failure inside a step fails the requests it touched (reason 'error'), never the loop.

import { createPolicy, type BatchPolicy } from '../scheduler/policy.js';
import { KvCapacityError, Scheduler, type SchedulerOutput } from '../scheduler/scheduler.js';
import type { EngineEvent, EngineStats, FinishReason, GenerationRequest } from './protocol.js';
import type { ModelRunner } from './runner.js';
import { RequestSampler } from './sampler.js';

/** Empty steps in a row, with requests in the engine, taken as a stalled policy. */
const MAX_EMPTY_STEPS = 100;

export interface EngineLoopOptions {
  kvBlockSize: number;
  kvBlocks: number;
  maxBatchTokens: number;
  maxRunning: number;
  maxWaiting: number;
  /** A policy, or its name ('fcfs'). */
  policy: string | BatchPolicy;
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

  constructor(
    private readonly runner: ModelRunner,
    private readonly opts: EngineLoopOptions,
    private readonly emit: (e: EngineEvent) => void,
  ) {
    this.scheduler = new Scheduler({
      blockSize: opts.kvBlockSize,
      numBlocks: opts.kvBlocks,
      maxBatchTokens: opts.maxBatchTokens,
      maxRunning: opts.maxRunning,
      maxWaiting: opts.maxWaiting,
      policy: typeof opts.policy === 'string' ? createPolicy(opts.policy) : opts.policy,
      now: opts.now,
    });
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
    let out: SchedulerOutput;
    try {
      out = this.scheduler.schedule();
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
      const res = this.runner.step(out.batch);
      const want = out.entries.filter((e) => e.wantLogits).length;
      if (res.rows !== want) throw new Error(`the runner returned ${res.rows} logit rows for ${want} sequences`);
      logits = res.logits;
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
    return this.scheduler.stats();
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
