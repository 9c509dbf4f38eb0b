// Tensor names and shapes of each architecture, exactly as Hugging Face transformers
// names them in checkpoints. Linear weights are [out_features, in_features].

import type { ModelSpec } from './spec.js';

export interface TensorShape {
  name: string;
  shape: number[];
  /** What the tensor is, for initialisation and for splitting expert / non-expert bytes. */
  role: 'embed' | 'norm' | 'linear' | 'bias' | 'router' | 'expert' | 'lm_head';
  /** Input width of a linear layer (its fan-in); 0 otherwise. */
  fanIn: number;
}

/** Names of one layer's tensors; `expert(j)` gives the three SwiGLU matrices of routed expert j. */
export interface LayerNames {
  inputNorm: string;
  postAttnNorm: string;
  q: string;
  k: string;
  v: string;
  o: string;
  qBias: string | null;
  kBias: string | null;
  vBias: string | null;
  qNorm: string | null;
  kNorm: string | null;
  router: string;
  expert(j: number): { gate: string; up: string; down: string };
  shared: { gate: string; up: string; down: string; gateScalar: string } | null;
}

export function layerNames(s: ModelSpec, l: number): LayerNames {
  const p = `model.layers.${l}`;
  const moe = s.arch === 'mixtral' ? `${p}.block_sparse_moe` : `${p}.mlp`;
  const bias = s.qkvBias;
  return {
    inputNorm: `${p}.input_layernorm.weight`,
    postAttnNorm: `${p}.post_attention_layernorm.weight`,
    q: `${p}.self_attn.q_proj.weight`,
    k: `${p}.self_attn.k_proj.weight`,
    v: `${p}.self_attn.v_proj.weight`,
    o: `${p}.self_attn.o_proj.weight`,
    qBias: bias ? `${p}.self_attn.q_proj.bias` : null,
    kBias: bias ? `${p}.self_attn.k_proj.bias` : null,
    vBias: bias ? `${p}.self_attn.v_proj.bias` : null,
    qNorm: s.qkNorm === 'none' ? null : `${p}.self_attn.q_norm.weight`,
    kNorm: s.qkNorm === 'none' ? null : `${p}.self_attn.k_norm.weight`,
    router: `${moe}.gate.weight`,
    expert: (j: number) =>
      s.arch === 'mixtral'
        ? { gate: `${moe}.experts.${j}.w1.weight`, up: `${moe}.experts.${j}.w3.weight`, down: `${moe}.experts.${j}.w2.weight` }
        : {
            gate: `${moe}.experts.${j}.gate_proj.weight`,
            up: `${moe}.experts.${j}.up_proj.weight`,
            down: `${moe}.experts.${j}.down_proj.weight`,
          },
    shared:
      s.sharedExpertIntermediateSize > 0
        ? {
            gate: `${moe}.shared_expert.gate_proj.weight`,
            up: `${moe}.shared_expert.up_proj.weight`,
            down: `${moe}.shared_expert.down_proj.weight`,
            gateScalar: `${moe}.shared_expert_gate.weight`,
          }
        : null,
  };
}

export const EMBED = 'model.embed_tokens.weight';
export const FINAL_NORM = 'model.norm.weight';
export const LM_HEAD = 'lm_head.weight';

/** Every tensor of a checkpoint, in the order transformers would save them. */
export function checkpointTensors(s: ModelSpec): TensorShape[] {
  const h = s.hiddenSize;
  const q = s.numHeads * s.headDim;
  const kv = s.numKvHeads * s.headDim;
  const out: TensorShape[] = [{ name: EMBED, shape: [s.vocabSize, h], role: 'embed', fanIn: 0 }];
  for (let l = 0; l < s.numLayers; l++) {
    const n = layerNames(s, l);
    out.push({ name: n.inputNorm, shape: [h], role: 'norm', fanIn: 0 });
    out.push({ name: n.q, shape: [q, h], role: 'linear', fanIn: h });
    if (n.qBias) out.push({ name: n.qBias, shape: [q], role: 'bias', fanIn: 0 });
    out.push({ name: n.k, shape: [kv, h], role: 'linear', fanIn: h });
    if (n.kBias) out.push({ name: n.kBias, shape: [kv], role: 'bias', fanIn: 0 });
    out.push({ name: n.v, shape: [kv, h], role: 'linear', fanIn: h });
    if (n.vBias) out.push({ name: n.vBias, shape: [kv], role: 'bias', fanIn: 0 });
    out.push({ name: n.o, shape: [h, q], role: 'linear', fanIn: q });
    if (n.qNorm && n.kNorm) {
      const qn = s.qkNorm === 'per_head' ? s.headDim : q;
      const kn = s.qkNorm === 'per_head' ? s.headDim : kv;
      out.push({ name: n.qNorm, shape: [qn], role: 'norm', fanIn: 0 });
      out.push({ name: n.kNorm, shape: [kn], role: 'norm', fanIn: 0 });
    }
    out.push({ name: n.postAttnNorm, shape: [h], role: 'norm', fanIn: 0 });
    out.push({ name: n.router, shape: [s.numExperts, h], role: 'router', fanIn: h });
    const w = s.expertIntermediateSize;
    for (let j = 0; j < s.numExperts; j++) {
      const e = n.expert(j);
      out.push({ name: e.gate, shape: [w, h], role: 'expert', fanIn: h });
      out.push({ name: e.up, shape: [w, h], role: 'expert', fanIn: h });
      out.push({ name: e.down, shape: [h, w], role: 'expert', fanIn: w });
    }
    if (n.shared) {
      const sw = s.sharedExpertIntermediateSize;
      out.push({ name: n.shared.gate, shape: [sw, h], role: 'linear', fanIn: h });
      out.push({ name: n.shared.up, shape: [sw, h], role: 'linear', fanIn: h });
      out.push({ name: n.shared.down, shape: [h, sw], role: 'linear', fanIn: sw });
      out.push({ name: n.shared.gateScalar, shape: [1, h], role: 'linear', fanIn: h });
    }
  }
  out.push({ name: FINAL_NORM, shape: [h], role: 'norm', fanIn: 0 });
  if (!s.tieWordEmbeddings) out.push({ name: LM_HEAD, shape: [s.vocabSize, h], role: 'lm_head', fanIn: h });
  return out;
}
