// Autoregressive generation on one sequence with the reference forward pass. The
// native engine replaces the model behind this loop; the loop stays.

import type { ReferenceModel } from '../model/reference.js';
import { Rng } from '../model/prng.js';
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
export function* generateTokens(model: ReferenceModel, promptIds: number[], opts: GenerateOptions): Generator<number, FinishReason> {
  if (promptIds.length === 0) throw new Error('the prompt is empty');
  const vocab = model.spec.vocabSize;
  const cache = model.newCache();
  const rng = new Rng(opts.seed);
  let logits = model.forward(promptIds, cache);
  let last = promptIds.length - 1;
  for (let i = 0; i < opts.maxTokens; i++) {
    if (cache.length >= model.spec.maxPositionEmbeddings) return 'length';
    const id = sample(logits, opts.sampling, rng, last * vocab, Math.min(vocab, opts.vocabLimit ?? vocab));
    if (opts.stopIds.includes(id)) return 'stop';
    yield id;
    if (i + 1 === opts.maxTokens) break;
    logits = model.forward([id], cache);
    last = 0;
  }
  return 'length';
}
