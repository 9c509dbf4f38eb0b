// /metrics of a real server (native engine worker on a tiny generated model, after a few
// requests so that counters and histograms have samples) checked by Prometheus' own
// linter, `promtool check metrics` (Debian package `prometheus`). Skips when promtool is
// not installed.

import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { startTestServer, tinyModelDir, MODEL_ID } from './helpers/server-harness.js';

function which(name: string): string | null {
  for (const dir of (process.env.PATH ?? '').split(':')) if (dir && existsSync(join(dir, name))) return join(dir, name);
  return null;
}

const PROMTOOL = which('promtool');

t.test('promtool check metrics accepts /metrics', { skip: PROMTOOL ? false : 'promtool is not installed (apt-get install prometheus)' }, async (t) => {
  const server = await startTestServer(t, tinyModelDir(t));
  for (const stream of [false, true]) {
    const r = await fetch(`${server.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: MODEL_ID, stream, max_tokens: 4, messages: [{ role: 'user', content: 'Hi' }] }),
    });
    await r.text();
    t.equal(r.status, 200);
  }
  await (await fetch(`${server.url}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{}' })).text();
  const res = await fetch(`${server.url}/metrics`);
  t.match(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
  const text = await res.text();
  for (const name of ['moe_num_requests_waiting', 'moe_num_requests_running', 'moe_request_success_total', 'moe_time_to_first_token_seconds_bucket', 'moe_generation_tokens_total']) {
    t.match(text, new RegExp(`^${name}[{ ]`, 'm'), `${name} is exposed`);
  }
  const check = spawnSync(PROMTOOL!, ['check', 'metrics'], { input: text, encoding: 'utf8' });
  const findings = (check.stdout + check.stderr).split('\n').map((l) => l.trim()).filter((l) => l !== '');
  // Known: three gauges of prom-client's collectDefaultMetrics() carry a _total suffix
  // (nodejs_active_{handles,requests,resources}_total), which promtool flags. They are
  // prom-client's names, not ours; anything else (a parse error, or any finding about
  // a moe_* metric) fails.
  const known = /^nodejs_active_(handles|requests|resources)_total non-counter metrics should not have "_total" suffix$/;
  const unexpected = findings.filter((l) => !known.test(l));
  t.same(unexpected, [], `promtool check metrics (exit ${check.status}): no finding beyond prom-client's default gauges`);
  t.notOk(findings.some((l) => l.includes('moe_')), 'no finding about a moe_* metric');
  if (findings.length > 0) t.comment(`promtool findings on prom-client's default metrics: ${findings.join('; ')}`);
  // Our own metrics alone lint clean.
  const ours = text
    .split('\n')
    .filter((l) => /^(# (HELP|TYPE) )?moe_/.test(l))
    .join('\n');
  const own = spawnSync(PROMTOOL!, ['check', 'metrics'], { input: `${ours}\n`, encoding: 'utf8' });
  t.equal(own.status, 0, `promtool check metrics on the moe_* metrics alone: ${(own.stdout + own.stderr).trim() || 'clean'}`);
});
