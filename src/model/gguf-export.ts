// Converts one of our Hugging Face checkpoint directories to the GGUF file llama.cpp
// loads for the same architecture: llama.cpp's architecture name and hyperparameter keys,
// its tokenizer metadata (byte-level BPE as "gpt2"), and its tensor names and layouts.
//
// Per-architecture facts this relies on (llama.cpp's model loaders and graph builders):
// - Mixtral is llama.cpp's "llama" architecture with experts. llama uses the "normal"
//   (interleaved pairs) rotary layout while transformers rotates halves, so the rows of
//   q_proj / k_proj (and their biases) are permuted within each head: the pair
//   (i, i + head_dim/2) becomes rows (2i, 2i + 1). Gate weights are renormalised.
// - qwen2moe, qwen3moe and olmoe use the NeoX (rotate-half) layout: no permutation.
// - qwen2moe: experts' width from expert_feed_forward_length, the shared expert's from
//   expert_shared_feed_forward_length; the shared expert's sigmoid gate is a 1-D [hidden]
//   vector; top-k weights are not renormalised.
// - qwen3moe: per-head q/k RMSNorm of [head_dim]; head_dim may differ from hidden/heads
//   (attention.key_length / value_length); top-k weights are renormalised.
// - olmoe: q/k RMSNorm over the whole projection; the experts' width is
//   feed_forward_length; top-k weights are not renormalised.
// Norm weights, biases and routers stay F32 whatever the requested type, as llama.cpp's
// converter keeps them; other matrices take the requested type (a quantized type falls
// back to F16 for rows that are not a multiple of the 32-value block).

import { readFileSync } from 'node:fs';
import { basename, join, resolve } from 'node:path';
import { openModel } from './checkpoint.js';
import { GgmlType, GgufValueType, GgufWriter, type GgufWriteSummary } from './gguf-writer.js';
import type { Architecture, ModelSpec } from './spec.js';
import { EMBED, FINAL_NORM, LM_HEAD, layerNames } from './tensor-names.js';

export const GGUF_EXPORT_TYPES = ['f32', 'f16', 'q8_0', 'q4_0'] as const;
export type GgufExportType = (typeof GGUF_EXPORT_TYPES)[number];

/** llama.cpp's architecture name of each of ours. */
export const LLAMACPP_ARCH: Record<Architecture, string> = {
  mixtral: 'llama',
  qwen2_moe: 'qwen2moe',
  qwen3_moe: 'qwen3moe',
  olmoe: 'olmoe',
};

/** Whether llama.cpp renormalises the top-k gate weights of each architecture (fixed per arch there). */
const LLAMACPP_RENORM: Record<Architecture, boolean> = {
  mixtral: true,
  qwen2_moe: false,
  qwen3_moe: true,
  olmoe: false,
};

const MAIN_TYPE: Record<GgufExportType, GgmlType> = {
  f32: GgmlType.F32,
  f16: GgmlType.F16,
  q8_0: GgmlType.Q8_0,
  q4_0: GgmlType.Q4_0,
};

/** general.file_type (llama_ftype): ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q4_0 2, MOSTLY_Q8_0 7. */
const FILE_TYPE: Record<GgufExportType, number> = { f32: 0, f16: 1, q4_0: 2, q8_0: 7 };

/** llama.cpp token types. */
const TOKEN_TYPE = { normal: 1, control: 3, userDefined: 4, unused: 5 } as const;

export class GgufExportError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'GgufExportError';
  }
}

export interface GgufExportResult extends GgufWriteSummary {
  arch: string;
  type: GgufExportType;
  /** Token list length (= the embedding's rows) and how many filler tokens padded it. */
  vocabSize: number;
  fillerTokens: number;
  /** Ways llama.cpp will run the file differently from the checkpoint's own semantics. */
  warnings: string[];
}

/**
 * Reorders the rows of a q or k projection (rows = heads * head_dim, `cols` per row) from
 * transformers' rotate-half layout to the interleaved-pairs layout: within each head,
 * row (j * head_dim/2 + i) moves to (2i + j), j ∈ {0, 1}.
 */
export function permuteRotaryRows(w: Float32Array, heads: number, headDim: number, cols: number): Float32Array {
  if (w.length !== heads * headDim * cols) throw new GgufExportError(`permute: ${w.length} values is not ${heads}×${headDim}×${cols}`);
  const half = headDim / 2;
  const out = new Float32Array(w.length);
  for (let h = 0; h < heads; h++) {
    for (let j = 0; j < 2; j++) {
      for (let i = 0; i < half; i++) {
        const src = (h * headDim + j * half + i) * cols;
        const dst = (h * headDim + 2 * i + j) * cols;
        out.set(w.subarray(src, src + cols), dst);
      }
    }
  }
  return out;
}

