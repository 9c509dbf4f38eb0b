// config.json of each supported architecture ⇄ the normalised ModelSpec.
// Field names are those of Hugging Face transformers' configuration classes.

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ARCHITECTURES, HF_CLASS, type Architecture, type ModelSpec } from './spec.js';

export class ModelConfigError extends Error {
  constructor(
    message: string,
    readonly field: string | null = null,
  ) {
    super(message);
    this.name = 'ModelConfigError';
  }
}

const MODEL_TYPE: Record<Architecture, string> = {
  mixtral: 'mixtral',
  qwen2_moe: 'qwen2_moe',
  qwen3_moe: 'qwen3_moe',
  olmoe: 'olmoe',
};

type Json = Record<string, unknown>;

function archOf(cfg: Json): Architecture {
  const classes = cfg.architectures;
  const modelType = cfg.model_type;
  for (const a of ARCHITECTURES) {
    if (Array.isArray(classes) && classes[0] === HF_CLASS[a]) return a;
  }
  for (const a of ARCHITECTURES) {
    if (modelType === MODEL_TYPE[a]) return a;
  }
  const named = Array.isArray(classes) ? String(classes[0]) : String(modelType);
  throw new ModelConfigError(
    `unsupported architecture ${named}; supported: ${ARCHITECTURES.map((a) => `${HF_CLASS[a]} (${a})`).join(', ')}`,
    'architectures',
  );
}

class FieldReader {
  constructor(
    private readonly cfg: Json,
    private readonly file: string,
  ) {}

  int(name: string, opts: { min?: number; default?: number } = {}): number {
    const v = this.cfg[name];
    if (v === undefined || v === null) {
      if (opts.default !== undefined) return opts.default;
      throw new ModelConfigError(`${this.file}: missing field "${name}"`, name);
    }
    if (typeof v !== 'number' || !Number.isInteger(v)) {
      throw new ModelConfigError(`${this.file}: field "${name}" must be an integer, got ${JSON.stringify(v)}`, name);
    }
    const min = opts.min ?? 1;
    if (v < min) throw new ModelConfigError(`${this.file}: field "${name}" must be >= ${min}, got ${v}`, name);
    return v;
  }

  num(name: string, opts: { default?: number; positive?: boolean } = {}): number {
    const v = this.cfg[name];
    if (v === undefined || v === null) {
      if (opts.default !== undefined) return opts.default;
      throw new ModelConfigError(`${this.file}: missing field "${name}"`, name);
    }
    if (typeof v !== 'number' || !Number.isFinite(v)) {
      throw new ModelConfigError(`${this.file}: field "${name}" must be a finite number, got ${JSON.stringify(v)}`, name);
    }
    if (opts.positive && v <= 0) throw new ModelConfigError(`${this.file}: field "${name}" must be > 0, got ${v}`, name);
    return v;
  }

  bool(name: string, def: boolean): boolean {
    const v = this.cfg[name];
    if (v === undefined || v === null) return def;
    if (typeof v !== 'boolean') {
      throw new ModelConfigError(`${this.file}: field "${name}" must be true or false, got ${JSON.stringify(v)}`, name);
    }
    return v;
  }

  tokenIds(name: string): number[] {
    const v = this.cfg[name];
    if (v === undefined || v === null) return [];
    const list = Array.isArray(v) ? v : [v];
    for (const id of list) {
      if (typeof id !== 'number' || !Number.isInteger(id) || id < 0) {
        throw new ModelConfigError(`${this.file}: field "${name}" must be a token id or a list of them, got ${JSON.stringify(v)}`, name);
      }
    }
    return list as number[];
  }

  /** Fields whose non-default values change the computation and that this engine does not implement. */
  rejectUnless(name: string, ok: (v: unknown) => boolean, why: string): void {
    const v = this.cfg[name];
    if (v !== undefined && !ok(v)) {
      throw new ModelConfigError(`${this.file}: unsupported value of "${name}": ${JSON.stringify(v)} (${why})`, name);
    }
  }
}

const isNullish = (v: unknown) => v === null || v === undefined;

