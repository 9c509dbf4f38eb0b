// Shapes of the checkpoints the project generates, as data. A preset gives the
// architecture-independent shape; `archDefaults` adds what each family fixes.

import type { Architecture, ModelSpec } from './spec.js';

/** The shape fields a preset sets; vocabulary and special tokens come from the tokenizer. */
export type PresetShape = Omit<ModelSpec, 'arch' | 'vocabSize' | 'bosTokenId' | 'eosTokenIds' | 'gating' | 'qkNorm' | 'qkvBias'> & {
  /** BPE merges learned for the generated tokenizer. */
  bpeMerges: number;
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

export function presetShape(preset: string, arch: Architecture): PresetShape {
  const p = PRESETS[preset];
  if (!p) throw new Error(`unknown preset "${preset}"; presets: ${Object.keys(PRESETS).join(', ')}`);
  const shape = p.shapes[arch];
  if (!shape) {
    throw new Error(`preset "${preset}" has no ${arch} shape; it has: ${Object.keys(p.shapes).join(', ')}`);
  }
  return shape;
}
