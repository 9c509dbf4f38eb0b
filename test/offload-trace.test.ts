// The moe-trace v1 reader: good files, malformed ones (errors name the line), streams
// delivered in small chunks, and the shipped real traces.

import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import t from 'tap';
import { loadTrace, readTrace, TraceFormatError, tokenExperts } from '../src/offload/trace.js';
import { tempDir } from './helpers/models.js';
import { realTrace } from './helpers/real-traces.js';

const HEAD = '# moe-trace v1\n# model=tiny layers=2 experts=8 top_k=2 source=unit test (generated)\nrequest,phase,position,layer,experts,weights\n';
const GOOD =
  HEAD +
  '0,prefill,0,0,1 2,0.6 0.4\n0,prefill,0,1,3 4,0.5 0.5\n0,decode,1,0,1 5,\n0,decode,1,1,6 7,0.9 0.1\n' +
  '# a comment between rows\n' +
  '1,prefill,0,0,0 7,0.5 0.5\n1,prefill,0,1,2 3,0.5 0.5\n';

t.test('reads header, requests and tokens', async (t) => {
  const dir = tempDir(t);
  const f = join(dir, 'good.csv');
  writeFileSync(f, GOOD);
  const { header, requests } = await loadTrace(f, { keepWeights: true });
  t.same(header, { model: 'tiny', layers: 2, experts: 8, topK: 2, source: 'unit test (generated)' });
  t.equal(requests.length, 2);
  t.equal(requests[0].tokens.length, 2);
  t.equal(requests[0].prefillTokens, 1);
  t.same(Array.from(tokenExperts(requests[0].tokens[1], 0, 2)), [1, 5]);
  t.same(Array.from(tokenExperts(requests[0].tokens[1], 1, 2)), [6, 7]);
  t.ok(Number.isNaN(requests[0].tokens[1].weights![0]), 'unrecorded weights are NaN');
  t.equal(requests[1].id, 1);
});

t.test('a position may skip layers (llama.cpp prefill skips the last layer)', async (t) => {
  const text = HEAD + '0,prefill,0,0,1 2,\n0,decode,1,0,3 4,\n0,decode,1,1,5 6,\n';
  const { requests } = await loadTrace(Readable.from([text]));
  t.equal(tokenExperts(requests[0].tokens[0], 1, 2).length, 0);
});

const BAD: [string, string, number, RegExp][] = [
  ['not a trace', 'hello\n', 1, /moe-trace v1/],
  ['bad header field', '# moe-trace v1\n# model=x layers=two experts=8 top_k=2\n', 2, /layers=two/],
  ['missing top_k', '# moe-trace v1\n# model=x layers=2 experts=8\n', 2, /top_k/],
  ['wrong columns', '# moe-trace v1\n# layers=2 experts=8 top_k=2\nreq,phase\n', 3, /column line/],
  ['expert out of range', HEAD + '0,prefill,0,0,1 8,\n', 4, /expert id "8" out of range/],
  ['non-integer expert', HEAD + '0,prefill,0,0,1 x,\n', 4, /expert id "x"/],
  ['wrong k', HEAD + '0,prefill,0,0,1 2 3,\n', 4, /top_k=2 experts, got 3/],
  ['duplicate expert', HEAD + '0,prefill,0,0,3 3,\n', 4, /listed twice/],
  ['weights count', HEAD + '0,prefill,0,0,1 2,0.5\n', 4, /weights/],
  ['layer out of range', HEAD + '0,prefill,0,2,1 2,\n', 4, /layer 2 out of range/],
  ['position gap', HEAD + '0,prefill,0,0,1 2,\n0,prefill,2,0,1 2,\n', 5, /position 2 follows position 0/],
  ['position backwards', HEAD + '0,prefill,0,0,1 2,\n0,prefill,1,0,1 2,\n0,prefill,0,1,1 2,\n', 6, /position 0 follows position 1/],
  ['layer order', HEAD + '0,prefill,0,1,1 2,\n0,prefill,0,0,1 2,\n', 5, /layer 0 after layer 1/],
  ['prefill after decode', HEAD + '0,decode,0,0,1 2,\n0,prefill,1,0,1 2,\n', 5, /prefill row/],
  ['request not contiguous', HEAD + '0,decode,0,0,1 2,\n1,decode,0,0,1 2,\n0,decode,1,0,1 2,\n', 6, /contiguous/],
  ['field count', HEAD + '0,decode,0,0\n', 4, /6 comma-separated/],
  ['bad phase', HEAD + '0,train,0,0,1 2,\n', 4, /phase "train"/],
];

for (const [what, text, line, re] of BAD) {
  t.test(`rejects: ${what}`, async (t) => {
    const dir = tempDir(t);
    const f = join(dir, 'bad.csv');
    writeFileSync(f, text);
    const err = await loadTrace(f).then(
      () => null,
      (e: unknown) => e,
    );
    t.ok(err instanceof TraceFormatError, 'a TraceFormatError');
    const e = err as TraceFormatError;
    t.equal(e.line, line, 'names the line');
    t.match(e.message, re);
    t.match(e.message, `bad.csv:${line}:`);
  });
}

t.test('a stream delivered in small chunks (lines split across chunks)', async (t) => {
  // Many requests so the input spans many chunks; chunk size 7 splits every line.
  let text = HEAD.replace('layers=2', 'layers=3');
  const n = 200;
  for (let r = 0; r < n; r++) for (let p = 0; p < 3; p++) for (let l = 0; l < 3; l++) text += `${r},${p === 0 ? 'prefill' : 'decode'},${p},${l},${(r + p + l) % 8} ${(r + p + l + 1) % 8},\n`;
  const chunks: string[] = [];
  for (let i = 0; i < text.length; i += 7) chunks.push(text.slice(i, i + 7));
  let got = 0;
  let lastOk = true;
  for await (const req of readTrace(Readable.from(chunks), () => {}, { name: 'chunked' })) {
    lastOk &&= req.id === got && req.tokens.length === 3 && tokenExperts(req.tokens[2], 2, 2)[0] === (req.id + 4) % 8;
    got++;
  }
  t.equal(got, n);
  t.ok(lastOk, 'every request read intact');
});

t.test('the shipped real traces', async (t) => {
  for (const [f, L, prefill, decode] of [
    ['qwen3-30b-a3b', 48, 28, 128],
    ['gemma4-26b-a4b', 30, 29, 128],
  ] as const) {
    const { header, requests } = await loadTrace(realTrace(f));
    t.equal(header.layers, L);
    t.equal(header.topK, 6);
    t.equal(requests.length, 1);
    t.equal(requests[0].prefillTokens, prefill);
    t.equal(requests[0].tokens.length, prefill + decode);
  }
});
