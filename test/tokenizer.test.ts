import t from 'tap';
import { mkdtemp, mkdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import type { Architecture } from '../src/model/spec.js';
import { buildTokenizerFiles, type TokenizerFiles } from '../src/model/tokenizer-files.js';
import { MoeTokenizer, IncrementalDecoder } from '../src/model/tokenizer.js';
import { BPE_CORPUS } from '../src/model/bpe-corpus.js';
import { BYTE_TO_UNICODE, SPLIT_PATTERN, preTokenize, toByteLevel, trainByteLevelBpe } from '../src/model/bpe-trainer.js';

const ARCHS: Architecture[] = ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe'];
const NUM_MERGES = 2000;

// ---------------------------------------------------------------------------------
// Inputs

function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

/** A code point from any plane, never a surrogate. */
function randomCodePoint(rnd: () => number): number {
  const r = rnd();
  let cp: number;
  if (r < 0.25) cp = Math.floor(rnd() * 0x80); // ASCII incl. controls and NUL
  else if (r < 0.35) cp = [0x20, 0x0a, 0x09, 0x0d, 0xa0, 0x3000][Math.floor(rnd() * 6)];
  else if (r < 0.6) cp = Math.floor(rnd() * 0x10000); // BMP
  else if (r < 0.75) cp = 0x10000 + Math.floor(rnd() * 0x10000); // plane 1
  else cp = Math.floor(rnd() * 0x110000); // anywhere
  if (cp >= 0xd800 && cp <= 0xdfff) cp -= 0x800;
  return cp;
}

function randomString(rnd: () => number): string {
  const n = Math.floor(rnd() * 48);
  let s = '';
  for (let i = 0; i < n; i++) s += String.fromCodePoint(randomCodePoint(rnd));
  return s;
}

const HARD_STRINGS: string[] = [
  '',
  ' ',
  '    ',
  ' \t \t  ',
  '\n',
  '\n\n\n',
  '\r\n\r\n',
  '\t\tindented\n\t\t\tmore',
  'trailing spaces   \n   leading spaces',
  'Hello, world!',
  "It's a dog's life, isn't it? I'LL SEE, you'D know.",
  '日本語のテキストと中文文本，还有한국어 텍스트。',
  'مرحبا بالعالم، كيف حالك؟',
  'שלום עולם',
  'e\u0301 a\u0300\u0323 \u0915\u094d\u0937 Z\u0351\u0362\u0334a\u0337\u0353l\u0338g\u0335o', // combining marks
  'Ｆｕｌｌｗｉｄｔｈ ｆｏｒｍｓ and ﬁ ligature and Å vs A\u030a',
  '👨‍👩‍👧‍👦 👩🏽‍💻 👍🏿 🧑🏻‍🤝‍🧑🏾 ❤️‍🔥 🏳️‍🌈',
  '🇬🇧🇯🇵🇺🇸 🇪🇺',
  '\u{1F600}\u{10FFFF}\u{E0001}\u{E0067}\u{20000}\u{2A6D6}\u{1D11E}\u{10000}',
  '\u0000',
  'a\u0000b\u0001c\u001f\u007f\u0080\u009f',
  '\uFEFFBOM at start',
  'mid\uFEFFBOM and \uFFFE\uFFFF noncharacters',
  '\u200b\u200c\u200d\u2028\u2029\u00ad',
  'Ⅻ ½ ² ١٢٣ ๔๕ 𝟙𝟚𝟛',
  'a'.repeat(5000),
  'supercalifragilisticexpialidocious'.repeat(150),
  '語'.repeat(2000),
  ' '.repeat(3000) + 'x',
  '🙂'.repeat(700),
  '1234567890'.repeat(300),
  '<|im_end|> <s> [INST] <|endoftext|> <think> </think> <|user|>',
  'if (x) {\n    return `${a}\\n`;\n}\n',
];

const ENGLISH_SAMPLE = `On a quiet Sunday morning the market square slowly fills with people. The farmers set up their tables, the smell of coffee drifts from the cafe on the corner, and children run between the stalls while their parents buy vegetables, bread and cheese for the week. By noon the square is busy and loud, and by evening it is empty again.`;

const SHORT_CHAT = [
  { role: 'system', content: 'You are terse.' },
  { role: 'user', content: 'Hi there' },
  { role: 'assistant', content: 'Hello! How can I help?' },
  { role: 'user', content: 'What is 2+2?' },
];

const EXPECTED_CHAT: Record<Architecture, { noGen: string; gen: string }> = {
  qwen2_moe: {
    noGen:
      '<|im_start|>system\nYou are terse.<|im_end|>\n' +
      '<|im_start|>user\nHi there<|im_end|>\n' +
      '<|im_start|>assistant\nHello! How can I help?<|im_end|>\n' +
      '<|im_start|>user\nWhat is 2+2?<|im_end|>\n',
    gen:
      '<|im_start|>system\nYou are terse.<|im_end|>\n' +
      '<|im_start|>user\nHi there<|im_end|>\n' +
      '<|im_start|>assistant\nHello! How can I help?<|im_end|>\n' +
      '<|im_start|>user\nWhat is 2+2?<|im_end|>\n' +
      '<|im_start|>assistant\n',
  },
  qwen3_moe: {
    noGen:
      '<|im_start|>system\nYou are terse.<|im_end|>\n' +
      '<|im_start|>user\nHi there<|im_end|>\n' +
      '<|im_start|>assistant\nHello! How can I help?<|im_end|>\n' +
      '<|im_start|>user\nWhat is 2+2?<|im_end|>\n',
    gen:
      '<|im_start|>system\nYou are terse.<|im_end|>\n' +
      '<|im_start|>user\nHi there<|im_end|>\n' +
      '<|im_start|>assistant\nHello! How can I help?<|im_end|>\n' +
      '<|im_start|>user\nWhat is 2+2?<|im_end|>\n' +
      '<|im_start|>assistant\n',
  },
  mixtral: {
    noGen: '<s>[INST] You are terse.\n\nHi there [/INST] Hello! How can I help?</s>[INST] What is 2+2? [/INST]',
    gen: '<s>[INST] You are terse.\n\nHi there [/INST] Hello! How can I help?</s>[INST] What is 2+2? [/INST]',
  },
  olmoe: {
    noGen:
      '<|endoftext|><|system|>\nYou are terse.\n' +
      '<|user|>\nHi there\n' +
      '<|assistant|>\nHello! How can I help?<|endoftext|>\n' +
      '<|user|>\nWhat is 2+2?\n',
    gen:
      '<|endoftext|><|system|>\nYou are terse.\n' +
      '<|user|>\nHi there\n' +
      '<|assistant|>\nHello! How can I help?<|endoftext|>\n' +
      '<|user|>\nWhat is 2+2?\n' +
      '<|assistant|>\n',
  },
};

// ---------------------------------------------------------------------------------

let tmpRoot = '';
t.before(async () => {
  tmpRoot = await mkdtemp(path.join(os.tmpdir(), 'moe-tokenizer-test-'));
});
t.teardown(async () => {
  if (tmpRoot) await rm(tmpRoot, { recursive: true, force: true });
});

async function writeCheckpoint(name: string, files: TokenizerFiles): Promise<string> {
  const dir = path.join(tmpRoot, name);
  await mkdir(dir, { recursive: true });
  await writeFile(path.join(dir, 'tokenizer.json'), JSON.stringify(files.tokenizerJson, null, 2));
  await writeFile(path.join(dir, 'tokenizer_config.json'), JSON.stringify(files.tokenizerConfig, null, 2));
  return dir;
}

t.test('pre-tokenizer regex agrees with @huggingface/tokenizers translation of the pattern', async (t) => {
  // The library's pre-tokenizer as configured by our tokenizer.json (Split + ByteLevel).
  const files = buildTokenizerFiles('qwen2_moe', { numMerges: 10 });
  const preTok = (files.tokenizerJson.pre_tokenizer as { pretokenizers: { pattern: { Regex: string } }[] }).pretokenizers[0];
  t.equal(preTok.pattern.Regex, SPLIT_PATTERN);
  const hf = new Tokenizer(files.tokenizerJson, files.tokenizerConfig);
  const libSplit = (s: string): string[] =>
    (hf.pre_tokenizer as { pre_tokenize_text(s: string): string[] }).pre_tokenize_text(s);
  const rnd = mulberry32(7);
  const inputs = [BPE_CORPUS, ...HARD_STRINGS.filter((s) => s.length > 0)];
  for (let i = 0; i < 300; i++) inputs.push(randomString(rnd));
  let bad = 0;
  for (const s of inputs) {
    const ours = preTokenize(s);
    if (ours.join('') !== s) bad++;
    if (s.length > 0 && JSON.stringify(ours.map(toByteLevel)) !== JSON.stringify(libSplit(s))) {
      bad++;
      t.fail(`split differs for ${JSON.stringify(s.slice(0, 80))}`);
    }
  }
  t.equal(bad, 0, 'identical splits on corpus, hard strings and 300 random strings');
  t.same(preTokenize("Hello world!  It's 42"), ['Hello', ' world', '!', ' ', ' It', "'s", ' ', '4', '2']);
});

t.test('trainer: deterministic, byte alphabet first, fast', async (t) => {
  const t0 = performance.now();
  const a = trainByteLevelBpe(BPE_CORPUS, 4000);
  const ms = performance.now() - t0;
  const b = trainByteLevelBpe(BPE_CORPUS, 4000);
  t.equal(a.merges.length, 4000);
  t.ok(ms < 2000, `4000 merges in ${ms.toFixed(0)} ms`);
  t.same(a.merges, b.merges, 'same merges');
  t.same([...a.vocab], [...b.vocab], 'same vocab');
  const byteSyms = new Set(BYTE_TO_UNICODE);
  t.equal(byteSyms.size, 256);
  const low = [...a.vocab].filter(([, id]) => id < 256);
  t.equal(low.length, 256);
  t.ok(low.every(([tok]) => byteSyms.has(tok)), 'ids 0..255 are the byte symbols');
  t.equal(a.vocab.get('!'), 0, "GPT-2 order: '!' is id 0");
  // every merge produces a token of the vocabulary, ids dense
  t.ok(a.merges.every(([x, y]) => a.vocab.has(x) && a.vocab.has(y) && a.vocab.has(x + y)), 'merges close over the vocab');
  const ids = [...a.vocab.values()].sort((p, q) => p - q);
  t.same(ids, ids.map((_, i) => i), 'dense ids');
  const small = trainByteLevelBpe(BPE_CORPUS, 1000);
  t.same(small.merges, a.merges.slice(0, 1000), 'a prefix of a longer run');
});

t.test('buildTokenizerFiles is deterministic', async (t) => {
  for (const arch of ARCHS) {
    const x = buildTokenizerFiles(arch, { numMerges: 500 });
    const y = buildTokenizerFiles(arch, { numMerges: 500 });
    t.equal(JSON.stringify(x), JSON.stringify(y), arch);
    t.equal(x.size, 256 + 500 + (x.tokenizerJson.added_tokens as unknown[]).length, `${arch} size`);
  }
});

for (const arch of ARCHS) {
  t.test(arch, async (t) => {
    const files = buildTokenizerFiles(arch, { numMerges: NUM_MERGES });
    const dir = await writeCheckpoint(arch, files);
    const tok = await MoeTokenizer.load(dir);

    t.test('sizes and special ids', async (t) => {
      t.equal(tok.vocabSize, files.size);
      t.equal(tok.bosTokenId, files.specialTokens.bos);
      t.equal(tok.eosTokenIds[0], files.specialTokens.eos[0]);
      const cfg = files.tokenizerConfig as Record<string, unknown>;
      for (const key of ['chat_template', 'bos_token', 'eos_token', 'pad_token', 'added_tokens_decoder', 'model_max_length', 'tokenizer_class']) {
        t.ok(key in cfg, `tokenizer_config has ${key}`);
      }
      const added = files.tokenizerJson.added_tokens as { id: number; content: string; special: boolean }[];
      for (const a of added) {
        t.equal(a.id >= files.size - added.length, true, `${a.content} after the BPE vocab`);
        t.same(tok.encode(a.content, { addSpecialTokens: false }), [a.id], `${a.content} is one id`);
        t.equal(tok.tokenToId(a.content), a.id);
        t.same(tok.encode(`x${a.content}y`, { addSpecialTokens: false }).filter((id) => id === a.id), [a.id], `${a.content} not split inside text`);
      }
      if (files.specialTokens.pad !== null) t.equal(tok.tokenToId(cfg.pad_token as string), files.specialTokens.pad);
    });

    t.test('round trip of hard strings', async (t) => {
      for (const s of HARD_STRINGS) {
        const ids = tok.encode(s, { addSpecialTokens: false });
        const back = tok.decode(ids);
        if (back !== s) t.fail(`round trip failed for ${JSON.stringify(s.slice(0, 60))}`);
        for (const id of ids) if (!(id >= 0 && id < tok.vocabSize)) t.fail(`id ${id} out of range`);
      }
      t.equal(tok.decode([]), '');
      t.same(tok.encode('', { addSpecialTokens: false }), []);
      t.pass('hard strings round-trip');
    });

    t.test('round trip of 400 seeded random strings from all planes', async (t) => {
      const rnd = mulberry32(0xc0ffee);
      let failures = 0;
      for (let i = 0; i < 400; i++) {
        const s = randomString(rnd);
        if (tok.decode(tok.encode(s, { addSpecialTokens: false })) !== s) {
          failures++;
          if (failures < 5) t.fail(`round trip failed for ${JSON.stringify(s)}`);
        }
      }
      t.equal(failures, 0);
    });

    t.test('addSpecialTokens', async (t) => {
      const plain = tok.encode('Hello there', { addSpecialTokens: false });
      const withSpecial = tok.encode('Hello there');
      if (arch === 'mixtral') t.same(withSpecial, [tok.bosTokenId!, ...plain], 'mixtral prepends <s>');
      else t.same(withSpecial, plain, 'no tokens added');
      t.equal(tok.decode(withSpecial, { skipSpecialTokens: true }), 'Hello there');
    });

    t.test('merges compress English text', async (t) => {
      const bytes = Buffer.byteLength(ENGLISH_SAMPLE);
      const n = tok.encode(ENGLISH_SAMPLE, { addSpecialTokens: false }).length;
      t.ok(n < bytes * 0.4, `${n} tokens for ${bytes} bytes (${(bytes / n).toFixed(2)} bytes/token)`);
      t.ok(tok.encode(' the', { addSpecialTokens: false }).length === 1, "' the' is one token");
    });

    t.test('chat template', async (t) => {
      t.equal(tok.applyChatTemplate(SHORT_CHAT), EXPECTED_CHAT[arch].noGen);
      t.equal(tok.applyChatTemplate(SHORT_CHAT, { addGenerationPrompt: true }), EXPECTED_CHAT[arch].gen);
      const prompt = tok.applyChatTemplate(SHORT_CHAT, { addGenerationPrompt: true });
      const ids = tok.encode(prompt, { addSpecialTokens: false });
      t.equal(tok.decode(ids), prompt, 'rendered prompt round-trips');
      if (files.specialTokens.bos !== null) t.equal(ids[0], files.specialTokens.bos, 'starts with bos');

      if (arch === 'qwen2_moe') {
        t.equal(
          tok.applyChatTemplate([{ role: 'user', content: 'Hi' }], { addGenerationPrompt: true }),
          '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n',
          'default system prompt',
        );
      }
      if (arch === 'qwen3_moe') {
        const msgs = [
          { role: 'user', content: 'Hi' },
          { role: 'assistant', content: '<think>\nThe user greets me.\n</think>\n\nHello!' },
          { role: 'user', content: 'Bye' },
        ];
        t.equal(
          tok.applyChatTemplate(msgs, { addGenerationPrompt: true }),
          '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n',
          'reasoning of past turns dropped',
        );
        t.equal(
          tok.applyChatTemplate([{ role: 'user', content: 'Hi' }], { addGenerationPrompt: true, vars: { enable_thinking: false } }),
          '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n',
          'enable_thinking=false',
        );
      }
      if (arch === 'mixtral') {
        t.equal(
          tok.applyChatTemplate([{ role: 'user', content: 'Hi' }]),
          '<s>[INST] Hi [/INST]',
          'no system prompt',
        );
        t.throws(
          () => tok.applyChatTemplate([{ role: 'user', content: 'a' }, { role: 'user', content: 'b' }]),
          /chat template error.*alternate/,
          'raise_exception becomes a clear Error',
        );
      }
      if (arch === 'olmoe') {
        t.throws(() => tok.applyChatTemplate([{ role: 'robot', content: 'a' }]), /chat template error.*Unknown message role: robot/);
      }
    });

    t.test('incremental decoder', async (t) => {
      const rnd = mulberry32(42);
      const inputs = [...HARD_STRINGS.slice(0, 26), ENGLISH_SAMPLE];
      for (let i = 0; i < 60; i++) inputs.push(randomString(rnd));
      const chat = tok.applyChatTemplate(SHORT_CHAT, { addGenerationPrompt: true });
      inputs.push(chat);
      for (const s of inputs) {
        const ids = tok.encode(s, { addSpecialTokens: false });
        for (const skip of [false, true]) {
          const dec = new IncrementalDecoder(tok, { skipSpecialTokens: skip });
          let out = '';
          for (const id of ids) out += dec.push(id);
          out += dec.flush();
          if (out !== tok.decode(ids, { skipSpecialTokens: skip })) t.fail(`incremental != full for ${JSON.stringify(s.slice(0, 60))} skip=${skip}`);
        }
      }
      // byte by byte: one byte-symbol token per UTF-8 byte
      const byteId = BYTE_TO_UNICODE.map((c) => tok.tokenToId(c)!);
      const enc = new TextEncoder();
      for (const s of [...HARD_STRINGS.slice(0, 26), ...Array.from({ length: 50 }, () => randomString(rnd))]) {
        const dec = tok.incrementalDecoder();
        let out = '';
        for (const b of enc.encode(s)) {
          const piece = dec.push(byteId[b]);
          if (piece.includes('\uFFFD')) t.fail(`U+FFFD emitted for ${JSON.stringify(s.slice(0, 40))}`);
          out += piece;
        }
        if (dec.flush() !== '') t.fail(`bytes held back at the end of ${JSON.stringify(s.slice(0, 40))}`);
        if (out !== s) t.fail(`byte-wise decode differs for ${JSON.stringify(s.slice(0, 40))}`);
      }
      t.pass('byte-by-byte streaming: exact text, no U+FFFD');
      const dec = tok.incrementalDecoder();
      const emoji = [...enc.encode('🙂')].map((b) => dec.push(byteId[b]));
      t.same(emoji, ['', '', '', '🙂'], 'a 4-byte character comes out whole with its last byte');
      const d2 = tok.incrementalDecoder();
      t.equal(d2.push(byteId[0xf0]) + d2.flush(), '\uFFFD', 'incomplete tail becomes U+FFFD on flush, as in a full decode');
    });

    t.test('generic (non byte-level) path of the incremental decoder', async (t) => {
      // clean_up_tokenization_spaces=true disables the exact byte path.
      const cfg = { ...(files.tokenizerConfig as object), clean_up_tokenization_spaces: true };
      const tok2 = MoeTokenizer.fromObjects(files.tokenizerJson, cfg);
      const s = 'Grüße 👨‍👩‍👧‍👦 日本語 and more';
      const ids = tok2.encode(s, { addSpecialTokens: false });
      const dec = tok2.incrementalDecoder();
      let out = '';
      let replacement = false;
      for (const id of ids) {
        const p = dec.push(id);
        replacement ||= p.includes('\uFFFD');
        out += p;
      }
      out += dec.flush();
      t.equal(out, s);
      t.notOk(replacement, 'no U+FFFD emitted');
    });
  });
}

t.test('load errors name the file', async (t) => {
  const files = buildTokenizerFiles('qwen2_moe', { numMerges: 200 });

  const missing = path.join(tmpRoot, 'missing-tokenizer');
  await mkdir(missing, { recursive: true });
  await writeFile(path.join(missing, 'tokenizer_config.json'), JSON.stringify(files.tokenizerConfig));
  await t.rejects(MoeTokenizer.load(missing), /tokenizer\.json: file not found/);

  const corrupt = await writeCheckpoint('corrupt-tokenizer', files);
  await writeFile(path.join(corrupt, 'tokenizer.json'), '{"version": "1.0", "model": {"type": "BPE", "vo');
  await t.rejects(MoeTokenizer.load(corrupt), /corrupt-tokenizer\/tokenizer\.json: malformed JSON/);

  const wrong = await writeCheckpoint('wrong-shape', files);
  await writeFile(path.join(wrong, 'tokenizer.json'), JSON.stringify({ hello: 'world' }));
  await t.rejects(MoeTokenizer.load(wrong), /tokenizer\.json: malformed: no "model"/);

  const arr = await writeCheckpoint('array-json', files);
  await writeFile(path.join(arr, 'tokenizer.json'), '[1, 2, 3]');
  await t.rejects(MoeTokenizer.load(arr), /tokenizer\.json: malformed: expected a JSON object/);

  const noConfig = await writeCheckpoint('no-config', files);
  await rm(path.join(noConfig, 'tokenizer_config.json'));
  await t.rejects(MoeTokenizer.load(noConfig), /tokenizer_config\.json: file not found/);

  const badConfig = await writeCheckpoint('bad-config', files);
  await writeFile(path.join(badConfig, 'tokenizer_config.json'), 'not json');
  await t.rejects(MoeTokenizer.load(badConfig), /tokenizer_config\.json: malformed JSON/);

  await t.rejects(MoeTokenizer.load(path.join(tmpRoot, 'does-not-exist')), /tokenizer\.json: file not found/);

  const noTemplate = await writeCheckpoint('no-template', files);
  const cfg = { ...(files.tokenizerConfig as Record<string, unknown>) };
  delete cfg.chat_template;
  await writeFile(path.join(noTemplate, 'tokenizer_config.json'), JSON.stringify(cfg));
  const tok = await MoeTokenizer.load(noTemplate);
  t.throws(() => tok.applyChatTemplate([{ role: 'user', content: 'x' }]), /chat template missing/);
  await writeFile(path.join(noTemplate, 'chat_template.jinja'), '{% for m in messages %}[{{ m.content }}]{% endfor %}');
  const tok2 = await MoeTokenizer.load(noTemplate);
  t.equal(tok2.applyChatTemplate([{ role: 'user', content: 'x' }]), '[x]', 'chat_template.jinja is used');

  const badTemplate = await writeCheckpoint('bad-template', files);
  await writeFile(path.join(badTemplate, 'tokenizer_config.json'), JSON.stringify({ ...cfg, chat_template: '{% if %}' }));
  const tok3 = await MoeTokenizer.load(badTemplate);
  t.throws(() => tok3.applyChatTemplate([]), /chat template of .* does not parse/);
});

t.test('generation_config.json eos ids are added', async (t) => {
  const files = buildTokenizerFiles('qwen3_moe', { numMerges: 200 });
  const dir = await writeCheckpoint('with-genconfig', files);
  await writeFile(path.join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: files.specialTokens.eos }));
  const tok = await MoeTokenizer.load(dir);
  t.same(tok.eosTokenIds, files.specialTokens.eos);
});

t.test('sizes for 1000 / 4000 merges', async (t) => {
  for (const numMerges of [1000, 4000]) {
    const t0 = performance.now();
    const f = buildTokenizerFiles('qwen2_moe', { numMerges });
    const ms = performance.now() - t0;
    t.equal(f.size, 256 + numMerges + 3);
    t.comment(`numMerges=${numMerges}: size ${f.size}, built in ${ms.toFixed(0)} ms`);
  }
});
