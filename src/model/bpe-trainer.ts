// Byte-level BPE training (GPT-2 / Qwen2 style), small and deterministic.
//
// Text is split into pre-tokens with PRETOKENIZE_REGEX (the JavaScript form of the
// Oniguruma pattern written into tokenizer.json as SPLIT_PATTERN), each pre-token's
// UTF-8 bytes are mapped through the GPT-2 byte→unicode table, and merges are learnt
// over the word frequencies with incrementally maintained pair counts and a lazy
// max-heap. Ties between pairs of equal count are broken by the lexicographic order
// (UTF-16 code units) of the left symbol, then of the right symbol: smallest first.

/**
 * The Oniguruma split pattern stored in tokenizer.json (Qwen2's pre-tokenizer pattern:
 * contractions, letter runs with an optional leading non-letter, single digits,
 * punctuation runs, newlines and whitespace runs).
 */
export const SPLIT_PATTERN =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/**
 * SPLIT_PATTERN written by hand as a JavaScript RegExp (Oniguruma's `\s` is the Unicode
 * White_Space property; `(?i:...)` only folds ASCII letters here). The test suite checks
 * that it splits exactly like @huggingface/tokenizers' translation of SPLIT_PATTERN.
 */
export const PRETOKENIZE_REGEX =
  /(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\p{White_Space}\p{L}\p{N}]+[\r\n]*|\p{White_Space}*[\r\n]+|\p{White_Space}+(?!\P{White_Space})|\p{White_Space}+/gu;

/** Splits text into pre-tokens (every character of the input lands in exactly one). */
export function preTokenize(text: string): string[] {
  const out: string[] = [];
  let prev = 0;
  for (const m of text.matchAll(PRETOKENIZE_REGEX)) {
    const idx = m.index ?? 0;
    if (prev < idx) out.push(text.slice(prev, idx));
    if (m[0].length > 0) out.push(m[0]);
    prev = idx + m[0].length;
  }
  if (prev < text.length) out.push(text.slice(prev));
  return out;
}

/**
 * The GPT-2 byte→unicode table, in GPT-2 vocabulary order: the printable bytes
 * (33..126, 161..172, 174..255) map to themselves, the others to U+0100 onwards.
 * Returned as [byte, char] pairs in that order.
 */
function buildByteTable(): [number, string][] {
  const bs: number[] = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = bs.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n);
      n++;
    }
  }
  return bs.map((b, i) => [b, String.fromCharCode(cs[i])]);
}

const BYTE_TABLE = buildByteTable();
/** byte value → its byte-level unicode character. */
export const BYTE_TO_UNICODE: readonly string[] = (() => {
  const t = new Array<string>(256);
  for (const [b, c] of BYTE_TABLE) t[b] = c;
  return t;
})();
/** The 256 byte-level symbols in GPT-2 vocabulary order (ids 0..255). */
export const BYTE_SYMBOLS: readonly string[] = BYTE_TABLE.map(([, c]) => c);

const encoder = new TextEncoder();

/** Maps a string's UTF-8 bytes to the byte-level unicode alphabet. */
export function toByteLevel(s: string): string {
  let out = '';
  for (const b of encoder.encode(s)) out += BYTE_TO_UNICODE[b];
  return out;
}

// ---------------------------------------------------------------------------------
// Lazy binary max-heap of candidate pairs.

interface HeapEntry {
  count: number;
  a: number;
  b: number;
}

class PairHeap {
  private readonly items: HeapEntry[] = [];
  constructor(private readonly sym: string[]) {}

  get size(): number {
    return this.items.length;
  }

  /** True when x should come out before y. */
  private before(x: HeapEntry, y: HeapEntry): boolean {
    if (x.count !== y.count) return x.count > y.count;
    const xa = this.sym[x.a];
    const ya = this.sym[y.a];
    if (xa !== ya) return xa < ya;
    const xb = this.sym[x.b];
    const yb = this.sym[y.b];
    if (xb !== yb) return xb < yb;
    return false;
  }

  push(e: HeapEntry): void {
    const h = this.items;
    h.push(e);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!this.before(h[i], h[p])) break;
      [h[i], h[p]] = [h[p], h[i]];
      i = p;
    }
  }

  pop(): HeapEntry | undefined {
    const h = this.items;
    if (h.length === 0) return undefined;
    const top = h[0];
    const last = h.pop()!;
    if (h.length > 0) {
      h[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < h.length && this.before(h[l], h[m])) m = l;
        if (r < h.length && this.before(h[r], h[m])) m = r;
        if (m === i) break;
        [h[i], h[m]] = [h[m], h[i]];
        i = m;
      }
    }
    return top;
  }
}