type Json = Record<string, unknown>;

function readJson(file: string): Json {
  try {
    const v = JSON.parse(readFileSync(file, 'utf8')) as unknown;
    if (typeof v === 'object' && v !== null && !Array.isArray(v)) return v as Json;
  } catch (e) {
    throw new GgufExportError(`cannot read ${file}: ${(e as Error).message}`);
  }
  throw new GgufExportError(`${file}: expected a JSON object`);
}

function tokenContent(v: unknown): string | null {
  if (typeof v === 'string') return v;
  if (typeof v === 'object' && v !== null && typeof (v as Json).content === 'string') return (v as Json).content as string;
  return null;
}

/** Checks shapes llama.cpp's loader of `arch` insists on. */
function checkSupported(s: ModelSpec): void {
  const qDim = s.numHeads * s.headDim;
  if ((s.arch === 'qwen2_moe' || s.arch === 'olmoe') && qDim !== s.hiddenSize) {
    throw new GgufExportError(
      `llama.cpp's ${LLAMACPP_ARCH[s.arch]} needs heads × head_dim = hidden_size, got ${s.numHeads} × ${s.headDim} != ${s.hiddenSize}`,
    );
  }
  if (s.arch === 'olmoe' && s.qkvBias) throw new GgufExportError("llama.cpp's olmoe has no q/k/v biases (attention_bias must be false)");
  if (s.qkNorm === 'full' && s.arch !== 'olmoe') throw new GgufExportError(`q/k norm over the full projection is only supported for olmoe`);
}

/**
 * Writes `outFile` from the checkpoint in `modelDir`. Tensors are read and written one at
 * a time (the largest, a stacked expert tensor, bounds the memory).
 */
