// Per-request sampling state: the request's own random stream, the token counts the
// penalties need, logprobs, and the finish rules (stop tokens, max tokens). One
// RequestSampler lives as long as its request, across preemptions, so a recomputed
// sequence continues from the same random state and samples the same tokens.

import { randomInt } from 'node:crypto';
import { Rng } from '../model/prng.js';
import type { FinishReason, GeneratedToken, GenerationRequest, TokenLogprob } from './protocol.js';
import { sample } from './sampling.js';

export interface SampleResult {
  /** The token to emit; null when the sampled token is a stop token (not emitted). */
  token: GeneratedToken | null;
  /** Set when the request is done after this sample. */
  finish: FinishReason | null;
}

export class RequestSampler {
  private readonly rng: Rng;
  private readonly stopIds: Set<number>;
  /** Generated-token counts, for the frequency and presence penalties. */
  private readonly outputCounts = new Map<number, number>();
  /** Prompt and generated tokens, for the repetition penalty. */
  private readonly seen = new Set<number>();
  private readonly penalized: boolean;
  private scratch: Float32Array | null = null;
  private generated = 0;

  /**
   * @param vocabLimit only ids below it are sampled and ranked: the tokenizer's ids, not
   *   the embedding's padding rows.
   * @param maxTokens the request's maxTokens, possibly lowered to what the context leaves.
   */
  constructor(
    readonly req: GenerationRequest,
    readonly vocabLimit: number,
    readonly maxTokens = req.maxTokens,
  ) {
    this.rng = new Rng(req.seed ?? randomInt(0x100000000));
    this.stopIds = new Set(req.stopTokenIds);
    const p = req.penalties;
    this.penalized = p.frequency !== 0 || p.presence !== 0 || p.repetition !== 1 || (p.logitBias?.length ?? 0) > 0;
    if (p.repetition !== 1) for (const id of req.promptTokens) this.seen.add(id);
  }

  get completionTokens(): number {
    return this.generated;
  }

  /** Samples from row `row` of `logits` (rows of `vocab` values). */
  next(logits: Float32Array, row: number, vocab: number): SampleResult {
    const n = Math.min(this.vocabLimit, vocab);
    const off = row * vocab;
    const raw = logits.subarray(off, off + n);
    const id = sample(this.penalized ? this.applyPenalties(raw) : raw, this.req.sampling, this.rng, 0, n);
    if (this.stopIds.has(id)) return { token: null, finish: 'stop' };
    const token: GeneratedToken = { id };
    if (this.req.logprobs !== null) Object.assign(token, logprobsOf(raw, id, this.req.logprobs));
    this.generated++;
    const c = this.outputCounts.get(id) ?? 0;
    this.outputCounts.set(id, c + 1);
    if (this.req.penalties.repetition !== 1) this.seen.add(id);
    return { token, finish: this.generated >= this.maxTokens ? 'length' : null };
  }

  /** A copy of the logits with the repetition penalty (HF), then frequency and presence, then the logit bias (OpenAI). */
  private applyPenalties(raw: Float32Array): Float32Array {
    if (!this.scratch || this.scratch.length !== raw.length) this.scratch = new Float32Array(raw.length);
    const l = this.scratch;
    l.set(raw);
    const { frequency, presence, repetition } = this.req.penalties;
    if (repetition !== 1) {
      for (const id of this.seen) {
        if (id >= l.length) continue;
        l[id] = l[id] > 0 ? l[id] / repetition : l[id] * repetition;
      }
    }
    if (frequency !== 0 || presence !== 0) {
      for (const [id, count] of this.outputCounts) {
        if (id < l.length) l[id] -= frequency * count + presence;
      }
    }
    for (const [id, bias] of this.req.penalties.logitBias ?? []) if (id < l.length) l[id] += bias;
    return l;
  }
}

/** Log-softmax of the raw logits: the chosen token's value and the k largest, largest first (ties: lower id). */
export function logprobsOf(logits: ArrayLike<number>, chosen: number, k: number): { logprob: number; top: TokenLogprob[] } {
  let max = -Infinity;
  for (let i = 0; i < logits.length; i++) if (logits[i] > max) max = logits[i];
  let sum = 0;
  for (let i = 0; i < logits.length; i++) sum += Math.exp(logits[i] - max);
  const logZ = max + Math.log(sum);
  // Insertion into a short sorted list: k is small (OpenAI allows up to 20).
  const top: TokenLogprob[] = [];
  if (k > 0) {
    for (let i = 0; i < logits.length; i++) {
      const v = logits[i];
      if (top.length === k && v <= top[k - 1].logprob) continue;
      let j = top.length;
      while (j > 0 && top[j - 1].logprob < v) j--;
      top.splice(j, 0, { id: i, logprob: v });
      if (top.length > k) top.pop();
    }
    for (const t of top) t.logprob -= logZ;
  }
  return { logprob: logits[chosen] - logZ, top };
}
