// The engine through its real worker thread, on a tiny generated checkpoint: its
// tokens equal the single-sequence reference generation whatever the batching,
// chunking or preemption, and requests finish, cancel and report as the contract says.

import { existsSync, readdirSync } from 'node:fs';
import t from 'tap';
import { startEngine } from '../src/engine/engine-client.js';
import { EngineLoop } from '../src/engine/engine-loop.js';
import { RequestSampler } from '../src/engine/sampler.js';
import type { ModelRunner, StepSequence } from '../src/engine/runner.js';
import type { ModelSpec } from '../src/model/spec.js';
import { generateTokens } from '../src/engine/generate.js';
import {
  QueueFullError,
  type EngineClient,
  type EngineEvent,
  type EngineOptions,
  type GeneratedToken,
  type GenerationRequest,
} from '../src/engine/protocol.js';
import type { SamplingParams } from '../src/engine/sampling.js';
import { openModel } from '../src/model/checkpoint.js';
import { ReferenceModel } from '../src/model/reference.js';
import { writeModel } from './helpers/models.js';

type Finished = Extract<EngineEvent, { type: 'finished' }>;

interface Result {
  tokens: GeneratedToken[];
  ids: number[];
  finished: Finished;
}

function request(id: string, promptTokens: number[], over: Partial<GenerationRequest> = {}): GenerationRequest {
  return {
    id,
    promptTokens,
    maxTokens: 8,
    sampling: { temperature: 0, topP: 1, topK: 0, minP: 0 },
    seed: 0,
    penalties: { frequency: 0, presence: 0, repetition: 1 },
    stopTokenIds: [],
    logprobs: null,
    ...over,
  };
}

function run(engine: EngineClient, req: GenerationRequest, onToken?: (n: number) => void): Promise<Result> {
  return new Promise((resolve, reject) => {
    const tokens: GeneratedToken[] = [];
    engine.submit(req, (e) => {
      if (e.type === 'tokens') {
        tokens.push(...e.tokens);
        onToken?.(tokens.length);
        return;
      }
      if (e.reason === 'error' && !req.id.startsWith('expect-error')) reject(new Error(e.error));
      else resolve({ tokens, ids: tokens.map((x) => x.id), finished: e });
    });
  });
}

const options = (modelDir: string, over: Partial<EngineOptions> = {}): EngineOptions => ({
  modelDir,
  modelId: 'tiny',
  runner: 'reference',
  kvBlockSize: 4,
  kvBlocks: 256,
  maxBatchTokens: 16,
  maxRunning: 8,
  maxWaiting: 32,
  policy: 'fcfs',
  ...over,
});

const threads = () => readdirSync('/proc/self/task').length;

