// Pure parts of the server (stop matcher, seeds, param paths, settings loading), and
// with a scripted fake engine the failures the real engine cannot be made to produce
// on demand: an engine error mid-stream and a model that fails to load.

import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { selectBestOf } from '../src/server/completions-route.js';
import type { ChoiceRun } from '../src/server/generation.js';
import { ConfigError, loadSettings, settingSpecs } from '../src/config.js';
import { MoeTokenizer } from '../src/model/tokenizer.js';
import { buildApp } from '../src/server/app.js';
import { paramPath } from '../src/server/error-handler.js';
import { deriveSeed } from '../src/server/request-mapping.js';
import { StopMatcher } from '../src/server/stop-matcher.js';
import { settingsFromArgv } from '../src/cli/serve-cmd.js';
import { FakeEngine } from './helpers/fake-engine.js';
import { tempDir } from './helpers/models.js';
import { MODEL_ID, tinyModelDir } from './helpers/server-harness.js';

t.test('stop matcher holds back possible starts and cuts at the earliest stop', async (t) => {
  const m = new StopMatcher(['END', 'xyz']);
  t.same(m.push('abcE'), { text: 'abc', stopped: false });
  t.ok(m.holding);
  t.same(m.push('N'), { text: '', stopped: false });
  t.same(m.push('Dtail'), { text: '', stopped: true });
  t.equal(m.flush(), '');
  const n = new StopMatcher(['END']);
  t.same(n.push('EN'), { text: '', stopped: false });
  t.same(n.push('x'), { text: 'ENx', stopped: false }, 'released once it cannot be a stop');
  t.same(n.push('E'), { text: '', stopped: false });
  t.equal(n.flush(), 'E', 'the end of output releases the held tail');
  const o = new StopMatcher(['b', 'abc']);
  t.same(o.push('xab'), { text: 'xa', stopped: true }, 'earliest occurrence wins');
  t.same(new StopMatcher([]).push('abc'), { text: 'abc', stopped: false });
  t.same(new StopMatcher(['']).push('abc'), { text: 'abc', stopped: false }, 'empty stop strings are ignored');
});

t.test('seeds: the first choice keeps a 32-bit seed, others differ, large and negative seeds map to 32 bits', async (t) => {
  t.equal(deriveSeed(42, 0), 42);
  const s = new Set([0, 1, 2, 3, 4].map((i) => deriveSeed(42, i)));
  t.equal(s.size, 5);
  for (const x of [-1, 2 ** 40 + 3, -(2 ** 53 - 1), 2 ** 53 - 1]) {
    const v = deriveSeed(x, 0);
    t.ok(Number.isInteger(v) && v >= 0 && v < 2 ** 32, `${x} → ${v}`);
  }
  t.not(deriveSeed(2 ** 40 + 3, 0), deriveSeed(3, 0), 'high bits matter');
});

t.test('param paths', async (t) => {
  t.equal(paramPath('/messages/0/content'), 'messages[0].content');
  t.equal(paramPath('', 'tools'), 'tools');
  t.equal(paramPath('/stream_options', 'x'), 'stream_options.x');
});

t.test('settings: defaults <- file <- env <- flags, validated, frozen', async (t) => {
  const specs = settingSpecs();
  for (const s of specs) {
    t.ok(s.doc.length > 10, `${s.key} documented`);
    t.match(s.env, /^MOE_SERVE_[A-Z_]+$/, `${s.key} has an env variable`);
  }
  const d = loadSettings({ env: {} });
  t.equal(d.port, 8000);
  t.equal(d.host, '127.0.0.1');
  t.same(d.apiKeys, []);
  t.ok(Object.isFrozen(d) && Object.isFrozen(d.apiKeys));
  const dir = tempDir(t);
  const file = join(dir, 'c.json');
  writeFileSync(file, JSON.stringify({ port: 9000, maxWaiting: 0, apiKeys: ['a'], host: '0.0.0.0' }));
  const s = loadSettings({ env: { MOE_SERVE_CONFIG: file, MOE_SERVE_PORT: '9001', MOE_SERVE_API_KEYS: 'x, y' }, flags: { port: '9002' } });
  t.equal(s.port, 9002, 'flag beats env beats file');
  t.equal(s.host, '0.0.0.0', 'file beats default');
  t.equal(s.maxWaiting, 0, 'a deliberate 0 stays 0');
  t.same(s.apiKeys, ['x', 'y']);
  t.throws(() => loadSettings({ env: { MOE_SERVE_PORT: 'eighty' } }), /setting port \(from MOE_SERVE_PORT\) must be an integer in \[0, 65535\], got "eighty"/);
  t.throws(() => loadSettings({ env: {}, flags: { runner: 'gpu' } }), /setting runner \(from --runner\) must be one of reference, native, got "gpu"/);
  writeFileSync(file, JSON.stringify({ prot: 1 }));
  t.throws(() => loadSettings({ env: {}, flags: { config: file } }), /unknown setting "prot"/);
  writeFileSync(file, JSON.stringify({ port: '80' }));
  t.throws(() => loadSettings({ env: {}, flags: { config: file } }), ConfigError, 'the file must use JSON types');
  t.throws(() => settingsFromArgv(['--port', '1'], {}), /--model DIR is required/);
  t.throws(() => settingsFromArgv(['--demo', '--model', 'x'], {}), /either --model DIR or --demo/);
  t.equal(settingsFromArgv(['--demo', '--drain-grace-seconds', '0.5'], {})!.drainGraceSeconds, 0.5);
});

