// From a validated OpenAI request body to engine requests: model check, prompt
// tokenization (chat template or raw prompts), length limits, sampling parameters,
// penalties, stop strings and per-choice seeds.

import { randomBytes } from 'node:crypto';
import type { GenerationRequest, ModelInfo } from '../engine/protocol.js';
import type { ChatMessage, MoeTokenizer } from '../model/tokenizer.js';
import { Errors } from './errors.js';
import type { ChoiceSpec } from './generation.js';

/** Fields both routes share (already type- and range-checked by the route schema). */
export interface CommonBody {
  model: string;
  max_tokens?: number | null;
  max_completion_tokens?: number | null;
  temperature?: number | null;
  top_p?: number | null;
  top_k?: number | null;
  min_p?: number | null;
  frequency_penalty?: number | null;
  presence_penalty?: number | null;
  repetition_penalty?: number | null;
  /** Token id (decimal string) -> bias added to its logit before sampling, in [-100, 100]. */
  logit_bias?: Record<string, number> | null;
  stop?: string | string[] | null;
  /** vLLM extension: keep generating past end-of-sequence tokens, up to max_tokens. */
  ignore_eos?: boolean | null;
  seed?: number | null;
  n?: number | null;
  stream?: boolean | null;
  stream_options?: { include_usage?: boolean } | null;
  user?: string;
}

export interface ChatBody extends CommonBody {
  messages: { role: string; content: string | { type: string; text?: string }[] | null; name?: string }[];
  logprobs?: boolean | null;
  top_logprobs?: number | null;
  response_format?: { type: string; [k: string]: unknown } | null;
  store?: boolean | null;
  metadata?: Record<string, string> | null;
}

export interface CompletionBody extends CommonBody {
  prompt: string | (string | number | number[])[];
  logprobs?: number | null;
  echo?: boolean | null;
  best_of?: number | null;
  suffix?: string | null;
}

export interface Prompt {
  ids: number[];
  /** The prompt as text (for echo). */
  text: string;
}

export interface MappingContext {
  tokenizer: MoeTokenizer;
  model: ModelInfo;
  /** Special-token strings (content of special added tokens), longest first. */
  specialStrings: readonly string[];
  allowSpecialTokensInChat: boolean;
}

/** Mixes an API seed (any safe integer) and a choice index into the engine's 32-bit seed. */
export function deriveSeed(seed: number, index: number): number {
  const lo = seed >>> 0;
  const hi = Math.floor(seed / 4294967296) >>> 0;
  if (index === 0 && hi === 0) return lo;
  let h = (lo ^ Math.imul(hi, 0x9e3779b1) ^ Math.imul(index, 0x85ebca6b)) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x7feb352d) >>> 0;
  h = Math.imul(h ^ (h >>> 15), 0x846ca68b) >>> 0;
  return (h ^ (h >>> 16)) >>> 0;
}

export function checkModel(body: CommonBody, model: ModelInfo): void {
  if (body.model !== model.id) throw Errors.modelNotFound(body.model);
}

export function checkStreamOptions(body: CommonBody): void {
  if (body.stream_options != null && body.stream !== true) {
    throw Errors.invalidValue('stream_options', "The 'stream_options' parameter is only allowed when 'stream' is enabled.");
  }
}

function stopList(body: CommonBody): string[] {
  if (body.stop == null) return [];
  return typeof body.stop === 'string' ? [body.stop] : body.stop;
}

/** Content parts must be text parts with their text (the schema lets other types through to say why here). */
export function checkContentParts(body: ChatBody): void {
  body.messages.forEach((m, i) => {
    if (!Array.isArray(m.content)) return;
    m.content.forEach((p, j) => {
      const at = `messages[${i}].content[${j}]`;
      if (p.type !== 'text') throw Errors.unsupported(`${at}.type`, `Content parts of type ${JSON.stringify(p.type)} are not supported: the model reads text only (parts of type "text").`);
      if (typeof p.text !== 'string') throw Errors.missingParam(`${at}.text`);
    });
  });
}

function messageText(m: ChatBody['messages'][number]): string {
  if (m.content == null) return '';
  if (typeof m.content === 'string') return m.content;
  return m.content.map((p) => p.text ?? '').join('');
}

/** Renders and tokenizes the chat; rejects special-token strings in content unless allowed. */
export function chatPrompt(body: ChatBody, ctx: MappingContext): Prompt {
  checkContentParts(body);
  const messages: ChatMessage[] = body.messages.map((m, i) => {
    const content = messageText(m);
    if (!ctx.allowSpecialTokensInChat) {
      const hit = ctx.specialStrings.find((s) => content.includes(s));
      if (hit !== undefined) throw Errors.specialTokenInContent(`messages[${i}].content`, hit);
    }
    // Chat templates know system/user/assistant; OpenAI's developer role is the system role.
    return { role: m.role === 'developer' ? 'system' : m.role, content };
  });
  let text: string;
  try {
    text = ctx.tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true });
  } catch (e) {
    throw Errors.invalidValue('messages', (e as Error).message);
  }
  const ids = ctx.tokenizer.encode(text, { addSpecialTokens: false });
  if (ids.length === 0) throw Errors.emptyPrompt('messages');
  return { ids, text };
}

