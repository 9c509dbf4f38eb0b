// Continuous batching in the shape of vLLM v1's scheduler: requests are added, each
// step `schedule()` forms a batch that mixes decode tokens of running sequences with
// chunks of waiting prompts within a token budget, the engine runs it and reports the
// sampled tokens with `updateFromOutput()`, and finished requests leave through
// `finishRequests()`. The scheduler never touches logits or tensors.
//
// A sequence's state is its token list (prompt, then generated tokens) and how many of
// them are in the KV cache; the tokens still to compute are the rest. This makes
// preemption by recomputation exact: a preempted sequence drops its blocks and its
// computed count falls to 0, and when it runs again its prompt and generated tokens are
// recomputed in chunks; the last chunk yields the logits the next decode would have.

import type { StepSequence } from '../engine/runner.js';
import type { EngineStats, FinishReason } from '../engine/protocol.js';
import { QueueFullError } from '../engine/protocol.js';
import { BlockManager } from './block-manager.js';
import type { BatchPolicy, PolicyCandidate, SequenceHints } from './policy.js';

/**
 * What the engine knows each step beyond the requests (live hints for policies with
 * `usesHints`): never called for other policies.
 */
export interface LiveHints {
  /** Predicted experts of the sequence's next token (e.g. its previous token's routing). */
  hints?(seqId: number): SequenceHints | undefined;
  /** Per layer, resident[l][e] != 0 when expert e of layer l is in the expert cache. */
  resident?(): readonly Uint8Array[] | undefined;
  /** Recent step time in ms. */
  stepMs?(): number | undefined;
}

/** Bucket upper bounds (steps) of the extra-wait histogram. */
export const EXTRA_WAIT_BUCKETS = [0, 1, 2, 4, 8, 16, 32, 64] as const;

/** Fairness counters of the steps formed so far. */
export interface WaitStats {
  /**
   * Decode tokens run after waiting longer than round-robin FCFS would have made them
   * wait: floor(pending tokens ahead of it, longest-waiting first, / budget) steps,
   * projected when the token became ready (steps that held only prompt work, with
   * prefillFirst, are not counted). extraWaitCounts[i] counts
   * tokens with extra wait <= EXTRA_WAIT_BUCKETS[i] (cumulative, Prometheus-style).
   */
  extraWaitCounts: number[];
  extraWaitSum: number;
  extraWaitTokens: number;
  maxExtraWait: number;
}

/** A request that needs more KV positions than the whole pool holds. */
export class KvCapacityError extends Error {
  constructor(
    readonly positions: number,
    readonly capacity: number,
  ) {
    super(`the request needs up to ${positions} KV positions but the KV pool holds ${capacity}`);
    this.name = 'KvCapacityError';
  }
}

export interface SchedulerConfig {
  /** Tokens per KV block. */
  blockSize: number;
  /** Blocks in the KV pool. */
  numBlocks: number;
  /** Token budget of one step. */
  maxBatchTokens: number;
  /** Sequences running (holding KV blocks) at once at most. */
  maxRunning: number;
  /** Waiting requests at most; addRequest beyond it throws QueueFullError. */
  maxWaiting: number;
  policy: BatchPolicy;
  /** Milliseconds clock (tests inject one); default performance.now. */
  now?: () => number;
  /** Live hints for policies that use them (policy.usesHints). */
  live?: LiveHints;
  /**
   * Admit waiting prompts before stepping running decodes (vLLM v0's prefill-first): a
   * step with waiting requests and room to run more holds only prompt work (running
   * prompt chunks, then waiting prompts). Without it, waiting prompts get the budget
   * running sequences leave, so at most about maxBatchTokens decodes are ever running;
   * with it, up to maxRunning sequences run and take turns in steps of maxBatchTokens.
   */
  prefillFirst?: boolean;
}

export interface SchedulerRequest {
  requestId: string;
  promptTokens: readonly number[];
  /** Tokens the request generates at most (>= 1). */
  maxTokens: number;
  hints?: SequenceHints;
}

/** One entry of a step, parallel to `SchedulerOutput.batch`. */
export interface ScheduledEntry {
  requestId: string;
  seqId: number;
  numTokens: number;
  /** True when this entry's logits are sampled (the sequence's last pending token runs). */
  wantLogits: boolean;
}

