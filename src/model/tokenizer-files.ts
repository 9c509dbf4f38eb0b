// Builds the tokenizer files of a generated checkpoint: a byte-level BPE
// `tokenizer.json` (Hugging Face `tokenizers` format, GPT-2 / Qwen2 layout) trained on
// the built-in corpus, and a `tokenizer_config.json` with the special tokens and chat
// template conventions of the architecture's real model family.
//
// Layout of the ids: 0..255 are the byte symbols (GPT-2 order), then the learnt merges'
// tokens, then the architecture's added tokens. There is no normalizer, so any UTF-8
// text round-trips exactly through encode/decode.

import type { Architecture } from './spec.js';
import { BPE_CORPUS } from './bpe-corpus.js';
import { SPLIT_PATTERN, trainByteLevelBpe } from './bpe-trainer.js';

export interface TokenizerFiles {
  /** Contents of tokenizer.json. */
  tokenizerJson: Record<string, unknown>;
  /** Contents of tokenizer_config.json. */
  tokenizerConfig: Record<string, unknown>;
  specialTokens: { bos: number | null; eos: number[]; pad: number | null };
  /** Total number of ids, BPE vocabulary plus added tokens. */
  size: number;
}

interface AddedTokenSpec {
  content: string;
  special: boolean;
}

interface ArchTokenSpec {
  added: AddedTokenSpec[];
  bos: string | null;
  /** eos tokens; the first is tokenizer_config's eos_token, all end generation. */
  eos: string[];
  pad: string | null;
  unk: string | null;
  /** Prepend bos when encoding with special tokens (Llama/Mistral post-processor). */
  addBos: boolean;
  chatTemplate: string;
  tokenizerClass: string;
  modelMaxLength: number;
  extraConfig: Record<string, unknown>;
}

// ---------------------------------------------------------------------------------
// Chat templates (Jinja, rendered by transformers / @huggingface/jinja).

/** ChatML as used by Qwen1.5/Qwen2 chat models, with their default system prompt. */
const QWEN2_CHAT_TEMPLATE = [
  "{%- for message in messages %}",
  "{%- if loop.first and message['role'] != 'system' %}",
  "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}",
  "{%- endif %}",
  "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}",
  "{%- endfor %}",
  "{%- if add_generation_prompt %}",
  "{{- '<|im_start|>assistant\\n' }}",
  "{%- endif %}",
].join('\n');

/**
 * ChatML as used by Qwen3: no default system prompt; the reasoning part of earlier
 * assistant turns (everything up to `</think>`) is dropped; with
 * `enable_thinking=false` the generation prompt carries an empty think block.
 */
const QWEN3_CHAT_TEMPLATE = [
  "{%- for message in messages %}",
  "{%- set content = message['content'] %}",
  "{%- if message['role'] == 'assistant' and '</think>' in content %}",
  "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}",
  "{%- endif %}",
  "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}",
  "{%- endfor %}",
  "{%- if add_generation_prompt %}",
  "{{- '<|im_start|>assistant\\n' }}",
  "{%- if enable_thinking is defined and enable_thinking is false %}",
  "{{- '<think>\\n\\n</think>\\n\\n' }}",
  "{%- endif %}",
  "{%- endif %}",
].join('\n');

/**
 * Mistral instruct format: `<s>[INST] user [/INST] answer</s>[INST] ...`. A leading
 * system message is prepended to the first user turn; user/assistant must alternate.
 * The prompt already ends with `[/INST]`, so add_generation_prompt changes nothing.
 */
const MIXTRAL_CHAT_TEMPLATE = [
  "{%- if messages | length > 0 and messages[0]['role'] == 'system' %}",
  "{%- set system_message = messages[0]['content'] %}",
  "{%- set loop_messages = messages[1:] %}",
  "{%- else %}",
  "{%- set system_message = '' %}",
  "{%- set loop_messages = messages %}",
  "{%- endif %}",
  "{{- bos_token }}",
  "{%- for message in loop_messages %}",
  "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}",
  "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/... (after an optional leading system message)') }}",
  "{%- endif %}",
  "{%- if message['role'] == 'user' %}",
  "{%- if loop.first and system_message != '' %}",
  "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}",
  "{%- else %}",
  "{{- '[INST] ' + message['content'] + ' [/INST]' }}",
  "{%- endif %}",
  "{%- elif message['role'] == 'assistant' %}",
  "{{- ' ' + message['content'] + eos_token }}",
  "{%- else %}",
  "{{- raise_exception('Only system, user and assistant roles are supported') }}",
  "{%- endif %}",
  "{%- endfor %}",
].join('\n');