t.test('engine worker on a tiny qwen3_moe checkpoint', async (t) => {
  const dir = writeModel(t, { arch: 'qwen3_moe' });
  const m = await openModel(dir);
  t.teardown(() => m.close());
  const model = ReferenceModel.fromSource(m.spec, (name) => m.weights.float32(name));
  const vocabLimit = m.tokenizer.vocabSize;
  const prompts = [
    'The quick brown fox jumps over the lazy dog.',
    'Experts are cached in fast memory',
    'hello',
    'A mixture of experts routes each token to a few of its feed-forward blocks, chosen by a router.',
    'one two three four five six',
    'Paris is the capital of',
    '0123456789',
    'Why is the sky blue?',
  ].map((s) => m.tokenizer.encode(s));
  const reference = (prompt: number[], maxTokens: number, sampling: SamplingParams, seed: number) =>
    [...generateTokens(model, prompt, { maxTokens, sampling, seed, stopIds: [], vocabLimit })];
  const warm: SamplingParams = { temperature: 0.9, topP: 0.95, topK: 50, minP: 0 };

  const engine = startEngine(options(dir));
  t.teardown(() => engine.close());
  const info = await engine.ready;
  t.match(info, { id: 'tiny', contextLength: m.spec.maxPositionEmbeddings, vocabSize: vocabLimit });
  t.ok(info.eosTokenIds.length > 0);

  t.test('greedy output equals generateTokens on the reference model', async (t) => {
    // The long prompt spans several 16-token chunks.
    const r = await run(engine, request('greedy', prompts[3], { maxTokens: 10 }));
    t.same(r.ids, reference(prompts[3], 10, { temperature: 0, topP: 1, topK: 0, minP: 0 }, 0));
    t.match(r.finished, { reason: 'length', promptTokens: prompts[3].length, completionTokens: 10 });
    t.ok(r.finished.queueMs >= 0);
  });

  t.test('a seed gives the same tokens alone and batched with 7 other requests', async (t) => {
    const alone = await run(engine, request('alone', prompts[0], { sampling: warm, seed: 1234, maxTokens: 8 }));
    t.same(alone.ids, reference(prompts[0], 8, warm, 1234), 'and equals the seeded reference generation');
    const batch = await Promise.all(
      prompts.map((p, i) => run(engine, request(`batched-${i}`, i === 0 ? prompts[0] : p, { sampling: warm, seed: i === 0 ? 1234 : i, maxTokens: 8 }))),
    );
    t.same(batch[0].ids, alone.ids);
    t.not(batch[1].ids.join(), batch[0].ids.join(), 'other requests do differ');
    t.ok(engine.stats().steps > 0);
  });

  t.test('logprobs are log-softmax values with a sorted top list', async (t) => {
    const r = await run(engine, request('logprobs', prompts[1], { logprobs: 5, maxTokens: 6 }));
    const first = model.forward(prompts[1], model.newCache()).subarray((prompts[1].length - 1) * m.spec.vocabSize);
    let z = 0;
    for (let i = 0; i < vocabLimit; i++) z += Math.exp(first[i]);
    t.ok(Math.abs(r.tokens[0].logprob! - (first[r.ids[0]] - Math.log(z))) < 1e-6, 'log-softmax of the raw logits');
    for (const tok of r.tokens) {
      const top = tok.top!;
      t.equal(top.length, 5);
      t.ok(top.every((x, i) => i === 0 || x.logprob <= top[i - 1].logprob), 'sorted, most likely first');
      t.ok(top.reduce((a, x) => a + Math.exp(x.logprob), 0) <= 1 + 1e-9);
      t.ok(tok.logprob! <= 0);
      t.equal(top[0].id, tok.id, 'greedy picks the top token');
      t.equal(top[0].logprob, tok.logprob);
    }
    const none = await run(engine, request('no-logprobs', prompts[1], { maxTokens: 2 }));
    t.equal(none.tokens[0].logprob, undefined);
    const zero = await run(engine, request('zero-logprobs', prompts[1], { maxTokens: 2, logprobs: 0 }));
    t.same(zero.tokens[0].top, []);
    t.ok(zero.tokens[0].logprob! <= 0);
  });

  t.test('a stop token ends with reason stop, not emitted; max tokens with length', async (t) => {
    const free = await run(engine, request('free', prompts[5], { maxTokens: 6 }));
    t.match(free.finished, { reason: 'length', completionTokens: 6 });
    const k = free.ids.findIndex((id, i) => i > 0 && !free.ids.slice(0, i).includes(id));
    t.ok(k > 0);
    const stopped = await run(engine, request('stopped', prompts[5], { maxTokens: 6, stopTokenIds: [free.ids[k]] }));
    t.same(stopped.ids, free.ids.slice(0, k));
    t.match(stopped.finished, { reason: 'stop', completionTokens: k });
    const one = await run(engine, request('one', prompts[5], { maxTokens: 1 }));
    t.same(one.ids, free.ids.slice(0, 1));
    t.equal(one.finished.reason, 'length');
  });

  t.test('cancelling mid-generation frees the KV blocks', async (t) => {
    let cancelled = false;
    const r = await run(engine, request('cancel-me', prompts[0], { maxTokens: 400 }), (n) => {
      if (n === 3 && !cancelled) {
        cancelled = true;
        engine.cancel('cancel-me');
      }
    });
    t.equal(r.finished.reason, 'abort');
    t.ok(r.finished.completionTokens >= 3 && r.finished.completionTokens < 400);
    t.equal(engine.stats().kvBlocksUsed, 0, 'stats pushed with the abort show the blocks back');
    t.equal(engine.stats().running, 0);
    engine.cancel('cancel-me'); // unknown now: a no-op
  });

  t.test('requests the engine cannot serve finish with an error', async (t) => {
    const bad = await run(engine, request('expect-error-token', [1, m.spec.vocabSize + 5]));
    t.match(bad.finished.error, /outside the vocabulary/);
    t.throws(() => {
      engine.submit(request('dup', prompts[0]), () => {});
      engine.submit(request('dup', prompts[0]), () => {});
    }, /already in the engine/);
    engine.cancel('dup');
  });

  t.test('a preempted sequence produces the same tokens as an unpreempted one', async (t) => {
    // Each request needs up to ~10 + 24 - 1 positions = 9 blocks of 4; the pool has 12.
    const tiny = startEngine(options(dir, { kvBlocks: 12, maxBatchTokens: 8 }));
    t.teardown(() => tiny.close());
    await tiny.ready;
    const reqs = [0, 1, 2].map((i) => request(`p${i}`, prompts[i + 4], { sampling: warm, seed: 77 + i, maxTokens: 24 }));
    const squeezed = await Promise.all(reqs.map((r) => run(tiny, r)));
    t.ok(tiny.stats().preemptions > 0, `preempted ${tiny.stats().preemptions} times`);
    t.equal(tiny.stats().kvBlocksUsed, 0);
    // Never fits, even alone: refused instead of preempting forever.
    const big = await run(tiny, request('expect-error-kv', prompts[0], { maxTokens: 48 }));
    t.match(big.finished, { reason: 'error', completionTokens: 0 });
    t.match(big.finished.error, /KV pool holds 48/);
    const roomy = await Promise.all(reqs.map((r) => run(engine, { ...r, id: `roomy-${r.id}` })));
    t.equal(engine.stats().preemptions, 0);
    for (let i = 0; i < 3; i++) {
      t.same(squeezed[i].ids, roomy[i].ids, `request ${i}`);
      t.equal(squeezed[i].finished.reason, 'length');
    }
  });

  t.test('the waiting queue bound throws QueueFullError at submit', async (t) => {
    const small = startEngine(options(dir, { maxWaiting: 2, maxRunning: 1 }));
    t.teardown(() => small.close());
    await small.ready;
    const runs = [run(small, request('q0', prompts[2], { maxTokens: 3 })), run(small, request('q1', prompts[2], { maxTokens: 3 }))];
    let err: unknown;
    try {
      small.submit(request('q2', prompts[2]), () => {});
    } catch (e) {
      err = e;
    }
    t.ok(err instanceof QueueFullError);
    t.ok((err as QueueFullError).retryAfterSeconds >= 1);
    const done = await Promise.all(runs);
    t.same(
      done.map((d) => d.finished.reason),
      ['length', 'length'],
    );
  });

  t.test('the native runner in the worker: greedy output equals the reference, seeds hold under batching', async (t) => {
    const native = startEngine(options(dir, { runner: 'native', weights: 'f32', threads: 2 }));
    t.teardown(() => native.close());
    await native.ready;
    const greedy = await run(native, request('native-greedy', prompts[3], { maxTokens: 10 }));
    t.same(greedy.ids, reference(prompts[3], 10, { temperature: 0, topP: 1, topK: 0, minP: 0 }, 0));
    const alone = await run(native, request('native-alone', prompts[0], { sampling: warm, seed: 99, maxTokens: 8 }));
    const batch = await Promise.all(
      prompts.map((p, i) => run(native, request(`native-batched-${i}`, p, { sampling: warm, seed: i === 0 ? 99 : i, maxTokens: 8 }))),
    );
    t.same(batch[0].ids, alone.ids);
    t.equal(native.stats().kvBlocksUsed, 0, 'every block back in the pool');
  });

  t.test('close() aborts what is in flight and stops the worker', { skip: !existsSync('/proc/self/task') && 'needs /proc' }, async (t) => {
    await engine.close();
    const before = threads();
    const e = startEngine(options(dir));
    await e.ready;
    t.ok(threads() > before, 'the engine runs on its own thread');
    const inflight = run(e, request('inflight', prompts[0], { maxTokens: 400 }), () => {});
    await new Promise((r) => setTimeout(r, 50));
    await e.close();
    t.equal((await inflight).finished.reason, 'abort');
    t.throws(() => e.submit(request('late', prompts[0]), () => {}), /closed/);
    for (let i = 0; i < 50 && threads() > before; i++) await new Promise((r) => setTimeout(r, 20));
    t.equal(threads(), before, 'no worker thread left');
    await e.close(); // idempotent
  });
});