t.test('fake engine (cannot be done with the real one): an engine error mid-stream, a failed load', async (t) => {
  const dir = tinyModelDir(t);
  const tokenizer = await MoeTokenizer.load(dir);
  const info = { id: MODEL_ID, contextLength: 512, vocabSize: tokenizer.vocabSize, eosTokenIds: tokenizer.eosTokenIds };
  const hello = tokenizer.encode('hello world', { addSpecialTokens: false });
  const engine = new FakeEngine(info, () => ({ tokens: hello, end: { reason: 'error', error: 'kernel exploded' } }));
  const app = buildApp({ engine, tokenizer });
  t.teardown(() => app.close());
  await engine.ready;
  const body = { model: MODEL_ID, prompt: 'x', max_tokens: 10 };
  const stream = await app.inject({ method: 'POST', url: '/v1/completions', payload: { ...body, stream: true } });
  t.equal(stream.statusCode, 200);
  const frames = stream.body.trim().split('\n\n');
  t.equal(frames.at(-1), 'data: [DONE]');
  const err = JSON.parse(frames.at(-2)!.slice(6));
  t.equal(err.error.type, 'server_error');
  t.match(err.error.message, /kernel exploded/);
  t.equal(frames.slice(0, -2).map((f) => JSON.parse(f.slice(6)).choices[0].text).join(''), 'hello world', 'the text before the failure was sent');
  const whole = await app.inject({ method: 'POST', url: '/v1/completions', payload: body });
  t.equal(whole.statusCode, 500);
  t.equal(whole.json().error.code, 'engine_error');
  t.equal((await app.inject({ url: '/health' })).statusCode, 200, 'still alive');

  const broken = new FakeEngine(new Error('no such file'), () => ({ tokens: [], end: { reason: 'stop' } }));
  const app2 = buildApp({ engine: broken, tokenizer });
  t.teardown(() => app2.close());
  await new Promise((r) => setImmediate(r));
  const ready = await app2.inject({ url: '/ready' });
  t.equal(ready.statusCode, 503);
  t.equal(ready.json().error.code, 'model_load_failed');
  const gen = await app2.inject({ method: 'POST', url: '/v1/completions', payload: body });
  t.equal(gen.statusCode, 500);
  t.equal(gen.json().error.type, 'server_error');
});

t.test('selectBestOf: per prompt, the n highest mean log probabilities; ties to the lower index; no tokens last', async (t) => {
  const run = (index: number, lps: number[]) => ({ index, tokens: lps.map((logprob) => ({ logprob })) }) as unknown as ChoiceRun;
  const runs = [
    run(0, [-1, -1]), // mean -1
    run(1, []), // no tokens: last
    run(2, [-0.5, -1.5]), // mean -1: ties with 0, which comes first
    run(3, [-0.2]), // best
    run(4, [-3]),
    run(5, [-2, -2]),
    run(6, []),
    run(7, [-2.5]),
  ];
  const got = selectBestOf(runs, 4, 2);
  t.same(
    got.map((x) => [x.run.index, x.index]),
    [
      [3, 0],
      [0, 1],
      [5, 2],
      [7, 3],
    ],
  );
  t.same(selectBestOf([run(0, []), run(1, [])], 2, 1).map((x) => x.run.index), [0], 'all empty: the lower index');
});