/** Tulu-style format of OLMoE-Instruct: `<|user|>\n...\n<|assistant|>\n...<|endoftext|>`. */
const OLMOE_CHAT_TEMPLATE = [
  "{{- bos_token }}",
  "{%- for message in messages %}",
  "{%- if message['role'] == 'system' %}",
  "{{- '<|system|>\\n' + message['content'] + '\\n' }}",
  "{%- elif message['role'] == 'user' %}",
  "{{- '<|user|>\\n' + message['content'] + '\\n' }}",
  "{%- elif message['role'] == 'assistant' %}",
  "{{- '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}",
  "{%- else %}",
  "{{- raise_exception('Unknown message role: ' + message['role']) }}",
  "{%- endif %}",
  "{%- endfor %}",
  "{%- if add_generation_prompt %}",
  "{{- '<|assistant|>\\n' }}",
  "{%- endif %}",
].join('\n');

const QWEN_ADDED: AddedTokenSpec[] = [
  { content: '<|endoftext|>', special: true },
  { content: '<|im_start|>', special: true },
  { content: '<|im_end|>', special: true },
];

const ARCH_TOKENS: Record<Architecture, ArchTokenSpec> = {
  mixtral: {
    added: [
      { content: '<unk>', special: true },
      { content: '<s>', special: true },
      { content: '</s>', special: true },
      { content: '[INST]', special: true },
      { content: '[/INST]', special: true },
    ],
    bos: '<s>',
    eos: ['</s>'],
    pad: null,
    unk: '<unk>',
    addBos: true,
    chatTemplate: MIXTRAL_CHAT_TEMPLATE,
    tokenizerClass: 'LlamaTokenizer',
    modelMaxLength: 32768,
    extraConfig: { legacy: false, spaces_between_special_tokens: false, use_default_system_prompt: false },
  },
  qwen2_moe: {
    added: QWEN_ADDED,
    bos: null,
    eos: ['<|im_end|>', '<|endoftext|>'],
    pad: '<|endoftext|>',
    unk: null,
    addBos: false,
    chatTemplate: QWEN2_CHAT_TEMPLATE,
    tokenizerClass: 'Qwen2Tokenizer',
    modelMaxLength: 32768,
    extraConfig: { errors: 'replace', split_special_tokens: false },
  },
  qwen3_moe: {
    added: [
      ...QWEN_ADDED,
      { content: '<think>', special: false },
      { content: '</think>', special: false },
    ],
    bos: null,
    eos: ['<|im_end|>', '<|endoftext|>'],
    pad: '<|endoftext|>',
    unk: null,
    addBos: false,
    chatTemplate: QWEN3_CHAT_TEMPLATE,
    tokenizerClass: 'Qwen2Tokenizer',
    modelMaxLength: 40960,
    extraConfig: { errors: 'replace', split_special_tokens: false },
  },
  olmoe: {
    added: [
      { content: '<|endoftext|>', special: true },
      { content: '<|padding|>', special: true },
      { content: '<|system|>', special: false },
      { content: '<|user|>', special: false },
      { content: '<|assistant|>', special: false },
    ],
    bos: '<|endoftext|>',
    eos: ['<|endoftext|>'],
    pad: '<|padding|>',
    unk: null,
    addBos: false,
    chatTemplate: OLMOE_CHAT_TEMPLATE,
    tokenizerClass: 'GPTNeoXTokenizer',
    modelMaxLength: 4096,
    extraConfig: {},
  },
};

// ---------------------------------------------------------------------------------

const trained = new Map<number, ReturnType<typeof trainByteLevelBpe>>();