export interface SchedulerOutput {
  /** What the runner steps, in order. */
  batch: StepSequence[];
  /** Bookkeeping per batch entry. */
  entries: ScheduledEntry[];
  /** Sequences preempted while forming this step: their runner state must be released. */
  preempted: { requestId: string; seqId: number }[];
  /** Tokens in the batch. */
  numTokens: number;
  /**
   * What the next steps run if nothing changes (for the expert cache, upcoming.ts): the
   * running sequences that sat out this step, longest-waiting first, cut into steps of
   * maxBatchTokens tokens; upcoming[0] is the next step's.
   */
  upcoming: number[][];
}

export interface FinishedRequest {
  requestId: string;
  seqId: number;
  reason: FinishReason;
  promptTokens: number;
  completionTokens: number;
  /** Milliseconds from addRequest to the first step it ran in (to now if it never ran). */
  queueMs: number;
}

interface Sequence {
  readonly requestId: string;
  readonly seqId: number;
  readonly arrival: number;
  readonly addedAt: number;
  firstScheduledAt: number | null;
  /** Prompt, then generated tokens. */
  readonly tokens: number[];
  readonly promptLen: number;
  readonly maxTokens: number;
  /** Tokens whose keys and values are in the KV cache. */
  computed: number;
  stepsWaited: number;
  /** Of stepsWaited, steps that held only prompt work (prefillFirst): not counted as extra wait. */
  promptStepsWaited: number;
  /** Steps FCFS would make its current token wait, projected when the token became ready. */
  fcfsWait: number;
  /** Whether the prompt was counted in the statistics (once, not again after preemption). */
  promptCounted: boolean;
  hints?: SequenceHints;
}

/** Finish times kept to estimate the completion rate for retry-after. */
const RATE_WINDOW = 32;

export class Scheduler {
  private readonly blocks: BlockManager;
  private readonly now: () => number;
  private readonly byId = new Map<string, Sequence>();
  /** In admission order: the last is the newest, the first to be preempted. */
  private readonly running: Sequence[] = [];
  /** Front first; preempted sequences go back to the front. */
  private readonly waiting: Sequence[] = [];
  private nextSeqId = 0;
  private nextArrival = 0;
  private readonly finishTimes: number[] = [];
  private readonly counters = { preemptions: 0, steps: 0, promptTokens: 0, generationTokens: 0 };
  private readonly waits: WaitStats = { extraWaitCounts: EXTRA_WAIT_BUCKETS.map(() => 0), extraWaitSum: 0, extraWaitTokens: 0, maxExtraWait: 0 };

  constructor(readonly config: SchedulerConfig) {
    for (const k of ['maxBatchTokens', 'maxRunning', 'maxWaiting'] as const) {
      if (!Number.isInteger(config[k]) || config[k] < 1) throw new Error(`scheduler: ${k} must be a positive integer, got ${config[k]}`);
    }
    this.blocks = new BlockManager(config.numBlocks, config.blockSize);
    this.now = config.now ?? (() => performance.now());
  }

  /**
   * Queues a request; returns its sequence id. Throws QueueFullError when the waiting
   * queue is at its bound, KvCapacityError when the request could never fit the pool.
   */
  addRequest(req: SchedulerRequest): number {
    if (this.byId.has(req.requestId)) throw new Error(`request ${req.requestId} is already scheduled`);
    if (req.promptTokens.length === 0) throw new Error('the prompt is empty');
    if (!Number.isInteger(req.maxTokens) || req.maxTokens < 1) throw new Error(`maxTokens must be a positive integer, got ${req.maxTokens}`);
    // The last generated token is sampled, never fed back: it needs no KV position.
    const positions = req.promptTokens.length + req.maxTokens - 1;
    if (this.blocks.blocksFor(positions) > this.blocks.numBlocks) {
      throw new KvCapacityError(positions, this.blocks.numBlocks * this.blocks.blockSize);
    }
    if (this.waiting.length >= this.config.maxWaiting) throw new QueueFullError(this.waiting.length, this.retryAfterSeconds());
    const seq: Sequence = {
      requestId: req.requestId,
      seqId: this.nextSeqId++,
      arrival: this.nextArrival++,
      addedAt: this.now(),
      firstScheduledAt: null,
      tokens: [...req.promptTokens],
      promptLen: req.promptTokens.length,
      maxTokens: req.maxTokens,
      computed: 0,
      stepsWaited: 0,
      promptStepsWaited: 0,
      fcfsWait: 0,
      promptCounted: false,
      hints: req.hints,
    };
    this.byId.set(seq.requestId, seq);
    this.waiting.push(seq);
    return seq.seqId;
  }