/** Normalise a parsed config.json into a validated spec. `file` names the source in errors. */
export function specFromHfConfig(cfg: unknown, file = 'config.json'): ModelSpec {
  if (typeof cfg !== 'object' || cfg === null || Array.isArray(cfg)) {
    throw new ModelConfigError(`${file}: expected a JSON object`);
  }
  const c = cfg as Json;
  const arch = archOf(c);
  const r = new FieldReader(c, file);

  const hiddenSize = r.int('hidden_size');
  const numHeads = r.int('num_attention_heads');
  const numKvHeads = r.int('num_key_value_heads', { default: numHeads });
  if (numHeads % numKvHeads !== 0) {
    throw new ModelConfigError(
      `${file}: num_attention_heads (${numHeads}) must be a multiple of num_key_value_heads (${numKvHeads})`,
      'num_key_value_heads',
    );
  }
  const defaultHeadDim = Math.floor(hiddenSize / numHeads);
  const headDim = r.int('head_dim', { default: defaultHeadDim });
  if (headDim % 2 !== 0) throw new ModelConfigError(`${file}: head_dim must be even for rotary embeddings, got ${headDim}`, 'head_dim');

  r.rejectUnless('hidden_act', (v) => v === 'silu', 'only SwiGLU experts with silu are supported');
  r.rejectUnless('rope_scaling', isNullish, 'rope scaling is not implemented');
  r.rejectUnless('clip_qkv', isNullish, 'clip_qkv is not implemented');
  r.rejectUnless('mlp_only_layers', (v) => Array.isArray(v) && v.length === 0, 'every layer must be a MoE layer');
  r.rejectUnless('decoder_sparse_step', (v) => v === 1, 'every layer must be a MoE layer');
  r.rejectUnless('use_sliding_window', (v) => v === false, 'sliding-window attention is not implemented');

  const numExperts = arch === 'mixtral' ? r.int('num_local_experts') : r.int('num_experts');
  const topK = r.int('num_experts_per_tok');
  if (topK > numExperts) {
    throw new ModelConfigError(`${file}: num_experts_per_tok (${topK}) exceeds the number of experts (${numExperts})`, 'num_experts_per_tok');
  }
  const expertIntermediateSize = arch === 'mixtral' || arch === 'olmoe' ? r.int('intermediate_size') : r.int('moe_intermediate_size');
  const sharedExpertIntermediateSize = arch === 'qwen2_moe' ? r.int('shared_expert_intermediate_size') : 0;

  let normTopk: boolean;
  if (arch === 'mixtral') normTopk = true;
  else if (arch === 'qwen3_moe') normTopk = r.bool('norm_topk_prob', true);
  else normTopk = r.bool('norm_topk_prob', false);

  const eos = r.tokenIds('eos_token_id');
  const bos = r.tokenIds('bos_token_id');
  const vocabSize = r.int('vocab_size');
  for (const id of [...eos, ...bos]) {
    if (id >= vocabSize) throw new ModelConfigError(`${file}: special token id ${id} is outside vocab_size ${vocabSize}`, 'eos_token_id');
  }

  return {
    arch,
    vocabSize,
    hiddenSize,
    numLayers: r.int('num_hidden_layers'),
    numHeads,
    numKvHeads,
    headDim,
    numExperts,
    topK,
    expertIntermediateSize,
    sharedExpertIntermediateSize,
    gating: normTopk ? 'softmax_topk_renorm' : 'softmax_topk',
    qkNorm: arch === 'qwen3_moe' ? 'per_head' : arch === 'olmoe' ? 'full' : 'none',
    qkvBias: arch === 'qwen2_moe' ? true : r.bool('attention_bias', false),
    rmsNormEps: r.num('rms_norm_eps', { default: 1e-6, positive: true }),
    ropeTheta: r.num('rope_theta', { default: 10000, positive: true }),
    maxPositionEmbeddings: r.int('max_position_embeddings', { default: 4096 }),
    tieWordEmbeddings: r.bool('tie_word_embeddings', false),
    bosTokenId: bos.length > 0 ? bos[0] : null,
    eosTokenIds: eos,
  };
}

export function readModelSpec(dir: string): ModelSpec {
  const file = join(dir, 'config.json');
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new ModelConfigError(`cannot read ${file}: ${(e as Error).message}`);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (e) {
    throw new ModelConfigError(`${file} is not valid JSON: ${(e as Error).message}`);
  }
  return specFromHfConfig(parsed, file);
}

/** The config.json a Hugging Face checkpoint of this architecture carries. */
export function hfConfigFromSpec(s: ModelSpec, dtype: string): Json {
  const common: Json = {
    architectures: [HF_CLASS[s.arch]],
    model_type: MODEL_TYPE[s.arch],
    vocab_size: s.vocabSize,
    hidden_size: s.hiddenSize,
    num_hidden_layers: s.numLayers,
    num_attention_heads: s.numHeads,
    num_key_value_heads: s.numKvHeads,
    hidden_act: 'silu',
    max_position_embeddings: s.maxPositionEmbeddings,
    initializer_range: 0.02,
    rms_norm_eps: s.rmsNormEps,
    use_cache: true,
    rope_theta: s.ropeTheta,
    rope_scaling: null,
    attention_dropout: 0.0,
    tie_word_embeddings: s.tieWordEmbeddings,
    bos_token_id: s.bosTokenId,
    eos_token_id: s.eosTokenIds.length === 1 ? s.eosTokenIds[0] : s.eosTokenIds,
    num_experts_per_tok: s.topK,
    output_router_logits: false,
    router_aux_loss_coef: 0.001,
    torch_dtype: dtype,
    transformers_version: '4.51.0',
  };
  const normTopk = s.gating === 'softmax_topk_renorm';
  switch (s.arch) {
    case 'mixtral':
      return {
        ...common,
        head_dim: s.headDim,
        intermediate_size: s.expertIntermediateSize,
        num_local_experts: s.numExperts,
        sliding_window: null,
        router_jitter_noise: 0.0,
      };
    case 'qwen2_moe':
      return {
        ...common,
        intermediate_size: s.expertIntermediateSize * 4,
        moe_intermediate_size: s.expertIntermediateSize,
        shared_expert_intermediate_size: s.sharedExpertIntermediateSize,
        num_experts: s.numExperts,
        norm_topk_prob: normTopk,
        decoder_sparse_step: 1,
        mlp_only_layers: [],
        use_sliding_window: false,
        sliding_window: null,
        max_window_layers: s.numLayers,
      };
    case 'qwen3_moe':
      return {
        ...common,
        head_dim: s.headDim,
        attention_bias: s.qkvBias,
        intermediate_size: s.expertIntermediateSize * 4,
        moe_intermediate_size: s.expertIntermediateSize,
        num_experts: s.numExperts,
        norm_topk_prob: normTopk,
        decoder_sparse_step: 1,
        mlp_only_layers: [],
        use_sliding_window: false,
        sliding_window: null,
        max_window_layers: s.numLayers,
      };
    case 'olmoe':
      return {
        ...common,
        attention_bias: s.qkvBias,
        intermediate_size: s.expertIntermediateSize,
        num_experts: s.numExperts,
        norm_topk_prob: normTopk,
        clip_qkv: null,
        pad_token_id: s.eosTokenIds[0] ?? null,
      };
  }
}
