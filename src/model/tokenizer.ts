// The tokenizer of a checkpoint: Hugging Face tokenizer.json + tokenizer_config.json,
// run by @huggingface/tokenizers, plus chat templates rendered by @huggingface/jinja
// and an incremental decoder for streaming.
//
// Special-token strings inside text: like Hugging Face `tokenizers` (and transformers
// with split_special_tokens=false), `encode` recognises every added token's content in
// the input, so a user typing "<|im_end|>" is encoded as the single <|im_end|> id, not
// as its characters. This is what the chat-template path needs (the rendered prompt
// contains the markers as text). Callers that must not let user text inject control
// tokens have to escape or strip those strings before templating.

import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';
import { BYTE_TO_UNICODE } from './bpe-trainer.js';

export interface ChatMessage {
  role: string;
  content: string;
}

type Json = Record<string, unknown>;

const UNICODE_TO_BYTE: ReadonlyMap<string, number> = new Map(BYTE_TO_UNICODE.map((c, b) => [c, b]));

function isObject(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** A special token entry of tokenizer_config.json: a string, an AddedToken dict, or null. */
function tokenString(v: unknown): string | null {
  if (typeof v === 'string') return v;
  if (isObject(v) && typeof v.content === 'string') return v.content;
  return null;
}

async function readJsonFile(file: string, required: boolean): Promise<Json | undefined> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (!required && code === 'ENOENT') return undefined;
    if (code === 'ENOENT') throw new Error(`${file}: file not found (a checkpoint's tokenizer needs it)`);
    throw new Error(`${file}: cannot read: ${(e as Error).message}`);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (e) {
    throw new Error(`${file}: malformed JSON: ${(e as Error).message}`);
  }
  if (!isObject(parsed)) throw new Error(`${file}: malformed: expected a JSON object at the top level`);
  return parsed;
}

