// The OpenAI error registry: every error the server answers with is made by one of
// these coded factories and serialised as {error: {message, type, param, code}}.

export interface OpenAIErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null };
}

export class ApiError extends Error {
  constructor(
    readonly statusCode: number,
    readonly type: string,
    readonly code: string | null,
    message: string,
    readonly param: string | null = null,
    /** Extra response headers (Retry-After, Allow, WWW-Authenticate). */
    readonly headers: Readonly<Record<string, string>> = {},
  ) {
    super(message);
    this.name = 'ApiError';
  }

  toBody(): OpenAIErrorBody {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

const INVALID = 'invalid_request_error';

export const Errors = {
  invalidJson: (detail: string) => new ApiError(400, INVALID, 'invalid_json', `We could not parse the JSON body of your request: ${detail}`),
  invalidUtf8: () => new ApiError(400, INVALID, 'invalid_encoding', 'The request body is not valid UTF-8.'),
  emptyBody: () => new ApiError(400, INVALID, 'invalid_json', 'The request body is empty; expected a JSON object.'),
  unsupportedMediaType: (type: string) =>
    new ApiError(415, INVALID, 'unsupported_media_type', `Unsupported Content-Type ${JSON.stringify(type)}; send application/json.`),
  bodyTooLarge: (limit: number) => new ApiError(413, INVALID, 'request_too_large', `The request body exceeds the limit of ${limit} bytes.`),
  invalidValue: (param: string | null, message: string) => new ApiError(400, INVALID, 'invalid_value', message, param),
  invalidType: (param: string | null, message: string) => new ApiError(400, INVALID, 'invalid_type', message, param),
  missingParam: (param: string) => new ApiError(400, INVALID, 'missing_required_parameter', `Missing required parameter: '${param}'.`, param),
  unknownParam: (param: string) => new ApiError(400, INVALID, 'unknown_parameter', `Unrecognized request argument supplied: ${param}`, param),
  unsupported: (param: string, message: string) => new ApiError(400, INVALID, 'unsupported_parameter', message, param),
  specialTokenInContent: (param: string, token: string) =>
    new ApiError(
      400,
      INVALID,
      'special_token_in_content',
      `Message content contains the special token ${JSON.stringify(token)}; special tokens are not accepted in chat content (setting allowSpecialTokensInChat).`,
      param,
    ),
  emptyPrompt: (param: string) => new ApiError(400, INVALID, 'invalid_value', 'The prompt is empty after tokenization.', param),
  contextLengthExceeded: (param: string, promptTokens: number, maxTokens: number, contextLength: number) =>
    new ApiError(
      400,
      INVALID,
      'context_length_exceeded',
      `This model's maximum context length is ${contextLength} tokens. However, you requested ${promptTokens + maxTokens} tokens (${promptTokens} in the prompt, ${maxTokens} for the completion). Please reduce the prompt or the completion length.`,
      param,
    ),
  modelNotFound: (model: string) =>
    new ApiError(404, INVALID, 'model_not_found', `The model \`${model}\` does not exist or you do not have access to it.`, 'model'),
  routeNotFound: (method: string, url: string) => new ApiError(404, INVALID, 'unknown_url', `Invalid URL (${method} ${url})`),
  methodNotAllowed: (method: string, url: string, allow: string[]) =>
    new ApiError(405, INVALID, 'method_not_allowed', `Method ${method} is not allowed on ${url}; allowed: ${allow.join(', ')}.`, null, {
      allow: allow.join(', '),
    }),
  missingApiKey: () =>
    new ApiError(401, INVALID, 'invalid_api_key', "You didn't provide an API key. Provide it in the Authorization header (Authorization: Bearer YOUR_KEY).", null, {
      'www-authenticate': 'Bearer',
    }),
  wrongApiKey: () => new ApiError(401, INVALID, 'invalid_api_key', 'Incorrect API key provided.', null, { 'www-authenticate': 'Bearer' }),
  queueFull: (retryAfterSeconds: number) =>
    new ApiError(429, 'requests', 'rate_limit_exceeded', `The server is at capacity; retry after ${retryAfterSeconds} s.`, null, {
      'retry-after': String(Math.max(1, Math.ceil(retryAfterSeconds))),
    }),
  notReady: () => new ApiError(503, 'server_error', 'model_not_ready', 'The model is still loading; retry shortly.', null, { 'retry-after': '1' }),
  draining: () => new ApiError(503, 'server_error', 'server_shutting_down', 'The server is shutting down and accepts no new requests.'),
  offloadDisabled: () =>
    new ApiError(404, INVALID, 'expert_offload_disabled', 'This server keeps every expert resident: expert offloading is off (setting offloadCapacity), so there is no expert cache to show.'),
  engineError: (detail: string) => new ApiError(500, 'server_error', 'engine_error', `The engine failed to process the request: ${detail}`),
  internal: (detail: string) => new ApiError(500, 'server_error', 'internal_error', `Internal server error: ${detail}`),
};
