// Autoregressive generation of one sequence on any model runner (the native engine,
// or the reference pass as the oracle). The server's engine loop does the same for
// many sequences at once; this is the single-stream path of the CLI.

import { ReferenceModel } from '../model/reference.js';
import { Rng } from '../model/prng.js';
import { ReferenceRunner, type ModelRunner } from './runner.js';
import { sample, type SamplingParams } from './sampling.js';

export interface GenerateOptions {
  maxTokens: number;
  sampling: SamplingParams;
  seed: number;
  /** Token ids that end generation (not emitted). */
  stopIds: number[];
  /** Only ids below this are sampled: the tokenizer's ids, not the embedding's padding rows. */
  vocabLimit?: number;
}

export type FinishReason = 'stop' | 'length';

/** Yields generated token ids; returns why it stopped. */
export function* generateTokens(model: ReferenceModel | ModelRunner, promptIds: number[], opts: GenerateOptions): Generator<number, FinishReason> {
  if (promptIds.length === 0) throw new Error('the prompt is empty');
  const spec = model.spec;
  const total = Math.min(spec.maxPositionEmbeddings, promptIds.length + opts.maxTokens);
  const runner =
    model instanceof ReferenceModel ? new ReferenceRunner(model, { blockSize: 16, numBlocks: Math.ceil(total / 16) }) : model;
  const need = Math.ceil(total / runner.kv.blockSize);
  if (need > runner.kv.numBlocks) throw new Error(`the KV cache holds ${runner.kv.numBlocks} blocks; this generation needs ${need}`);
  const blockTable = Int32Array.from({ length: need }, (_, i) => i);
  const vocab = spec.vocabSize;
  const limit = Math.min(vocab, opts.vocabLimit ?? vocab);
  const rng = new Rng(opts.seed);
  const seqId = 0;
  try {
    let pos = 0;
    let fresh = Uint32Array.from(promptIds);
    for (let i = 0; i < opts.maxTokens; i++) {
      if (pos + fresh.length > spec.maxPositionEmbeddings) return 'length';
      const { logits } = runner.step([{ seqId, tokens: fresh, startPos: pos, blockTable, wantLogits: true }]);
      pos += fresh.length;
      const id = sample(logits, opts.sampling, rng, 0, limit);
      if (opts.stopIds.includes(id)) return 'stop';
      yield id;
      fresh = Uint32Array.of(id);
    }
    return 'length';
  } finally {
    runner.release(seqId);
  }
}