t.test('engine loop without a worker: a failing step fails its requests, not the loop', async (t) => {
  const V = 8;
  const released: number[] = [];
  // Next token = position mod V; a prompt starting with 7 makes the whole step throw.
  const runner: ModelRunner = {
    spec: { vocabSize: V } as ModelSpec,
    kv: { blockSize: 2, numBlocks: 40 },
    step(batch: StepSequence[]) {
      if (batch.some((b) => b.startPos === 0 && b.tokens[0] === 7)) throw new Error('kernel exploded');
      const rows = batch.filter((b) => b.wantLogits);
      const logits = new Float32Array(rows.length * V);
      rows.forEach((b, r) => (logits[r * V + ((b.startPos + b.tokens.length) % V)] = 5));
      return { logits, rows: rows.length };
    },
    release: (seqId) => released.push(seqId),
    close() {},
  };
  const events: EngineEvent[] = [];
  const loop = new EngineLoop(
    runner,
    { kvBlockSize: 2, kvBlocks: 40, maxBatchTokens: 8, maxRunning: 4, maxWaiting: 8, policy: 'fcfs', vocabLimit: V, contextLength: 64 },
    (e) => events.push(e),
  );
  const finished = (id: string) => events.find((e): e is Finished => e.type === 'finished' && e.requestId === id);
  loop.submit(request('ok', [1, 2, 3], { maxTokens: 3 }));
  t.ok(loop.step());
  loop.submit(request('poison', [7, 1], { maxTokens: 3 }));
  loop.step();
  t.match(finished('poison'), { reason: 'error', error: /model step: kernel exploded/ });
  t.match(finished('ok'), { reason: 'error' }, 'the whole failed batch fails');
  t.equal(loop.stats().kvBlocksUsed, 0);
  t.equal(loop.hasWork(), false);
  loop.submit(request('after', [1, 2, 3], { maxTokens: 3 }));
  while (loop.step());
  t.match(finished('after'), { reason: 'length', completionTokens: 3 }, 'the loop goes on');
  const tokens = events.filter((e) => e.type === 'tokens' && e.requestId === 'after').flatMap((e) => (e.type === 'tokens' ? e.tokens.map((x) => x.id) : []));
  t.same(tokens, [3, 4, 5]);

  loop.submit(request('cancelled', [1, 2, 3, 4, 5], { maxTokens: 10 }));
  loop.step();
  t.equal(loop.stats().kvBlocksUsed, 3);
  loop.cancel('cancelled');
  t.equal(loop.stats().kvBlocksUsed, 0, 'cancel frees the blocks at once');
  t.match(finished('cancelled'), { reason: 'abort', completionTokens: 1 });
  t.ok(released.length >= 3, 'the runner forgets finished sequences');

  loop.submit(request('long', [1, 2, 3, 4, 5], { maxTokens: 100 }));
  while (loop.step());
  t.match(finished('long'), { reason: 'length', completionTokens: 60 }, 'the context (64) caps it: the last token needs no position');
  loop.submit(request('too-long', Array.from({ length: 65 }, () => 1)));
  t.match(finished('too-long'), { reason: 'error', error: /the prompt has 65 tokens; the model's context is 64/ });
});

t.test('sampler: penalties, vocabulary limit, stop and length', async (t) => {
  const V = 6;
  // Ids 4 and 5 are embedding padding past the tokenizer's vocabulary (limit 4).
  const logits = Float32Array.from([2, 1.9, 1.5, -1, 50, 50]);
  const greedy = (over: Partial<GenerationRequest>) => new RequestSampler(request('s', [3], over), 4);
  const picks = (s: RequestSampler, n: number) => Array.from({ length: n }, () => s.next(logits, 0, V).token?.id);
  t.same(picks(greedy({}), 3), [0, 0, 0], 'padding ids are never sampled');
  t.same(picks(greedy({ penalties: { frequency: 0, presence: 0.15, repetition: 1 } }), 4), [0, 1, 0, 0], 'presence: a flat amount once seen');
  t.same(picks(greedy({ penalties: { frequency: 0.3, presence: 0, repetition: 1 } }), 4), [0, 1, 0, 1], 'frequency: grows with the count');
  const rep = new RequestSampler(request('r', [0], { penalties: { frequency: 0, presence: 0, repetition: 2 } }), 4);
  t.same(picks(rep, 2), [1, 2], 'repetition over the prompt (2 / 2 = 1 < 1.9) and the output');
  const neg = new RequestSampler(request('n', [3], { penalties: { frequency: 0, presence: 0, repetition: 2 } }), 4);
  const l2 = Float32Array.from([-1, -1.5, -3, -1.2]);
  t.equal(neg.next(l2, 0, 4).token?.id, 0, 'the prompt token 3 is pushed down: -1.2 → -2.4');
  t.equal(neg.next(l2, 0, 4).token?.id, 1, 'a negative logit is multiplied: -1 → -2');
  const bias = (logitBias: [number, number][], frequency = 0) => greedy({ penalties: { frequency, presence: 0, repetition: 1, logitBias } });
  t.same(picks(bias([[2, 0.6]]), 2), [2, 2], 'logit bias: added to the logit (1.5 + 0.6 > 2)');
  t.same(picks(bias([[0, -100]]), 2), [1, 1], 'logit bias -100: the token is never picked');
  t.same(picks(bias([[2, 0.45]], 0.3), 3), [0, 2, 1], 'the bias comes on top of the frequency penalty');
  t.same(picks(bias([[5, 100]]), 2), [0, 0], 'a bias on an id past the vocabulary limit changes nothing');
  const biasedLp = greedy({ logprobs: 1, penalties: { frequency: 0, presence: 0, repetition: 1, logitBias: [[1, 5]] } }).next(logits, 0, V).token!;
  t.equal(biasedLp.id, 1);
  t.same(
    biasedLp.top!.map((x) => x.id),
    [0],
    'logprobs stay those of the raw logits',
  );
  const stop = greedy({ stopTokenIds: [0] });
  t.same(stop.next(logits, 0, V), { token: null, finish: 'stop' });
  const two = greedy({ maxTokens: 2 });
  t.equal(two.next(logits, 0, V).finish, null);
  t.equal(two.next(logits, 0, V).finish, 'length');
  const lp = greedy({ logprobs: 2 }).next(logits, 0, V).token!;
  const z = Math.log(Math.exp(2) + Math.exp(1.9) + Math.exp(1.5) + Math.exp(-1));
  t.ok(Math.abs(lp.logprob! - (2 - z)) < 1e-6, 'log-softmax over the tokenizer ids');
  t.same(
    lp.top!.map((x) => x.id),
    [0, 1],
  );
  const a = new RequestSampler(request('x', [1], { seed: null, sampling: { temperature: 1, topP: 1, topK: 0, minP: 0 } }), 4);
  t.ok([0, 1, 2, 3].includes(a.next(logits, 0, V).token!.id), 'a null seed samples from a random stream');
});
