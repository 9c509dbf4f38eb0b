// Shapes of the checkpoints the project generates, as data. A preset gives the
// architecture-independent shape; `archDefaults` adds what each family fixes.

import type { Architecture, ModelSpec } from './spec.js';

/** The shape fields a preset sets; vocabulary and special tokens come from the tokenizer. */
export type PresetShape = Omit<ModelSpec, 'arch' | 'vocabSize' | 'bosTokenId' | 'eosTokenIds' | 'gating' | 'qkNorm' | 'qkvBias'> & {
  /** BPE merges learned for the generated tokenizer. */
  bpeMerges: number;
  /** Embedding rows, when the real model's (padded past the tokenizer) are wanted; else the tokenizer's size rounded up to 64. */
  vocabSize?: number;
};

export interface Preset {
  description: string;
  shapes: Partial<Record<Architecture, PresetShape>>;
}

const tinyBase = {
  hiddenSize: 64,
  numLayers: 2,
  numHeads: 4,
  rmsNormEps: 1e-6,
  maxPositionEmbeddings: 512,
  tieWordEmbeddings: false,
  bpeMerges: 1000,
};

export const PRESETS: Record<string, Preset> = {
  tiny: {
    description: 'a few hundred thousand parameters per architecture, for tests',
    shapes: {
      mixtral: { ...tinyBase, numKvHeads: 2, headDim: 16, numExperts: 8, topK: 2, expertIntermediateSize: 96, sharedExpertIntermediateSize: 0, ropeTheta: 1e6 },
      qwen2_moe: { ...tinyBase, numKvHeads: 4, headDim: 16, numExperts: 16, topK: 4, expertIntermediateSize: 32, sharedExpertIntermediateSize: 128, ropeTheta: 1e6 },
      qwen3_moe: { ...tinyBase, numKvHeads: 2, headDim: 32, numExperts: 32, topK: 8, expertIntermediateSize: 32, sharedExpertIntermediateSize: 0, ropeTheta: 1e6 },
      olmoe: { ...tinyBase, numKvHeads: 4, headDim: 16, numExperts: 64, topK: 8, expertIntermediateSize: 32, sharedExpertIntermediateSize: 0, ropeTheta: 1e4 },
    },
  },
  demo: {
    description: 'the built-in demo model served by `npm start` (about 30M parameters)',
    shapes: {
      qwen3_moe: {
        hiddenSize: 256,
        numLayers: 4,
        numHeads: 8,
        numKvHeads: 2,
        headDim: 32,
        numExperts: 32,
        topK: 4,
        expertIntermediateSize: 128,
        sharedExpertIntermediateSize: 0,
        rmsNormEps: 1e-6,
        ropeTheta: 1e6,
        maxPositionEmbeddings: 4096,
        tieWordEmbeddings: false,
        bpeMerges: 4000,
      },
    },
  },
};

// Real models' shapes with fewer layers, for benchmarks: the bytes read per token per
// layer are the real model's, so decode speed scales to the full depth.
PRESETS['qwen3-30b-a3b-8l'] = {
  description: 'Qwen3-30B-A3B shape (hidden 2048, 128 experts, top-8, width 768, vocab 151936) with 8 of its 48 layers',
  shapes: {
    qwen3_moe: {
      hiddenSize: 2048,
      numLayers: 8,
      numHeads: 32,
      numKvHeads: 4,
      headDim: 128,
      numExperts: 128,
      topK: 8,
      expertIntermediateSize: 768,
      sharedExpertIntermediateSize: 0,
      rmsNormEps: 1e-6,
      ropeTheta: 1e6,
      maxPositionEmbeddings: 40960,
      tieWordEmbeddings: false,
      bpeMerges: 4000,
      vocabSize: 151936,
    },
  },
};
PRESETS['mixtral-8x7b-2l'] = {
  description: 'Mixtral-8x7B shape (hidden 4096, 8 experts, top-2, width 14336, vocab 32000) with 2 of its 32 layers',
  shapes: {
    mixtral: {
      hiddenSize: 4096,
      numLayers: 2,
      numHeads: 32,
      numKvHeads: 8,
      headDim: 128,
      numExperts: 8,
      topK: 2,
      expertIntermediateSize: 14336,
      sharedExpertIntermediateSize: 0,
      rmsNormEps: 1e-5,
      ropeTheta: 1e6,
      maxPositionEmbeddings: 32768,
      tieWordEmbeddings: false,
      bpeMerges: 4000,
      vocabSize: 32000,
    },
  },
};

export function presetShape(preset: string, arch: Architecture): PresetShape {
  const p = PRESETS[preset];
  if (!p) throw new Error(`unknown preset "${preset}"; presets: ${Object.keys(PRESETS).join(', ')}`);
  const shape = p.shapes[arch];
  if (!shape) {
    throw new Error(`preset "${preset}" has no ${arch} shape; it has: ${Object.keys(p.shapes).join(', ')}`);
  }
  return shape;
}
