// JSON schemas of every route's body and of each response status. Request schemas are
// strict (no coercion, no unknown fields: OpenAI rejects those); response schemas also
// drive Fastify's serializer, so a field missing here would be dropped from responses.

const nullable = (type: string | string[]) => ({ type: [...(Array.isArray(type) ? type : [type]), 'null'] });
const num = (min: number, max: number) => ({ type: ['number', 'null'], minimum: min, maximum: max });

/** Sampling and stopping fields shared by both generation routes (vLLM extensions: top_k, min_p, repetition_penalty, ignore_eos). */
const commonParams = {
  model: { type: 'string' },
  max_tokens: { type: ['integer', 'null'], minimum: 1 },
  temperature: num(0, 2),
  top_p: num(0, 1),
  top_k: { type: ['integer', 'null'], minimum: -1 },
  min_p: num(0, 1),
  frequency_penalty: num(-2, 2),
  presence_penalty: num(-2, 2),
  repetition_penalty: { type: ['number', 'null'], exclusiveMinimum: 0, maximum: 2 },
  // Token id (decimal, as a JSON key) -> bias in [-100, 100]; the keys are checked in code.
  logit_bias: {
    type: ['object', 'null'],
    additionalProperties: { type: 'number', minimum: -100, maximum: 100 },
    maxProperties: 1024,
  },
  stop: { type: ['string', 'array', 'null'], items: { type: 'string' }, maxItems: 4 },
  ignore_eos: nullable('boolean'),
  seed: { type: ['integer', 'null'], minimum: -9007199254740991, maximum: 9007199254740991 },
  n: { type: ['integer', 'null'], minimum: 1, maximum: 128 },
  stream: nullable('boolean'),
  stream_options: {
    type: ['object', 'null'],
    additionalProperties: false,
    properties: { include_usage: { type: 'boolean' } },
  },
  user: { type: 'string' },
} as const;

// Text parts only; another part type, or a text part without its text, is refused in code
// (request-mapping: checkContentParts) with the part's own reason.
const contentPart = {
  type: 'object',
  additionalProperties: false,
  required: ['type'],
  properties: { type: { type: 'string' }, text: { type: 'string' } },
} as const;

const message = {
  type: 'object',
  additionalProperties: false,
  required: ['role', 'content'],
  properties: {
    role: { type: 'string', enum: ['system', 'developer', 'user', 'assistant'] },
    content: { type: ['string', 'array', 'null'], items: contentPart },
    name: { type: 'string' },
  },
} as const;

export const chatRequestSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['model', 'messages'],
  properties: {
    ...commonParams,
    messages: { type: 'array', minItems: 1, items: message },
    max_completion_tokens: { type: ['integer', 'null'], minimum: 1 },
    // Only plain text is produced: {"type": "text"} is accepted, other types are refused in code.
    response_format: {
      type: ['object', 'null'],
      required: ['type'],
      properties: { type: { type: 'string' } },
    },
    logprobs: nullable('boolean'),
    top_logprobs: { type: ['integer', 'null'], minimum: 0, maximum: 20 },
    // Stored completions: store: true is refused in code; metadata (tags for them) is accepted and unused.
    store: nullable('boolean'),
    metadata: { type: ['object', 'null'], additionalProperties: { type: 'string', maxLength: 512 }, maxProperties: 16 },
  },
} as const;

export const completionRequestSchema = {
  type: 'object',
  additionalProperties: false,
  required: ['model', 'prompt'],
  properties: {
    ...commonParams,
    // A string, strings, one token array, or token arrays; mixing is checked in code.
    prompt: {
      type: ['string', 'array'],
      minItems: 1,
      items: { type: ['string', 'integer', 'array'], minimum: 0, items: { type: 'integer', minimum: 0 } },
    },
    logprobs: { type: ['integer', 'null'], minimum: 0, maximum: 5 },
    echo: nullable('boolean'),
    // best_of: at least n, not streamed above n (checked in code). suffix: only empty (no fill-in-the-middle).
    best_of: { type: ['integer', 'null'], minimum: 1, maximum: 128 },
    suffix: nullable('string'),
  },
} as const;

