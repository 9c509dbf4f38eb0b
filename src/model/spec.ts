// The normalised model spec: one validated description of any supported MoE
// checkpoint, whatever its architecture's config.json calls the fields.

export const ARCHITECTURES = ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe'] as const;
export type Architecture = (typeof ARCHITECTURES)[number];

/** The Hugging Face `architectures[0]` class name of each architecture. */
export const HF_CLASS: Record<Architecture, string> = {
  mixtral: 'MixtralForCausalLM',
  qwen2_moe: 'Qwen2MoeForCausalLM',
  qwen3_moe: 'Qwen3MoeForCausalLM',
  olmoe: 'OlmoeForCausalLM',
};

/**
 * How router logits become the k gate weights of a token.
 * - `softmax_topk_renorm`: softmax over all experts, keep top-k, renormalise to sum 1
 *   (identical to a softmax over the top-k logits: Mixtral; Qwen3 / OLMoE with norm_topk_prob).
 * - `softmax_topk`: softmax over all experts, keep top-k as they are (Qwen2-MoE, OLMoE default).
 */
export type GatingRule = 'softmax_topk_renorm' | 'softmax_topk';

/**
 * Where q/k RMSNorm is applied, if anywhere.
 * - `none`: Mixtral, Qwen2-MoE.
 * - `per_head`: one weight of head_dim, applied to each head (Qwen3-MoE).
 * - `full`: one weight over the whole projection, n_heads * head_dim (OLMoE).
 */
export type QkNorm = 'none' | 'per_head' | 'full';

export interface ModelSpec {
  arch: Architecture;
  vocabSize: number;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  numExperts: number;
  topK: number;
  /** Width of each routed expert's SwiGLU FFN. */
  expertIntermediateSize: number;
  /** Width of the always-on shared expert (Qwen2-MoE); 0 when there is none. */
  sharedExpertIntermediateSize: number;
  gating: GatingRule;
  qkNorm: QkNorm;
  /** Bias on the q, k and v projections (Qwen2-MoE always; others by `attention_bias`). */
  qkvBias: boolean;
  rmsNormEps: number;
  ropeTheta: number;
  maxPositionEmbeddings: number;
  tieWordEmbeddings: boolean;
  bosTokenId: number | null;
  /** Token ids that end generation. */
  eosTokenIds: number[];
}

/** Bytes of weights split into routed experts and everything else (at `bytesPerParam`). */
export interface ParamCounts {
  expertParams: number;
  nonExpertParams: number;
  perExpertParams: number;
}

export function paramCounts(s: ModelSpec): ParamCounts {
  const h = s.hiddenSize;
  const perExpert = 3 * h * s.expertIntermediateSize;
  const q = s.numHeads * s.headDim;
  const kv = s.numKvHeads * s.headDim;
  let attn = h * q + 2 * h * kv + q * h;
  if (s.qkvBias) attn += q + 2 * kv;
  if (s.qkNorm === 'per_head') attn += 2 * s.headDim;
  if (s.qkNorm === 'full') attn += q + kv;
  let layerNonExpert = attn + 2 * h + s.numExperts * h;
  if (s.sharedExpertIntermediateSize > 0) layerNonExpert += 3 * h * s.sharedExpertIntermediateSize + h;
  const embed = s.vocabSize * h;
  const nonExpert = s.numLayers * layerNonExpert + embed + h + (s.tieWordEmbeddings ? 0 : embed);
  return {
    expertParams: s.numLayers * s.numExperts * perExpert,
    nonExpertParams: nonExpert,
    perExpertParams: perExpert,
  };
}