/** The prompts of a completions request: one string, strings, one token array or token arrays. */
export function completionPrompts(body: CompletionBody, ctx: MappingContext): Prompt[] {
  const p = body.prompt;
  const checkIds = (ids: number[], param: string): number[] => {
    const bad = ids.findIndex((id) => id >= ctx.model.vocabSize);
    if (bad >= 0) throw Errors.invalidValue(param, `Token id ${ids[bad]} at ${param}[${bad}] is out of range (the vocabulary has ${ctx.model.vocabSize} ids).`);
    if (ids.length === 0) throw Errors.emptyPrompt(param);
    return ids;
  };
  const fromText = (text: string, param: string): Prompt => {
    const ids = ctx.tokenizer.encode(text, { addSpecialTokens: true });
    if (ids.length === 0) throw Errors.emptyPrompt(param);
    return { ids, text };
  };
  const fromIds = (ids: number[], param: string): Prompt => {
    checkIds(ids, param);
    return { ids, text: ctx.tokenizer.decode(ids) };
  };
  if (typeof p === 'string') return [fromText(p, 'prompt')];
  if (p.every((x) => typeof x === 'string')) return (p as string[]).map((x, i) => fromText(x, `prompt[${i}]`));
  if (p.every((x) => typeof x === 'number')) return [fromIds(p as number[], 'prompt')];
  if (p.every((x) => Array.isArray(x))) return (p as number[][]).map((x, i) => fromIds(x, `prompt[${i}]`));
  throw Errors.invalidType('prompt', "'prompt' must be a string, an array of strings, an array of token ids, or an array of token-id arrays (not a mix).");
}

/** Tokens to generate at most; the prompt plus them must fit the context. */
export function maxTokensFor(body: CommonBody, prompt: Prompt, model: ModelInfo, param: string): number {
  const requested = body.max_completion_tokens ?? body.max_tokens ?? null;
  const promptTokens = prompt.ids.length;
  const room = model.contextLength - promptTokens;
  if (requested === null) {
    if (room < 1) throw Errors.contextLengthExceeded(param, promptTokens, 1, model.contextLength);
    return room;
  }
  if (requested > room) throw Errors.contextLengthExceeded(param, promptTokens, requested, model.contextLength);
  return requested;
}

export function newRequestId(prefix: string): string {
  return `${prefix}-${randomBytes(12).toString('hex')}`;
}

/**
 * One engine request per (prompt, choice): choice index = prompt index × n + j, as OpenAI
 * orders them. With a seed, every choice gets its own derived seed (the first keeps the
 * seed itself), so n > 1 gives different samples and the same request repeats exactly.
 */
export function choiceSpecs(
  responseId: string,
  body: CommonBody,
  prompts: Prompt[],
  model: ModelInfo,
  logprobs: number | null,
  param: string,
  /** Completions generated per prompt (completions' best_of; default n). */
  perPrompt: number = body.n ?? 1,
): ChoiceSpec[] {
  const n = perPrompt;
  if (prompts.length * n > 128) {
    const what = n === (body.n ?? 1) ? `n=${n}` : `best_of=${n}`;
    throw Errors.invalidValue(n === (body.n ?? 1) ? 'n' : 'best_of', `At most 128 choices per request; ${prompts.length} prompts × ${what} asks for ${prompts.length * n}.`);
  }
  const topK = body.top_k ?? 0;
  const stop = stopList(body);
  const logitBias = logitBiasOf(body, model);
  const specs: ChoiceSpec[] = [];
  prompts.forEach((prompt, p) => {
    const maxTokens = maxTokensFor(body, prompt, model, prompts.length > 1 ? `${param}[${p}]` : param);
    for (let j = 0; j < n; j++) {
      const index = p * n + j;
      const request: GenerationRequest = {
        id: `${responseId}-${index}`,
        promptTokens: prompt.ids,
        maxTokens,
        sampling: {
          temperature: body.temperature ?? 1,
          topP: body.top_p ?? 1,
          topK: topK < 0 ? 0 : topK,
          minP: body.min_p ?? 0,
        },
        seed: body.seed == null ? null : deriveSeed(body.seed, index),
        penalties: {
          frequency: body.frequency_penalty ?? 0,
          presence: body.presence_penalty ?? 0,
          repetition: body.repetition_penalty ?? 1,
          ...(logitBias.length > 0 ? { logitBias } : {}),
        },
        stopTokenIds: body.ignore_eos === true ? [] : model.eosTokenIds,
        logprobs,
      };
      specs.push({ index, request, stop });
    }
  });
  return specs;
}

/**
 * The logit_bias map as (id, bias) pairs in id order: keys are token ids as decimal
 * integers naming tokens of the vocabulary (the schema has checked the biases' range).
 */
export function logitBiasOf(body: CommonBody, model: ModelInfo): [number, number][] {
  const out: [number, number][] = [];
  for (const [key, bias] of Object.entries(body.logit_bias ?? {})) {
    if (!/^(0|[1-9][0-9]{0,15})$/.test(key)) {
      throw Errors.invalidValue('logit_bias', `Invalid key ${JSON.stringify(key.slice(0, 40))} in 'logit_bias': keys are token ids, decimal integers.`);
    }
    const id = Number(key);
    if (id >= model.vocabSize) {
      throw Errors.invalidValue('logit_bias', `Token id ${key} in 'logit_bias' is out of range (the vocabulary has ${model.vocabSize} ids).`);
    }
    out.push([id, bias]);
  }
  return out.sort((a, b) => a[0] - b[0]);
}