// Pair key: both ids are < 2^21 in any realistic run.
const SHIFT = 2 ** 21;
const key = (a: number, b: number): number => a * SHIFT + b;

/**
 * Learns up to `numMerges` byte-level BPE merges from `corpus`.
 *
 * Returns the vocabulary (byte-level token string → id; ids 0..255 are the byte
 * symbols in GPT-2 order, then one id per new token in merge order) and the merges in
 * rank order. Fewer merges are returned only if the corpus runs out of adjacent pairs.
 * When two merges produce the same string, the second reuses the first one's id, so
 * the vocabulary may hold fewer than 256 + numMerges entries.
 */
export function trainByteLevelBpe(
  corpus: string,
  numMerges: number,
): { vocab: Map<string, number>; merges: [string, string][] } {
  if (!Number.isInteger(numMerges) || numMerges < 0) {
    throw new RangeError(`numMerges must be a non-negative integer, got ${numMerges}`);
  }
  const sym: string[] = BYTE_SYMBOLS.slice();
  const vocab = new Map<string, number>();
  sym.forEach((s, i) => vocab.set(s, i));
  const byteId = new Array<number>(256);
  BYTE_TABLE.forEach(([b], i) => (byteId[b] = i));

  // Word frequencies over pre-tokens (first-occurrence order keeps this deterministic).
  const freq = new Map<string, number>();
  for (const piece of preTokenize(corpus)) freq.set(piece, (freq.get(piece) ?? 0) + 1);
  const words: number[][] = [];
  const counts: number[] = [];
  for (const [piece, c] of freq) {
    const ids = Array.from(encoder.encode(piece), (b) => byteId[b]);
    if (ids.length < 2) continue; // single symbols never take part in a merge
    words.push(ids);
    counts.push(c);
  }

  const pairCount = new Map<number, number>();
  const where = new Map<number, Set<number>>();
  for (let w = 0; w < words.length; w++) {
    const ws = words[w];
    for (let i = 0; i + 1 < ws.length; i++) {
      const k = key(ws[i], ws[i + 1]);
      pairCount.set(k, (pairCount.get(k) ?? 0) + counts[w]);
      let set = where.get(k);
      if (!set) where.set(k, (set = new Set()));
      set.add(w);
    }
  }

  const heap = new PairHeap(sym);
  for (const [k, c] of pairCount) heap.push({ count: c, a: Math.floor(k / SHIFT), b: k % SHIFT });

  const merges: [string, string][] = [];
  const delta = new Map<number, number>();
  while (merges.length < numMerges) {
    const top = heap.pop();
    if (!top) break;
    const k = key(top.a, top.b);
    const current = pairCount.get(k) ?? 0;
    if (current !== top.count || current <= 0) continue; // stale entry
    const { a, b } = top;
    const merged = sym[a] + sym[b];
    let id = vocab.get(merged);
    if (id === undefined) {
      id = sym.length;
      sym.push(merged);
      vocab.set(merged, id);
    }
    merges.push([sym[a], sym[b]]);

    delta.clear();
    const affected = where.get(k);
    where.delete(k);
    if (affected) {
      for (const w of affected) {
        const ws = words[w];
        const c = counts[w];
        let found = false;
        for (let i = 0; i + 1 < ws.length; i++) {
          if (ws[i] === a && ws[i + 1] === b) {
            found = true;
            break;
          }
        }
        if (!found) continue;
        for (let i = 0; i + 1 < ws.length; i++) {
          const pk = key(ws[i], ws[i + 1]);
          delta.set(pk, (delta.get(pk) ?? 0) - c);
        }
        const next: number[] = [];
        for (let i = 0; i < ws.length; i++) {
          if (i + 1 < ws.length && ws[i] === a && ws[i + 1] === b) {
            next.push(id);
            i++;
          } else {
            next.push(ws[i]);
          }
        }
        words[w] = next;
        for (let i = 0; i + 1 < next.length; i++) {
          const pk = key(next[i], next[i + 1]);
          delta.set(pk, (delta.get(pk) ?? 0) + c);
          let set = where.get(pk);
          if (!set) where.set(pk, (set = new Set()));
          set.add(w);
        }
      }
    }
    for (const [pk, d] of delta) {
      if (d === 0) continue;
      const nc = (pairCount.get(pk) ?? 0) + d;
      if (nc <= 0) {
        pairCount.delete(pk);
      } else {
        pairCount.set(pk, nc);
        heap.push({ count: nc, a: Math.floor(pk / SHIFT), b: pk % SHIFT });
      }
    }
    pairCount.delete(k);
  }

  return { vocab, merges };
}
