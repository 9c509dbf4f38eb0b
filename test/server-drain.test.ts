// SIGTERM in a real server process (the CLI's `serve` command, run from source through
// tsx so it does not depend on a build): /ready turns 503, new requests get 503 in the
// OpenAI shape, the in-flight stream finishes normally, then the process exits 0.

import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import t from 'tap';
import { request } from 'undici';
import { tinyModelDir } from './helpers/server-harness.js';

const MAIN = pathToFileURL(join(import.meta.dirname, '..', 'src', 'cli', 'main.ts')).href;

t.test('SIGTERM drains and exits 0', async (t) => {
  const dir = tinyModelDir(t);
  const args = ['serve', '--model', dir, '--model-id', 'tiny', '--port', '0', '--drain-grace-seconds', '30', '--log-level', 'silent'];
  const code = `const { main } = await import(${JSON.stringify(MAIN)}); process.exitCode = await main(${JSON.stringify(args)});`;
  const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  const exited = new Promise<number | null>((resolve) => child.once('exit', (c) => resolve(c)));
  const killer = setTimeout(() => child.kill('SIGKILL'), 120_000);
  t.teardown(() => {
    clearTimeout(killer);
    if (child.exitCode === null) child.kill('SIGKILL');
  });
  const url = await new Promise<string>((resolve, reject) => {
    child.stderr.on('data', (d: Buffer) => {
      stderr += d.toString();
      const m = /ready: serving \S+ at (http:\/\/\S+)\/v1/.exec(stderr);
      if (m) resolve(m[1]);
    });
    void exited.then(() => reject(new Error(`the server exited early:\n${stderr}`)));
  });
  t.match(stderr, /loading tokenizer[\s\S]*starting the engine[\s\S]*listening on http:\/\/127\.0\.0\.1:\d+[\s\S]*loaded in/, 'start-up logs loading progress, then the address');

  const r = await request(`${url}/v1/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'tiny', prompt: 'A long story', max_tokens: 480, temperature: 0.7, seed: 2, stream: true, ignore_eos: true }),
  });
  t.equal(r.statusCode, 200);
  let text = '';
  let streamEnded = 0;
  const reading = (async () => {
    for await (const chunk of r.body) text += chunk.toString();
    streamEnded = performance.now();
  })();
  while (!text.includes('data: ')) await new Promise((res) => setTimeout(res, 5));

  child.kill('SIGTERM');
  let notReadyAt = 0;
  for (let i = 0; i < 500 && notReadyAt === 0; i++) {
    const ready = await request(`${url}/ready`);
    await ready.body.dump();
    if (ready.statusCode === 503) notReadyAt = performance.now();
    else await new Promise((res) => setTimeout(res, 2));
  }
  t.ok(notReadyAt > 0, '/ready answers 503 while draining');
  const late = await request(`${url}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'tiny', messages: [{ role: 'user', content: 'hi' }] }),
  });
  const lateBody = (await late.body.json()) as { error: { code: string; type: string } };
  const lateAt = performance.now();
  t.equal(late.statusCode, 503, 'new requests are refused');
  t.equal(lateBody.error.code, 'server_shutting_down');

  await reading;
  t.ok(streamEnded === 0 || streamEnded > lateAt, 'the stream was still running while new requests were refused');
  const frames = text.trim().split('\n\n');
  t.equal(frames.at(-1), 'data: [DONE]', 'the in-flight stream finished');
  const last = JSON.parse(frames.at(-2)!.slice(6));
  t.ok(last.choices[0].finish_reason === 'length' || last.choices[0].finish_reason === 'stop', 'finished normally, not cancelled');
  t.equal(await exited, 0, 'exit code 0');
  t.match(stderr, /SIGTERM: draining[\s\S]*stopped/);
});