export const errorSchema = {
  type: 'object',
  required: ['error'],
  properties: {
    error: {
      type: 'object',
      required: ['message', 'type', 'param', 'code'],
      properties: {
        message: { type: 'string' },
        type: { type: 'string' },
        param: nullable('string'),
        code: nullable('string'),
      },
    },
  },
} as const;

const usage = {
  type: 'object',
  required: ['prompt_tokens', 'completion_tokens', 'total_tokens'],
  properties: {
    prompt_tokens: { type: 'integer' },
    completion_tokens: { type: 'integer' },
    total_tokens: { type: 'integer' },
  },
} as const;

const topLogprob = {
  type: 'object',
  properties: {
    token: { type: 'string' },
    logprob: { type: 'number' },
    bytes: { type: 'array', items: { type: 'integer' } },
  },
} as const;

const chatLogprobs = {
  type: ['object', 'null'],
  properties: {
    content: {
      type: ['array', 'null'],
      items: { type: 'object', properties: { ...topLogprob.properties, top_logprobs: { type: 'array', items: topLogprob } } },
    },
    refusal: { type: ['array', 'null'], items: topLogprob },
  },
} as const;

const completionLogprobs = {
  type: ['object', 'null'],
  properties: {
    tokens: { type: 'array', items: { type: 'string' } },
    token_logprobs: { type: 'array', items: nullable('number') },
    top_logprobs: { type: 'array', items: { type: ['object', 'null'], additionalProperties: { type: 'number' } } },
    text_offset: { type: 'array', items: { type: 'integer' } },
  },
} as const;

const envelope = {
  id: { type: 'string' },
  object: { type: 'string' },
  created: { type: 'integer' },
  model: { type: 'string' },
  system_fingerprint: { type: 'string' },
} as const;

/** The non-streamed chat response; streamed ones are SSE frames of chatChunkSchema objects. */
export const chatResponseSchema = {
  type: 'object',
  required: ['id', 'object', 'created', 'model', 'choices', 'usage'],
  properties: {
    ...envelope,
    choices: {
      type: 'array',
      items: {
        type: 'object',
        properties: {
          index: { type: 'integer' },
          message: {
            type: 'object',
            properties: { role: { type: 'string' }, content: nullable('string'), refusal: nullable('string') },
          },
          logprobs: chatLogprobs,
          finish_reason: { type: 'string' },
        },
      },
    },
    usage,
  },
} as const;

export const chatChunkSchema = {
  type: 'object',
  properties: {
    ...envelope,
    choices: {
      type: 'array',
      items: {
        type: 'object',
        properties: {
          index: { type: 'integer' },
          delta: { type: 'object', properties: { role: { type: 'string' }, content: { type: 'string' } } },
          logprobs: chatLogprobs,
          finish_reason: nullable('string'),
        },
      },
    },
    usage: { ...usage, type: ['object', 'null'] },
  },
} as const;

export const completionResponseSchema = {
  type: 'object',
  required: ['id', 'object', 'created', 'model', 'choices', 'usage'],
  properties: {
    ...envelope,
    choices: {
      type: 'array',
      items: {
        type: 'object',
        properties: {
          index: { type: 'integer' },
          text: { type: 'string' },
          logprobs: completionLogprobs,
          finish_reason: nullable('string'),
        },
      },
    },
    usage: { ...usage, type: ['object', 'null'] },
  },
} as const;

/** Both generation routes answer 200 with JSON, or with an SSE stream when `stream` is true. */
export function generationResponses(json: object, chunk: object) {
  return {
    200: {
      content: {
        'application/json': { schema: json },
        'text/event-stream': { schema: { description: 'data: <chunk JSON>\\n\\n frames, then data: [DONE]', ...chunk } },
      },
    },
    '4xx': errorSchema,
    '5xx': errorSchema,
  };
}

export const modelSchema = {
  type: 'object',
  properties: {
    id: { type: 'string' },
    object: { type: 'string' },
    created: { type: 'integer' },
    owned_by: { type: 'string' },
    max_model_len: { type: 'integer' },
  },
} as const;

export const modelListSchema = {
  type: 'object',
  properties: { object: { type: 'string' }, data: { type: 'array', items: modelSchema } },
} as const;

export const statusSchema = {
  type: 'object',
  properties: { status: { type: 'string' } },
} as const;