async function readTextFile(file: string): Promise<string | undefined> {
  try {
    return await readFile(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new Error(`${file}: cannot read: ${(e as Error).message}`);
  }
}

/** Picks the default template out of tokenizer_config.json's chat_template field. */
function templateFromConfig(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (Array.isArray(v)) {
    const named = v.filter(
      (t): t is { name: string; template: string } =>
        isObject(t) && typeof t.name === 'string' && typeof t.template === 'string',
    );
    return (named.find((t) => t.name === 'default') ?? named[0])?.template;
  }
  return undefined;
}

function isByteLevelDecoder(decoder: unknown): boolean {
  if (!isObject(decoder)) return false;
  if (decoder.type === 'ByteLevel') return true;
  if (decoder.type === 'Sequence' && Array.isArray(decoder.decoders)) {
    return decoder.decoders.length > 0 && decoder.decoders.every((d) => isObject(d) && d.type === 'ByteLevel');
  }
  return false;
}

export interface MoeTokenizerOptions {
  /** Overrides / supplies the chat template (e.g. from chat_template.jinja). */
  chatTemplate?: string;
  /** Further end-of-sequence ids (e.g. generation_config.json's eos_token_id). */
  extraEosTokenIds?: number[];
  /** Names the origin in error messages (a directory or file path). */
  source?: string;
}

export class MoeTokenizer {
  /** Id of tokenizer_config's bos_token, or null when the model has none. */
  readonly bosTokenId: number | null;
  /** Ids that end generation: eos_token first, then generation_config's extra ones. */
  readonly eosTokenIds: number[];
  /** Number of ids: 1 + the largest id of the vocabulary and the added tokens. */
  readonly vocabSize: number;
  /** Where the files came from (for error messages). */
  readonly source: string;

  private readonly tok: Tokenizer;
  private readonly config: Json;
  private readonly chatTemplateSource: string | undefined;
  private compiledTemplate: Template | undefined;
  /** tokenizer_config's clean_up_tokenization_spaces (applied by decode). */
  readonly cleanUpTokenizationSpaces: boolean;
  private readonly addedContents: Set<string>;
  private readonly specialContents: Set<string>;
  /** True when decoding is byte-level (tokens are GPT-2 byte-alphabet strings). */
  readonly byteLevel: boolean;

  /**
   * Loads `tokenizer.json` and `tokenizer_config.json` from a checkpoint directory
   * (also reads `generation_config.json`'s eos_token_id and a `chat_template.jinja` /
   * `chat_template.json` when present). Errors name the offending file.
   */
  static async load(dir: string): Promise<MoeTokenizer> {
    const tjFile = path.join(dir, 'tokenizer.json');
    const tcFile = path.join(dir, 'tokenizer_config.json');
    const tokenizerJson = (await readJsonFile(tjFile, true))!;
    const tokenizerConfig = (await readJsonFile(tcFile, true))!;

    let chatTemplate = templateFromConfig(tokenizerConfig.chat_template);
    if (chatTemplate === undefined) chatTemplate = await readTextFile(path.join(dir, 'chat_template.jinja'));
    if (chatTemplate === undefined) {
      const ctFile = path.join(dir, 'chat_template.json');
      const ct = await readJsonFile(ctFile, false);
      if (ct !== undefined) chatTemplate = templateFromConfig(ct.chat_template);
    }

    const extraEosTokenIds: number[] = [];
    const genFile = path.join(dir, 'generation_config.json');
    const gen = await readJsonFile(genFile, false);
    if (gen !== undefined) {
      const e = gen.eos_token_id;
      for (const id of Array.isArray(e) ? e : [e]) {
        if (Number.isInteger(id)) extraEosTokenIds.push(id as number);
      }
    }
    return MoeTokenizer.fromObjects(tokenizerJson, tokenizerConfig, { chatTemplate, extraEosTokenIds, source: dir });
  }

  /** Builds a tokenizer from already parsed tokenizer.json / tokenizer_config.json objects. */
  static fromObjects(tokenizerJson: object, tokenizerConfig: object, opts: MoeTokenizerOptions = {}): MoeTokenizer {
    const source = opts.source ?? '<in-memory tokenizer>';
    const tjName = opts.source ? path.join(opts.source, 'tokenizer.json') : 'tokenizer.json';
    const tcName = opts.source ? path.join(opts.source, 'tokenizer_config.json') : 'tokenizer_config.json';
    if (!isObject(tokenizerJson)) throw new Error(`${tjName}: malformed: expected a JSON object`);
    if (!isObject(tokenizerConfig)) throw new Error(`${tcName}: malformed: expected a JSON object`);
    const model = tokenizerJson.model;
    if (!isObject(model) || (!isObject(model.vocab) && !Array.isArray(model.vocab))) {
      throw new Error(`${tjName}: malformed: no "model" with a "vocab" (not a Hugging Face tokenizer.json?)`);
    }
    // The library reads these keys; tokenizer.json files always have them (maybe null).
    const tj: Json = { added_tokens: [], normalizer: null, pre_tokenizer: null, post_processor: null, decoder: null, ...tokenizerJson };
    if (!Array.isArray(tj.added_tokens)) throw new Error(`${tjName}: malformed: "added_tokens" is not an array`);
    let tok: Tokenizer;
    try {
      tok = new Tokenizer(tj, tokenizerConfig);
    } catch (e) {
      throw new Error(`${tjName}: unsupported or malformed tokenizer: ${(e as Error).message}`);
    }
    return new MoeTokenizer(tok, tj, tokenizerConfig, source, tcName, opts);
  }

  private constructor(tok: Tokenizer, tj: Json, config: Json, source: string, tcName: string, opts: MoeTokenizerOptions) {
    this.tok = tok;
    this.config = config;
    this.source = source;
    this.chatTemplateSource = opts.chatTemplate ?? templateFromConfig(config.chat_template);
    this.cleanUpTokenizationSpaces = config.clean_up_tokenization_spaces === true;
    this.byteLevel = isByteLevelDecoder(tj.decoder);

    let maxId = -1;
    for (const id of tok.get_vocab(true).values()) if (id > maxId) maxId = id;
    this.vocabSize = maxId + 1;

    this.addedContents = new Set();
    this.specialContents = new Set();
    for (const t of tok.get_added_tokens_decoder().values()) {
      this.addedContents.add(t.content);
      if (t.special) this.specialContents.add(t.content);
    }
    const extra = config.additional_special_tokens;
    if (Array.isArray(extra)) for (const t of extra) if (typeof t === 'string') this.specialContents.add(t);

    const resolve = (field: string): number | null => {
      const s = tokenString(config[field]);
      if (s === null) return null;
      const id = tok.token_to_id(s);
      if (id === undefined) throw new Error(`${tcName}: ${field} ${JSON.stringify(s)} is not in the vocabulary of tokenizer.json`);
      return id;
    };
    this.bosTokenId = resolve('bos_token');
    const eos = resolve('eos_token');
    const eosIds: number[] = eos === null ? [] : [eos];
    for (const id of opts.extraEosTokenIds ?? []) if (!eosIds.includes(id)) eosIds.push(id);
    this.eosTokenIds = eosIds;
  }

  /**
   * Text → ids. `addSpecialTokens` (default true, as in Hugging Face) applies the
   * tokenizer's post-processor: for Llama/Mistral-style tokenizers it prepends bos.
   * Encode a rendered chat template with `{ addSpecialTokens: false }`, since templates
   * already contain bos where the model expects it. Added-token strings in `text`
   * (e.g. "<|im_end|>") become their single ids (see the note at the top of the file).
   */
  encode(text: string, opts: { addSpecialTokens?: boolean } = {}): number[] {
    if (typeof text !== 'string') throw new TypeError('encode: text must be a string');
    return this.tok.encode(text, { add_special_tokens: opts.addSpecialTokens ?? true }).ids;
  }

  /**
   * Ids → text. Ids the tokenizer has no token for (e.g. padding rows of a larger
   * embedding matrix) are ignored. `skipSpecialTokens` drops special tokens' text.
   */
  decode(ids: readonly number[], opts: { skipSpecialTokens?: boolean } = {}): string {
    const kept: number[] = [];
    for (const id of ids) {
      if (!Number.isInteger(id)) throw new TypeError(`decode: token ids must be integers, got ${String(id)}`);
      if (this.tok.id_to_token(id) !== undefined) kept.push(id);
    }
    if (kept.length === 0) return '';
    return this.tok.decode(kept, {
      skip_special_tokens: opts.skipSpecialTokens ?? false,
      clean_up_tokenization_spaces: this.cleanUpTokenizationSpaces,
    });
  }

  /** The id of a token string (vocabulary or added token), if any. */
  tokenToId(s: string): number | undefined {
    return this.tok.token_to_id(s);
  }

  /** The token string of an id, if any. */
  idToToken(id: number): string | undefined {
    return this.tok.id_to_token(id);
  }

  /** True for ids of added tokens (special or not): they decode to their content as is. */
  isAddedTokenId(id: number): boolean {
    const t = this.tok.id_to_token(id);
    return t !== undefined && this.addedContents.has(t);
  }

  /** True for ids that `skipSpecialTokens` drops. */
  isSpecialTokenId(id: number): boolean {
    const t = this.tok.id_to_token(id);
    return t !== undefined && this.specialContents.has(t);
  }

  /** The chat template source, if the checkpoint has one. */
  get chatTemplate(): string | undefined {
    return this.chatTemplateSource;
  }

  /**
   * Renders the checkpoint's chat template (as transformers' apply_chat_template with
   * tokenize=False). Variables: messages, add_generation_prompt, the special tokens
   * (bos_token, eos_token, pad_token, unk_token, additional_special_tokens) and `vars`
   * (e.g. { enable_thinking: false }); raise_exception and strftime_now are built into
   * @huggingface/jinja. Template errors, including raise_exception, throw an Error whose
   * message starts with "chat template".
   */
  applyChatTemplate(
    messages: readonly ChatMessage[],
    opts: { addGenerationPrompt?: boolean; vars?: Record<string, unknown> } = {},
  ): string {
    const template = this.template();
    const ctx: Record<string, unknown> = {};
    for (const f of ['bos_token', 'eos_token', 'pad_token', 'unk_token', 'sep_token', 'cls_token', 'mask_token']) {
      const s = tokenString(this.config[f]);
      if (s !== null) ctx[f] = s;
    }
    if (Array.isArray(this.config.additional_special_tokens)) {
      ctx.additional_special_tokens = this.config.additional_special_tokens.map((t) => tokenString(t) ?? '');
    }
    Object.assign(ctx, opts.vars ?? {});
    ctx.messages = messages.map((m) => ({ ...m }));
    ctx.add_generation_prompt = opts.addGenerationPrompt ?? false;
    try {
      return template.render(ctx);
    } catch (e) {
      throw new Error(`chat template error (${this.source}): ${(e as Error).message}`);
    }
  }

  /** A streaming decoder over this tokenizer. */
  incrementalDecoder(opts: { skipSpecialTokens?: boolean } = {}): IncrementalDecoder {
    return new IncrementalDecoder(this, opts);
  }

  private template(): Template {
    if (this.compiledTemplate) return this.compiledTemplate;
    if (this.chatTemplateSource === undefined) {
      throw new Error(`chat template missing: ${this.source} has no chat_template (tokenizer_config.json, chat_template.jinja)`);
    }
    try {
      this.compiledTemplate = new Template(this.chatTemplateSource);
    } catch (e) {
      throw new Error(`chat template of ${this.source} does not parse: ${(e as Error).message}`);
    }
    return this.compiledTemplate;
  }
}

/**
 * Streaming detokenisation: `push(id)` returns only the newly completed text, holding
 * back an incomplete UTF-8 sequence until the bytes that complete it arrive, so a
 * character split across tokens never comes out as U+FFFD. `flush()` returns what is
 * left (an incomplete tail becomes U+FFFD, as in a full decode).
 *
 * For byte-level tokenizers (the generated ones, GPT-2/Qwen/OLMoE-style checkpoints)
 * the concatenation of all outputs equals `decode(allIds, opts)` exactly. Otherwise it
 * re-decodes a short window of recent ids and emits the growth of the text (the usual
 * prefix/read offset scheme), which matches a full decode except for tokenizers whose
 * decoding is context-dependent beyond that window.
 */
export class IncrementalDecoder {
  private readonly skipSpecial: boolean;
  private readonly useBytes: boolean;
  private readonly utf8 = new TextDecoder('utf-8', { fatal: false, ignoreBOM: true });
  // generic path state
  private ids: number[] = [];
  private prefixOffset = 0;
  private readOffset = 0;

  constructor(
    private readonly tokenizer: MoeTokenizer,
    opts: { skipSpecialTokens?: boolean } = {},
  ) {
    this.skipSpecial = opts.skipSpecialTokens ?? false;
    this.useBytes = tokenizer.byteLevel && !tokenizer.cleanUpTokenizationSpaces;
  }

  /** Feeds one id; returns the text it completes (possibly ''). */
  push(id: number): string {
    if (!Number.isInteger(id)) throw new TypeError(`IncrementalDecoder.push: token id must be an integer, got ${String(id)}`);
    return this.useBytes ? this.pushBytes(id) : this.pushGeneric(id);
  }

  /** Returns the held-back remainder and resets the decoder. */
  flush(): string {
    if (this.useBytes) return this.utf8.decode();
    const rest = this.ids.slice(this.prefixOffset);
    const prefix = this.tokenizer.decode(this.ids.slice(this.prefixOffset, this.readOffset), { skipSpecialTokens: this.skipSpecial });
    const full = this.tokenizer.decode(rest, { skipSpecialTokens: this.skipSpecial });
    this.ids = [];
    this.prefixOffset = this.readOffset = 0;
    return full.startsWith(prefix) ? full.slice(prefix.length) : '';
  }

  private pushBytes(id: number): string {
    const t = this.tokenizer.idToToken(id);
    if (t === undefined) return '';
    if (this.tokenizer.isAddedTokenId(id)) {
      if (this.skipSpecial && this.tokenizer.isSpecialTokenId(id)) return '';
      return this.utf8.decode() + t;
    }
    const bytes = new Uint8Array(t.length);
    for (let i = 0; i < t.length; i++) bytes[i] = UNICODE_TO_BYTE.get(t[i]) ?? 0;
    return this.utf8.decode(bytes, { stream: true });
  }

  private pushGeneric(id: number): string {
    this.ids.push(id);
    const opts = { skipSpecialTokens: this.skipSpecial };
    const prefix = this.tokenizer.decode(this.ids.slice(this.prefixOffset, this.readOffset), opts);
    const text = this.tokenizer.decode(this.ids.slice(this.prefixOffset), opts);
    if (text.length > prefix.length && !text.endsWith('\uFFFD') && text.startsWith(prefix)) {
      const out = text.slice(prefix.length);
      this.prefixOffset = this.readOffset;
      this.readOffset = this.ids.length;
      return out;
    }
    return '';
  }
}