/** Trains (once per numMerges within a process) on the built-in corpus. */
function trainedBpe(numMerges: number): ReturnType<typeof trainByteLevelBpe> {
  let t = trained.get(numMerges);
  if (!t) {
    t = trainByteLevelBpe(BPE_CORPUS, numMerges);
    trained.set(numMerges, t);
  }
  return t;
}

const BYTE_LEVEL = { type: 'ByteLevel', add_prefix_space: false, trim_offsets: false, use_regex: false };

/**
 * Builds tokenizer.json / tokenizer_config.json for a generated checkpoint of `arch`.
 * Deterministic for the same inputs; BPE training is memoised per numMerges. If the
 * corpus runs out of pairs, fewer than numMerges merges are learnt (about 4,400 max).
 */
export function buildTokenizerFiles(arch: Architecture, opts: { numMerges: number }): TokenizerFiles {
  const spec = ARCH_TOKENS[arch];
  if (!spec) throw new Error(`buildTokenizerFiles: unknown architecture '${String(arch)}'`);
  const { vocab, merges } = trainedBpe(opts.numMerges);

  const vocabObj: Record<string, number> = {};
  let next = 0;
  for (const [tok, id] of vocab) {
    vocabObj[tok] = id;
    next = Math.max(next, id + 1);
  }

  const ids = new Map<string, number>();
  const addedTokens = spec.added.map(({ content, special }) => {
    const id = next++;
    ids.set(content, id);
    return { id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special };
  });
  const idOf = (s: string): number => {
    const id = ids.get(s);
    if (id === undefined) throw new Error(`internal: token ${s} not among the added tokens of ${arch}`);
    return id;
  };

  let postProcessor: Record<string, unknown> = { ...BYTE_LEVEL };
  if (spec.addBos && spec.bos !== null) {
    const bos = spec.bos;
    postProcessor = {
      type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [
        { SpecialToken: { id: bos, type_id: 0 } },
        { Sequence: { id: 'A', type_id: 0 } },
        { SpecialToken: { id: bos, type_id: 1 } },
        { Sequence: { id: 'B', type_id: 1 } },
      ],
      special_tokens: { [bos]: { id: bos, ids: [idOf(bos)], tokens: [bos] } },
    };
  }

  const tokenizerJson: Record<string, unknown> = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: addedTokens,
    normalizer: null,
    pre_tokenizer: {
      type: 'Sequence',
      pretokenizers: [
        { type: 'Split', pattern: { Regex: SPLIT_PATTERN }, behavior: 'Isolated', invert: false },
        { ...BYTE_LEVEL },
      ],
    },
    post_processor: postProcessor,
    decoder: { ...BYTE_LEVEL },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      vocab: vocabObj,
      merges: merges.map(([a, b]) => `${a} ${b}`),
    },
  };

  const addedTokensDecoder: Record<string, unknown> = {};
  for (const t of addedTokens) {
    addedTokensDecoder[String(t.id)] = {
      content: t.content,
      lstrip: false,
      normalized: false,
      rstrip: false,
      single_word: false,
      special: t.special,
    };
  }
  const additionalSpecial = spec.added
    .filter((t) => t.special && t.content !== spec.bos && !spec.eos.includes(t.content) && t.content !== spec.pad && t.content !== spec.unk)
    .map((t) => t.content);

  const tokenizerConfig: Record<string, unknown> = {
    add_bos_token: spec.addBos,
    add_eos_token: false,
    add_prefix_space: false,
    added_tokens_decoder: addedTokensDecoder,
    additional_special_tokens: additionalSpecial,
    bos_token: spec.bos,
    chat_template: spec.chatTemplate,
    clean_up_tokenization_spaces: false,
    eos_token: spec.eos[0],
    model_max_length: spec.modelMaxLength,
    pad_token: spec.pad,
    tokenizer_class: spec.tokenizerClass,
    unk_token: spec.unk,
    ...spec.extraConfig,
  };

  return {
    tokenizerJson,
    tokenizerConfig,
    specialTokens: {
      bos: spec.bos === null ? null : idOf(spec.bos),
      eos: spec.eos.map(idOf),
      pad: spec.pad === null ? null : idOf(spec.pad),
    },
    size: next,
  };
}