  /** Forms the next step's batch; an empty batch when nothing is runnable. */
  schedule(): SchedulerOutput {
    const out: SchedulerOutput = { batch: [], entries: [], preempted: [], numTokens: 0, upcoming: [] };
    if (this.running.length + this.waiting.length === 0) return out;
    // Running sequences longest-waiting first (stable: admission order among equals), so
    // that running sequences whose tokens exceed the budget take turns (round robin)
    // instead of the oldest ones running every step.
    const waited = (s: Sequence) => s.stepsWaited - s.promptStepsWaited;
    const running = this.running.length > 1 && this.running.some((s) => waited(s) > 0) ? [...this.running].sort((a, b) => waited(b) - waited(a)) : this.running;
    // FCFS's wait for a token that just became ready: the tokens ahead of it in this order
    // run first, maxBatchTokens per step.
    let ahead = 0;
    for (const s of running) {
      if (waited(s) === 0) s.fcfsWait = Math.floor(ahead / this.config.maxBatchTokens);
      ahead += s.tokens.length - s.computed;
    }
    const policy = this.config.policy;
    const live = policy.usesHints ? this.config.live : undefined;
    const candidate = (s: Sequence, state: 'running' | 'waiting'): PolicyCandidate => ({
      seqId: s.seqId,
      state,
      arrival: s.arrival,
      promptTokens: s.promptLen,
      computedTokens: s.computed,
      pendingTokens: s.tokens.length - s.computed,
      // Steps that held only prompt work (prefillFirst) delayed every running sequence
      // alike, as they would under FCFS: not counted, so fairness bounds count decode steps.
      stepsWaited: waited(s),
      hints: (state === 'running' ? live?.hints?.(s.seqId) : undefined) ?? s.hints,
    });
    const budget = {
      maxTokens: this.config.maxBatchTokens,
      maxRunning: this.config.maxRunning,
      ...(live ? { resident: live.resident?.(), stepMs: live.stepMs?.() } : {}),
    };
    let candidates: PolicyCandidate[] = [];
    let picks: { seqId: number; numTokens: number }[] = [];
    let promptStep = false;
    if (this.config.prefillFirst && this.waiting.length > 0 && this.running.length < this.config.maxRunning) {
      // Prompt work only: running prompt chunks first, then waiting prompts.
      candidates = [...running.filter((s) => s.computed < s.promptLen).map((s) => candidate(s, 'running')), ...this.waiting.map((s) => candidate(s, 'waiting'))];
      picks = policy.pick(candidates, budget);
      promptStep = picks.length > 0;
    }
    if (picks.length === 0) {
      candidates = [...running.map((s) => candidate(s, 'running')), ...this.waiting.map((s) => candidate(s, 'waiting'))];
      picks = policy.pick(candidates, budget);
    }
    this.checkPicks(picks, candidates);
    if (!promptStep) this.noteWaits(picks, candidates);

    const bySeq = new Map([...this.running, ...this.waiting].map((s) => [s.seqId, s]));
    const scheduled = new Set<Sequence>();
    let admitting = true;
    for (const p of picks) {
      const seq = bySeq.get(p.seqId)!;
      if (this.running.includes(seq)) {
        const table = this.allocateOrPreempt(seq, p.numTokens, scheduled, out);
        if (table) this.addEntry(out, seq, p.numTokens, table, scheduled);
      } else {
        // No admissions in a step that had to preempt: the pool is short already, and a
        // preempted sequence (now at the queue's front) must not be passed by later ones.
        // Nor after a refused admission: the policy's order is its priority order.
        if (!admitting || out.preempted.length > 0 || this.running.length >= this.config.maxRunning) {
          admitting = false;
          continue;
        }
        const table = this.blocks.allocate(seq.seqId, seq.computed + p.numTokens);
        if (!table) {
          admitting = false;
          continue;
        }
        removeFrom(this.waiting, seq);
        this.running.push(seq);
        this.addEntry(out, seq, p.numTokens, table, scheduled);
      }
    }

    const t = this.now();
    for (const s of [...this.running, ...this.waiting]) {
      if (!scheduled.has(s)) {
        s.stepsWaited++;
        if (promptStep) s.promptStepsWaited++;
        continue;
      }
      s.stepsWaited = 0;
      s.promptStepsWaited = 0;
      if (s.firstScheduledAt === null) s.firstScheduledAt = t;
    }
    if (out.batch.length > 0) this.counters.steps++;
    out.upcoming = this.upcomingSteps(scheduled, waited);
    return out;
  }

