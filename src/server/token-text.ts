// Token strings and bytes for logprobs. OpenAI gives each token as text plus its UTF-8
// bytes, because one token may hold only part of a character; the text is then the
// bytes decoded with replacement characters.

import { BYTE_TO_UNICODE } from '../model/bpe-trainer.js';
import type { MoeTokenizer } from '../model/tokenizer.js';

const UNICODE_TO_BYTE: ReadonlyMap<string, number> = new Map(BYTE_TO_UNICODE.map((c, b) => [c, b]));
const utf8 = new TextEncoder();
const lenient = new TextDecoder('utf-8', { fatal: false, ignoreBOM: true });

export interface TokenText {
  text: string;
  bytes: number[];
}

/** Memoises token text per id: the same ids come back on every step. */
export class TokenTexts {
  private readonly cache = new Map<number, TokenText>();

  constructor(private readonly tokenizer: MoeTokenizer) {}

  get(id: number): TokenText {
    let t = this.cache.get(id);
    if (!t) {
      t = this.compute(id);
      if (this.cache.size < 200_000) this.cache.set(id, t);
    }
    return t;
  }

  private compute(id: number): TokenText {
    const tok = this.tokenizer;
    const raw = tok.idToToken(id);
    if (raw === undefined) return { text: '', bytes: [] };
    if (tok.byteLevel && !tok.isAddedTokenId(id)) {
      const bytes = Array.from(raw, (c) => UNICODE_TO_BYTE.get(c) ?? 0);
      return { text: lenient.decode(new Uint8Array(bytes)), bytes };
    }
    const text = tok.isAddedTokenId(id) ? raw : tok.decode([id]);
    return { text, bytes: Array.from(utf8.encode(text)) };
  }
}
