// The model runner contract the engine loop drives: one step over a batch that mixes
// sequences in prefill (many new tokens) and in decode (one new token). The native
// engine implements it; so does the reference pass, so the server and scheduler run
// unchanged on either.

import type { ModelSpec } from '../model/spec.js';
import type { ExpertCacheState, OffloadStats } from './protocol.js';
import { KvCache, ReferenceModel } from '../model/reference.js';

export interface StepSequence {
  /** The scheduler's id of the sequence; stable across steps. */
  seqId: number;
  /** Tokens new to the model this step (a prompt chunk, or the last sampled token). */
  tokens: Uint32Array;
  /** Position of tokens[0]; positions 0 .. startPos-1 are already in the KV cache. */
  startPos: number;
  /** KV blocks of the sequence in position order: block i holds positions [i*blockSize, (i+1)*blockSize). */
  blockTable: Int32Array;
  /** Whether to return logits for this sequence's last new token (false for a prompt chunk that is not the last). */
  wantLogits: boolean;
}

export interface StepOutput {
  /**
   * (rows, vocab): one row per sequence with wantLogits, in batch order. A runner made
   * with reuseLogits returns a view of one buffer that its next step overwrites.
   */
  logits: Float32Array;
  rows: number;
}

/** Rows of logits a step returns: its sequences that want them. */
export function logitRows(batch: readonly StepSequence[]): number {
  let n = 0;
  for (const s of batch) if (s.wantLogits) n++;
  return n;
}

export interface KvGeometry {
  /** Tokens per KV block. */
  blockSize: number;
  /** Blocks in the pool. */
  numBlocks: number;
}

export interface ModelRunner {
  readonly spec: ModelSpec;
  readonly kv: KvGeometry;
  step(batch: StepSequence[]): StepOutput;
  /** Forget a sequence (its blocks go back to the scheduler's pool). */
  release(seqId: number): void;
  close(): void;
  /** Expert offloading counters (runners that offload experts). */
  offloadStats?(): OffloadStats;
  /** The expert cache's state (runners that offload experts). */
  expertCacheState?(): ExpertCacheState;
  /**
   * Live hint for batch policies: the experts each layer is predicted to route the
   * sequence's next token to (weights: the probability of each, default 1); undefined
   * when nothing is known yet (before its first step). Cheap: called per running
   * sequence per step, only for policies that use hints.
   */
  routingHints?(seqId: number): RoutingHint | undefined;
  /**
   * Per layer, resident[l][e] != 0 when expert e of layer l is in the fast tier (or being
   * read into it). The arrays may be reused by the next call: read them at once.
   */
  residentExperts?(): Uint8Array[];
  /**
   * What the next steps will run (SchedulerOutput.upcoming: sequence ids per step, the
   * next one first), told before each step; runners that cache experts keep what those
   * sequences are expected to need (upcoming.ts). An empty list: nothing known.
   */
  planUpcoming?(steps: readonly (readonly number[])[]): void;
  /** Distinct experts per layer of the last completed step, mean over layers (runners that see the routing). */
  lastStepDistinctExperts?(): number | undefined;
}

/** A sequence's predicted experts for its next token, per layer. */
export interface RoutingHint {
  readonly experts: readonly (readonly number[])[];
  readonly weights?: readonly (readonly number[])[];
}

/** One layer's routing as a runner applied it (for tests and tracing). */
export interface RoutingEvent {
  layer: number;
  /** (tokens, k) expert ids and gate weights, batch token order. */
  ids: Int32Array;
  weights: Float32Array;
  k: number;
  /** Sequence id and position of each token. */
  seq: Int32Array;
  pos: Int32Array;
}

/**
 * The reference forward pass behind the runner contract. It keeps one dense cache per
 * sequence instead of paged blocks (the block tables are the scheduler's accounting);
 * it checks that positions arrive in order, as the paged engine requires.
 */
export class ReferenceRunner implements ModelRunner {
  private readonly caches = new Map<number, KvCache>();

  constructor(
    readonly model: ReferenceModel,
    readonly kv: KvGeometry,
  ) {}

  get spec(): ModelSpec {
    return this.model.spec;
  }

  step(batch: StepSequence[]): StepOutput {
    const V = this.spec.vocabSize;
    const rows = logitRows(batch);
    const logits = new Float32Array(rows * V);
    let row = 0;
    for (const s of batch) {
      let cache = this.caches.get(s.seqId);
      if (!cache || s.startPos === 0) {
        cache = this.model.newCache();
        this.caches.set(s.seqId, cache);
      }
      if (cache.length !== s.startPos) {
        throw new Error(`sequence ${s.seqId}: step at position ${s.startPos} but ${cache.length} positions are cached`);
      }
      const need = Math.ceil((s.startPos + s.tokens.length) / this.kv.blockSize);
      if (s.blockTable.length < need) {
        throw new Error(`sequence ${s.seqId}: ${s.blockTable.length} KV blocks for ${s.startPos + s.tokens.length} positions`);
      }
      const out = this.model.forward(s.tokens, cache);
      if (s.wantLogits) {
        logits.set(out.subarray((s.tokens.length - 1) * V, s.tokens.length * V), row * V);
        row++;
      }
    }
    return { logits, rows };
  }

  release(seqId: number): void {
    this.caches.delete(seqId);
  }

  close(): void {
    this.caches.clear();
  }
}