  /** SchedulerOutput.upcoming: the running sequences not in `scheduled`, longest-waiting first, maxBatchTokens tokens per step. */
  private upcomingSteps(scheduled: ReadonlySet<Sequence>, waited: (s: Sequence) => number): number[][] {
    const rest = this.running.filter((s) => !scheduled.has(s));
    rest.sort((a, b) => waited(b) - waited(a)); // stable: admission order among equals
    const steps: number[][] = [];
    const N = this.config.maxBatchTokens;
    let room = 0;
    for (const s of rest) {
      if (room === 0) {
        steps.push([]);
        room = N;
      }
      steps[steps.length - 1].push(s.seqId);
      room -= Math.min(room, Math.max(1, s.tokens.length - s.computed));
    }
    return steps;
  }

  /**
   * Records a step's result: every entry's tokens are now computed, and `sampled` holds
   * the token sampled for each request that continues (requests finishing with 'stop'
   * have none). Unknown requests (finished meanwhile) are skipped.
   */
  updateFromOutput(out: SchedulerOutput, sampled: ReadonlyMap<string, number>): void {
    for (const e of out.entries) {
      const seq = this.byId.get(e.requestId);
      if (!seq || seq.seqId !== e.seqId) continue;
      seq.computed += e.numTokens;
      if (!seq.promptCounted && seq.computed >= seq.promptLen) {
        seq.promptCounted = true;
        this.counters.promptTokens += seq.promptLen;
      }
      const token = sampled.get(e.requestId);
      if (e.wantLogits && token !== undefined) {
        seq.tokens.push(token);
        this.counters.generationTokens++;
      }
    }
  }

  /** Removes requests (wherever they are) and frees their KV blocks at once. Unknown ids are skipped. */
  finishRequests(requestIds: Iterable<string>, reason: FinishReason): FinishedRequest[] {
    const done: FinishedRequest[] = [];
    const t = this.now();
    for (const id of requestIds) {
      const seq = this.byId.get(id);
      if (!seq) continue;
      this.byId.delete(id);
      removeFrom(this.running, seq);
      removeFrom(this.waiting, seq);
      this.blocks.free(seq.seqId);
      if (reason === 'stop' || reason === 'length') {
        this.finishTimes.push(t);
        if (this.finishTimes.length > RATE_WINDOW) this.finishTimes.shift();
      }
      done.push({
        requestId: id,
        seqId: seq.seqId,
        reason,
        promptTokens: seq.promptLen,
        completionTokens: seq.tokens.length - seq.promptLen,
        queueMs: (seq.firstScheduledAt ?? t) - seq.addedAt,
      });
    }
    return done;
  }

  has(requestId: string): boolean {
    return this.byId.has(requestId);
  }

  /** Request ids of every request the scheduler holds. */
  requestIds(): string[] {
    return [...this.byId.keys()];
  }

  /** Whether a step would have work. */
  hasUnfinished(): boolean {
    return this.byId.size > 0;
  }

  stats(): EngineStats {
    return {
      running: this.running.length,
      waiting: this.waiting.length,
      kvBlocksUsed: this.blocks.usedBlocks,
      kvBlocksTotal: this.blocks.numBlocks,
      ...this.counters,
    };
  }

  /**
   * Seconds a client turned away by a full queue should wait: the time the waiting
   * queue takes to drain at the recent completion rate, clamped to 1 .. 60.
   */
  retryAfterSeconds(): number {
    const n = this.finishTimes.length;
    if (n < 2) return 1;
    const spanS = (this.finishTimes[n - 1] - this.finishTimes[0]) / 1000;
    if (spanS <= 0) return 1;
    const perS = (n - 1) / spanS;
    return Math.min(60, Math.max(1, Math.ceil(this.waiting.length / perS)));
  }