export async function exportGguf(modelDir: string, outFile: string, type: GgufExportType = 'f16'): Promise<GgufExportResult> {
  if (!GGUF_EXPORT_TYPES.includes(type)) throw new GgufExportError(`unknown type ${String(type)}; types: ${GGUF_EXPORT_TYPES.join(', ')}`);
  const m = await openModel(modelDir);
  try {
    const s = m.spec;
    checkSupported(s);
    const arch = LLAMACPP_ARCH[s.arch];
    const warnings: string[] = [];
    const renorm = s.gating === 'softmax_topk_renorm';
    if (renorm !== LLAMACPP_RENORM[s.arch]) {
      warnings.push(
        `llama.cpp's ${arch} ${LLAMACPP_RENORM[s.arch] ? 'always renormalises' : 'never renormalises'} the top-k gate weights, ` +
          `but this checkpoint ${renorm ? 'does' : 'does not'} (norm_topk_prob): llama.cpp's outputs will differ`,
      );
    }
    const cfg = readJson(join(modelDir, 'config.json'));
    const tokCfg = readJson(join(modelDir, 'tokenizer_config.json'));
    const tokJson = readJson(join(modelDir, 'tokenizer.json'));

    const w = new GgufWriter();
    const k = (name: string) => `${arch}.${name}`;

    // ---- general
    w.addString('general.architecture', arch);
    w.addString('general.name', basename(resolve(modelDir)));
    w.addUint32('general.file_type', FILE_TYPE[type]);
    w.addUint32('general.quantization_version', 2);

    // ---- hyperparameters
    const cfgFfn = typeof cfg.intermediate_size === 'number' && Number.isInteger(cfg.intermediate_size) ? cfg.intermediate_size : null;
    // llama and olmoe take the experts' width from feed_forward_length; the Qwen MoEs
    // from expert_feed_forward_length (feed_forward_length is the dense-layer width).
    const ffn = s.arch === 'mixtral' || s.arch === 'olmoe' ? s.expertIntermediateSize : (cfgFfn ?? s.expertIntermediateSize);
    w.addUint32(k('vocab_size'), s.vocabSize);
    w.addUint32(k('context_length'), s.maxPositionEmbeddings);
    w.addUint32(k('embedding_length'), s.hiddenSize);
    w.addUint32(k('block_count'), s.numLayers);
    w.addUint32(k('feed_forward_length'), ffn);
    w.addUint32(k('attention.head_count'), s.numHeads);
    w.addUint32(k('attention.head_count_kv'), s.numKvHeads);
    w.addUint32(k('attention.key_length'), s.headDim);
    w.addUint32(k('attention.value_length'), s.headDim);
    w.addUint32(k('rope.dimension_count'), s.headDim);
    w.addFloat32(k('rope.freq_base'), s.ropeTheta);
    w.addFloat32(k('attention.layer_norm_rms_epsilon'), s.rmsNormEps);
    w.addUint32(k('expert_count'), s.numExperts);
    w.addUint32(k('expert_used_count'), s.topK);
    w.addUint32(k('expert_feed_forward_length'), s.expertIntermediateSize);
    if (s.sharedExpertIntermediateSize > 0) w.addUint32(k('expert_shared_feed_forward_length'), s.sharedExpertIntermediateSize);
    // Not read by llama.cpp for these architectures (each fixes it, see LLAMACPP_RENORM);
    // recorded so that the file says what the checkpoint does.
    w.addBool(k('expert_weights_norm'), renorm);

    // ---- tokenizer: byte-level BPE, ids padded with unused filler tokens up to vocab_size
    const tok = m.tokenizer;
    const tokens: string[] = [];
    const types: number[] = [];
    let fillers = 0;
    for (let id = 0; id < s.vocabSize; id++) {
      const t = tok.idToToken(id);
      if (t === undefined) {
        tokens.push(`[PAD${id}]`);
        types.push(TOKEN_TYPE.unused);
        fillers++;
      } else if (tok.isAddedTokenId(id)) {
        tokens.push(t);
        types.push(tok.isSpecialTokenId(id) ? TOKEN_TYPE.control : TOKEN_TYPE.userDefined);
      } else {
        tokens.push(t);
        types.push(TOKEN_TYPE.normal);
      }
    }
    const model = tokJson.model as Json | undefined;
    if (!model || model.type !== 'BPE') throw new GgufExportError(`${modelDir}/tokenizer.json: only BPE tokenizers are supported`);
    const rawMerges = Array.isArray(model.merges) ? model.merges : [];
    const merges = rawMerges.map((mg) => (Array.isArray(mg) ? mg.join(' ') : String(mg)));
    w.addString('tokenizer.ggml.model', 'gpt2');
    // Our generated tokenizers split text with Qwen2's pre-tokenizer pattern.
    w.addString('tokenizer.ggml.pre', 'qwen2');
    w.addArray('tokenizer.ggml.tokens', GgufValueType.STRING, tokens);
    w.addArray('tokenizer.ggml.token_type', GgufValueType.INT32, types);
    w.addArray('tokenizer.ggml.merges', GgufValueType.STRING, merges);
    const idOf = (field: string): number | null => {
      const c = tokenContent(tokCfg[field]);
      if (c === null) return null;
      return tok.tokenToId(c) ?? null;
    };
    const bos = s.bosTokenId ?? idOf('bos_token');
    const eos = idOf('eos_token') ?? s.eosTokenIds[0] ?? null;
    const pad = idOf('pad_token');
    const unk = idOf('unk_token');
    if (bos !== null) w.addUint32('tokenizer.ggml.bos_token_id', bos);
    if (eos !== null) w.addUint32('tokenizer.ggml.eos_token_id', eos);
    if (unk !== null) w.addUint32('tokenizer.ggml.unknown_token_id', unk);
    if (pad !== null) w.addUint32('tokenizer.ggml.padding_token_id', pad);
    w.addBool('tokenizer.ggml.add_bos_token', tokCfg.add_bos_token === true);
    w.addBool('tokenizer.ggml.add_eos_token', tokCfg.add_eos_token === true);
    if (tok.chatTemplate !== undefined) w.addString('tokenizer.chat_template', tok.chatTemplate);

    // ---- tensors
    const main = MAIN_TYPE[type];
    // The writer encodes each tensor before it asks for the next, so the values of every
    // tensor go through one reused buffer: allocating a fresh array per tensor made the
    // export of a 5 GB checkpoint several times slower on virtual machines where first
    // touches of fresh memory are slow.
    let scratch = new Float32Array(0);
    const buffer = (n: number): Float32Array => {
      if (scratch.length < n) {
        scratch = new Float32Array(0); // the old one can go before the new one is made
        scratch = new Float32Array(n);
      }
      return scratch.subarray(0, n);
    };
    const count = (name: string) => m.weights.info(name).shape.reduce((a, b) => a * b, 1);
    const f32 = (name: string) => () => {
      const out = buffer(count(name));
      m.weights.float32Into(name, out);
      return out;
    };
    /** The stored type of a matrix: `main`, or F16 when its rows do not fill quantization blocks. */
    // 4-bit applies to the experts (routed and shared) only; the dense matrices (embeddings,
    // attention, output) are Q8_0, as the engine holds them (see denseFormat).
    const dense = main === GgmlType.Q4_0 ? GgmlType.Q8_0 : main;
    const matType = (rowLen: number, t: GgmlType): GgmlType => (t === GgmlType.Q8_0 || t === GgmlType.Q4_0) && rowLen % 32 !== 0 ? GgmlType.F16 : t;
    const matrix = (gg: string, shape: number[], src: () => Float32Array) => w.addTensor(gg, shape, matType(shape[shape.length - 1], dense), src);
    const expertMatrix = (gg: string, shape: number[], src: () => Float32Array) => w.addTensor(gg, shape, matType(shape[shape.length - 1], main), src);
    const vector = (gg: string, shape: number[], src: () => Float32Array) => w.addTensor(gg, shape, GgmlType.F32, src);

    const h = s.hiddenSize;
    const hd = s.headDim;
    const qDim = s.numHeads * hd;
    const kvDim = s.numKvHeads * hd;
    const interleave = s.arch === 'mixtral';
    const rotary = (name: string, heads: number, cols: number) => () => {
      const v = m.weights.float32(name);
      return interleave ? permuteRotaryRows(v, heads, hd, cols) : v;
    };
    const stack = (names: string[], rows: number, cols: number) => () => {
      const out = buffer(names.length * rows * cols);
      names.forEach((n, j) => m.weights.float32Into(n, out, j * rows * cols));
      return out;
    };

    matrix('token_embd.weight', [s.vocabSize, h], f32(EMBED));
    for (let l = 0; l < s.numLayers; l++) {
      const n = layerNames(s, l);
      const b = `blk.${l}`;
      vector(`${b}.attn_norm.weight`, [h], f32(n.inputNorm));
      matrix(`${b}.attn_q.weight`, [qDim, h], rotary(n.q, s.numHeads, h));
      if (n.qBias) vector(`${b}.attn_q.bias`, [qDim], rotary(n.qBias, s.numHeads, 1));
      matrix(`${b}.attn_k.weight`, [kvDim, h], rotary(n.k, s.numKvHeads, h));
      if (n.kBias) vector(`${b}.attn_k.bias`, [kvDim], rotary(n.kBias, s.numKvHeads, 1));
      matrix(`${b}.attn_v.weight`, [kvDim, h], f32(n.v));
      if (n.vBias) vector(`${b}.attn_v.bias`, [kvDim], f32(n.vBias));
      matrix(`${b}.attn_output.weight`, [h, qDim], f32(n.o));
      if (n.qNorm && n.kNorm) {
        const full = s.qkNorm === 'full';
        vector(`${b}.attn_q_norm.weight`, [full ? qDim : hd], f32(n.qNorm));
        vector(`${b}.attn_k_norm.weight`, [full ? kvDim : hd], f32(n.kNorm));
      }
      vector(`${b}.ffn_norm.weight`, [h], f32(n.postAttnNorm));
      // Routers stay F32 (llama.cpp's converter keeps ffn_gate_inp in F32).
      w.addTensor(`${b}.ffn_gate_inp.weight`, [s.numExperts, h], GgmlType.F32, f32(n.router));
      const E = s.numExperts;
      const width = s.expertIntermediateSize;
      const experts = Array.from({ length: E }, (_, j) => n.expert(j));
      expertMatrix(`${b}.ffn_gate_exps.weight`, [E, width, h], stack(experts.map((e) => e.gate), width, h));
      expertMatrix(`${b}.ffn_up_exps.weight`, [E, width, h], stack(experts.map((e) => e.up), width, h));
      expertMatrix(`${b}.ffn_down_exps.weight`, [E, h, width], stack(experts.map((e) => e.down), h, width));
      if (n.shared) {
        const sw = s.sharedExpertIntermediateSize;
        w.addTensor(`${b}.ffn_gate_inp_shexp.weight`, [h], GgmlType.F32, f32(n.shared.gateScalar));
        expertMatrix(`${b}.ffn_gate_shexp.weight`, [sw, h], f32(n.shared.gate));
        expertMatrix(`${b}.ffn_up_shexp.weight`, [sw, h], f32(n.shared.up));
        expertMatrix(`${b}.ffn_down_shexp.weight`, [h, sw], f32(n.shared.down));
      }
    }
    vector('output_norm.weight', [h], f32(FINAL_NORM));
    // llama and qwen3moe fall back to token_embd when output is missing; qwen2moe and olmoe
    // require it, so a tied head is written out as a copy there.
    if (!s.tieWordEmbeddings) matrix('output.weight', [s.vocabSize, h], f32(LM_HEAD));
    else if (s.arch === 'qwen2_moe' || s.arch === 'olmoe') matrix('output.weight', [s.vocabSize, h], f32(EMBED));

    const summary = w.write(outFile);
    return { ...summary, arch, type, vocabSize: s.vocabSize, fillerTokens: fillers, warnings };
  } finally {
    m.close();
  }
}