  /**
   * Blocks for a running sequence's next tokens; when the pool is short, preempts the
   * newest running sequence not yet in this step until it fits, or until the sequence
   * itself is the one preempted (null).
   */
  private allocateOrPreempt(seq: Sequence, numTokens: number, scheduled: Set<Sequence>, out: SchedulerOutput): Int32Array | null {
    for (;;) {
      const table = this.blocks.allocate(seq.seqId, seq.computed + numTokens);
      if (table) return table;
      let victim: Sequence | undefined;
      for (let i = this.running.length - 1; i >= 0 && !victim; i--) {
        if (!scheduled.has(this.running[i])) victim = this.running[i];
      }
      // `seq` itself is running and not scheduled yet, so a victim always exists.
      this.preempt(victim!, out);
      if (victim === seq) return null;
    }
  }

  private preempt(seq: Sequence, out: SchedulerOutput): void {
    removeFrom(this.running, seq);
    this.blocks.free(seq.seqId);
    seq.computed = 0;
    this.waiting.unshift(seq);
    this.counters.preemptions++;
    out.preempted.push({ requestId: seq.requestId, seqId: seq.seqId });
  }

  private addEntry(out: SchedulerOutput, seq: Sequence, numTokens: number, blockTable: Int32Array, scheduled: Set<Sequence>): void {
    const start = seq.computed;
    const wantLogits = start + numTokens === seq.tokens.length;
    out.batch.push({ seqId: seq.seqId, tokens: Uint32Array.from(seq.tokens.slice(start, start + numTokens)), startPos: start, blockTable, wantLogits });
    out.entries.push({ requestId: seq.requestId, seqId: seq.seqId, numTokens, wantLogits });
    out.numTokens += numTokens;
    scheduled.add(seq);
  }

  /** Extra wait of the step's decode tokens against round-robin FCFS (see WaitStats). */
  private noteWaits(picks: readonly { seqId: number; numTokens: number }[], candidates: readonly PolicyCandidate[]): void {
    const byId = new Map(candidates.map((c) => [c.seqId, c]));
    const w = this.waits;
    for (const p of picks) {
      const c = byId.get(p.seqId)!;
      if (c.state !== 'running' || c.pendingTokens !== 1) continue;
      const seq = this.running.find((s) => s.seqId === p.seqId);
      if (!seq) continue;
      const extra = Math.max(0, c.stepsWaited - seq.fcfsWait);
      w.extraWaitTokens++;
      w.extraWaitSum += extra;
      if (extra > w.maxExtraWait) w.maxExtraWait = extra;
      for (let i = 0; i < EXTRA_WAIT_BUCKETS.length; i++) if (extra <= EXTRA_WAIT_BUCKETS[i]) w.extraWaitCounts[i]++;
    }
  }

  /** Fairness counters since start (copies). */
  waitStats(): WaitStats {
    return { ...this.waits, extraWaitCounts: [...this.waits.extraWaitCounts] };
  }

  /** A policy bug must not corrupt the KV accounting: its picks are checked. */
  private checkPicks(picks: readonly { seqId: number; numTokens: number }[], candidates: readonly PolicyCandidate[]): void {
    const byId = new Map(candidates.map((c) => [c.seqId, c]));
    const seen = new Set<number>();
    let total = 0;
    const name = this.config.policy.name;
    for (const p of picks) {
      const c = byId.get(p.seqId);
      if (!c) throw new Error(`policy ${name} picked sequence ${p.seqId}, which is not runnable`);
      if (seen.has(p.seqId)) throw new Error(`policy ${name} picked sequence ${p.seqId} twice`);
      if (!Number.isInteger(p.numTokens) || p.numTokens < 1 || p.numTokens > c.pendingTokens) {
        throw new Error(`policy ${name} gave sequence ${p.seqId} ${p.numTokens} tokens; it has ${c.pendingTokens} pending`);
      }
      seen.add(p.seqId);
      total += p.numTokens;
    }
    if (total > this.config.maxBatchTokens) throw new Error(`policy ${name} picked ${total} tokens; the step budget is ${this.config.maxBatchTokens}`);
  }
}

function removeFrom<T>(list: T[], item: T): void {
  const i = list.indexOf(item);
  if (i >= 0) list.splice(i, 1);
}
