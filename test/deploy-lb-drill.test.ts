// Load-balancer drill: nginx (Debian's package) on loopback in front of two real server
// processes (`node bin/moe-serve.js serve --demo --runner native --port P`), and, when
// Debian's `prometheus` is installed, a real Prometheus server scraping both.
//
// How a replica leaves rotation (nginx open source has no active health checks), both:
//  - a /ready poller (this test, standing in for Kubernetes' readiness probe + Endpoints)
//    polls each replica's /ready every 200 ms and, when the ready set changes, rewrites
//    nginx's upstream include (`down` for a replica that is not ready) and reloads nginx
//    (SIGHUP: old workers finish their in-flight streams, new workers take new ones);
//  - passive checks for the moments before the poller notices: `proxy_next_upstream
//    error timeout http_502 http_503 non_idempotent` retries a request on the other
//    replica when one refuses the connection or answers 503 (draining) before any byte
//    went to the client, and `max_fails=1 fail_timeout=5s` keeps it out meanwhile.
//    POSTs are retried (non_idempotent) because a completion that never started has no
//    side effect; nginx never retries once it has sent the client a byte.
//
// Checks: requests spread over both replicas (each replica's moe_request_success_total,
// and nginx's X-Upstream header); SIGTERM to a replica mid-stream: its streams finish
// with [DONE], it exits 0, and no request fails meanwhile; SIGKILL mid-stream: its
// clients see a truncated stream (no [DONE]: detectable), every SSE event they did get
// is complete JSON, the other replica's streams finish, and new requests all succeed on
// the other replica; nothing half-written (no demo-model temp dir left). Bounded: a fixed
// number of requests, loopback only, every process started here is ended by its pid.
//
// Runs from the built package (dist/ and the addon, as `npm install` leaves them); skips
// with the reason when nginx or the build is missing. scripts/lb-drill.sh runs it alone.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { Agent, fetch as ufetch } from 'undici';

const ROOT = join(import.meta.dirname, '..');
const BIN = join(ROOT, 'bin', 'moe-serve.js');

function which(name: string): string | null {
  for (const dir of [...(process.env.PATH ?? '').split(':'), '/usr/sbin', '/sbin']) {
    if (dir && existsSync(join(dir, name))) return join(dir, name);
  }
  return null;
}

const NGINX = which('nginx');
const PROMETHEUS = which('prometheus');
const built = existsSync(join(ROOT, 'dist', 'cli', 'main.js')) && existsSync(join(ROOT, 'build', 'Release', 'moe_native.node'));
const skip = !NGINX
  ? 'nginx is not installed (apt-get install nginx-light)'
  : !built
    ? 'the package is not built (npm install / npm run build)'
    : false;

// Clients of the load balancer open a connection per request: a reload of nginx closes
// its idle client keep-alive connections, and a request sent on one at that moment fails
// on the client side (a keep-alive race of any HTTP/1.1 client, unrelated to the replicas).
const noKeepAlive = new Agent({ pipelining: 0 });
const lbFetch = (url: string, init: Parameters<typeof ufetch>[1] = {}) => ufetch(url, { ...init, dispatcher: noKeepAlive });

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

interface Proc {
  name: string;
  child: ChildProcess;
  /** What ends it gracefully at teardown (nginx: its workers must not be orphaned). */
  stopSignal: NodeJS.Signals;
  log: string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

const procs: Proc[] = [];

function start(name: string, cmd: string, args: string[], env: NodeJS.ProcessEnv = {}, stopSignal: NodeJS.Signals = 'SIGKILL'): Proc {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  const p: Proc = {
    name,
    child,
    stopSignal,
    log: '',
    exited: new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal }))),
  };
  child.stdout!.on('data', (d: Buffer) => (p.log += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (p.log += d.toString()));
  procs.push(p);
  return p;
}

/** Ends what is still running among the processes this test started, each by its pid. */
async function stopAll(): Promise<void> {
  const running = (p: Proc) => p.child.exitCode === null && p.child.signalCode === null;
  for (const p of procs) if (running(p)) p.child.kill(p.stopSignal);
  await Promise.all(procs.map((p) => Promise.race([p.exited, sleep(5000)])));
  for (const p of procs) if (running(p)) p.child.kill('SIGKILL');
  await Promise.all(procs.map((p) => Promise.race([p.exited, sleep(2000)])));
}

async function getStatus(url: string, timeoutMs = 1000): Promise<number> {
  try {
    const r = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) });
    await r.arrayBuffer();
    return r.status;
  } catch {
    return 0;
  }
}

async function waitFor(what: string, cond: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    try {
      if (await cond()) return;
    } catch {
      // not yet
    }
    await sleep(200);
  }
  throw new Error(`timed out waiting for ${what}`);
}

interface Replica {
  port: number;
  proc: Proc;
}

function startReplica(port: number, cacheDir: string): Replica {
  const args = [BIN, 'serve', '--demo', '--runner', 'native', '--port', String(port), '--threads', '1', '--drain-grace-seconds', '30', '--log-level', 'warn'];
  return { port, proc: start(`replica:${port}`, process.execPath, args, { MOE_SERVE_CACHE_DIR: cacheDir }) };
}

/** Sum of moe_request_success_total over its labels, from a replica's /metrics. */
async function servedCount(port: number): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  let n = 0;
  for (const m of text.matchAll(/^moe_request_success_total\{[^}]*\} (\S+)$/gm)) n += Number(m[1]);
  return n;
}

interface Completion {
  status: number;
  upstream: string;
  ok: boolean;
  error?: string;
}

async function complete(lb: string, maxTokens = 4): Promise<Completion> {
  try {
    const r = await lbFetch(`${lb}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'moe-serve-demo', max_tokens: maxTokens, messages: [{ role: 'user', content: 'Hi' }] }),
      signal: AbortSignal.timeout(60_000),
    });
    const body = (await r.json()) as { choices?: { message?: { content?: string } }[] };
    const ok = r.status === 200 && typeof body.choices?.[0]?.message?.content === 'string';
    return { status: r.status, upstream: r.headers.get('x-upstream') ?? '', ok, error: ok ? undefined : JSON.stringify(body).slice(0, 200) };
  } catch (e) {
    return { status: 0, upstream: '', ok: false, error: `${(e as Error).message}${(e as { cause?: Error }).cause ? ` (${(e as { cause?: Error }).cause!.message})` : ''}` };
  }
}

interface Stream {
  upstream: string;
  status: number;
  /** Data events received, parsed (null: not JSON, i.e. half-written). */
  events: unknown[];
  done: boolean;
  finishReason: string | null;
  /** Why reading ended early, if it did (fetch's body error). */
  readError: string | null;
  firstToken: Promise<void>;
  finished: Promise<void>;
}

function openStream(lb: string, maxTokens: number): Stream {
  let gotFirst!: () => void;
  const s: Stream = {
    upstream: '',
    status: 0,
    events: [],
    done: false,
    finishReason: null,
    readError: null,
    firstToken: new Promise<void>((r) => (gotFirst = r)),
    finished: Promise.resolve(),
  };
  s.finished = (async () => {
    let buf = '';
    try {
      const r = await lbFetch(`${lb}/v1/chat/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'moe-serve-demo', stream: true, max_tokens: maxTokens, ignore_eos: true, messages: [{ role: 'user', content: 'Tell me a long story' }] }),
        signal: AbortSignal.timeout(120_000),
      });
      s.status = r.status;
      s.upstream = r.headers.get('x-upstream') ?? '';
      const dec = new TextDecoder();
      for await (const chunk of r.body as unknown as AsyncIterable<Uint8Array>) {
        buf += dec.decode(chunk, { stream: true });
        let i: number;
        while ((i = buf.indexOf('\n\n')) >= 0) {
          const ev = buf.slice(0, i);
          buf = buf.slice(i + 2);
          const data = ev.startsWith('data: ') ? ev.slice(6) : null;
          if (data === null) continue;
          if (data === '[DONE]') {
            s.done = true;
            continue;
          }
          let parsed: unknown = null;
          try {
            parsed = JSON.parse(data);
          } catch {
            parsed = null;
          }
          s.events.push(parsed);
          const choice = (parsed as { choices?: { delta?: { content?: string }; finish_reason?: string | null }[] } | null)?.choices?.[0];
          if (choice?.delta?.content) gotFirst();
          if (choice?.finish_reason) s.finishReason = choice.finish_reason;
        }
      }
    } catch (e) {
      s.readError = (e as Error).message + ((e as { cause?: Error }).cause ? ` (${(e as { cause?: Error }).cause!.message})` : '');
    }
    // A partial event left in the buffer is what a half-written frame would look like.
    if (buf.trim() !== '') s.events.push(null);
    gotFirst();
  })();
  return s;
}

t.test('nginx in front of two replicas: spread, SIGTERM drain, SIGKILL, Prometheus', { skip, timeout: 280_000 }, async (t) => {
  const t0 = Date.now();
  const secs = () => ((Date.now() - t0) / 1000).toFixed(1);
  const dir = mkdtempSync(join(tmpdir(), 'moe-lb-drill-'));
  chmodSync(dir, 0o755); // nginx's workers run as nobody when the master is root
  const cacheDir = process.env.MOE_SERVE_CACHE_DIR || join(process.env.XDG_CACHE_HOME || join(process.env.HOME ?? tmpdir(), '.cache'), 'moe-serve');
  t.teardown(async () => {
    await stopAll();
    rmSync(dir, { recursive: true, force: true });
  });

  const [portA, portB, portLb, portProm] = [await freePort(), await freePort(), await freePort(), await freePort()];
  const lb = `http://127.0.0.1:${portLb}`;
  const replicas = new Map<number, Replica>();
  replicas.set(portA, startReplica(portA, cacheDir));
  replicas.set(portB, startReplica(portB, cacheDir));

  // ---- nginx ---------------------------------------------------------------------
  const upstreamFile = join(dir, 'upstream.conf');
  // The upstream block, and a generation number nginx echoes in X-Drill-Generation, so
  // the poller knows when a reload has taken effect (SIGHUP is asynchronous).
  let generation = 0;
  const writeUpstream = (ready: Set<number>) => {
    generation++;
    const lines = [portA, portB].map((p) => `  server 127.0.0.1:${p} max_fails=1 fail_timeout=5s${ready.has(p) ? '' : ' down'};`);
    writeFileSync(upstreamFile, `upstream moe {\n${lines.join('\n')}\n  keepalive 16;\n}\nmap "" $drill_generation { default "${generation}"; }\n`);
  };
  writeUpstream(new Set([portA, portB]));
  const conf = join(dir, 'nginx.conf');
  writeFileSync(
    conf,
    `worker_processes 1;
daemon off;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections 512; }
http {
  log_format drill '$status $upstream_addr $upstream_status $request_time "$request"';
  access_log ${dir}/access.log drill;
  client_body_temp_path ${dir}/client_body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  include ${upstreamFile};
  server {
    listen 127.0.0.1:${portLb};
    location / {
      proxy_pass http://moe;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering on;
      proxy_read_timeout 300s;
      proxy_next_upstream error timeout http_502 http_503 non_idempotent;
      proxy_next_upstream_tries 2;
      add_header X-Upstream $upstream_addr always;
      add_header X-Drill-Generation $drill_generation always;
    }
    location = /drill-generation {
      return 200 "$drill_generation";
    }
  }
}
`,
  );
  const check = spawnSync(NGINX!, ['-t', '-c', conf, '-e', join(dir, 'error.log')], { encoding: 'utf8' });
  t.equal(check.status, 0, `nginx -t: ${check.stderr.trim().split('\n').pop()}`);
  const nginx = start('nginx', NGINX!, ['-c', conf, '-e', join(dir, 'error.log')], {}, 'SIGTERM');

  // ---- the /ready poller (readiness -> upstream) -----------------------------------
  let inRotation = new Set([portA, portB]);
  let reloads = 0;
  const rotationLog: string[] = [];
  let polling = true;
  const poller = (async () => {
    while (polling) {
      const ready = new Set<number>();
      for (const p of [portA, portB]) if ((await getStatus(`http://127.0.0.1:${p}/ready`, 500)) === 200) ready.add(p);
      const changed = ready.size !== inRotation.size || [...ready].some((p) => !inRotation.has(p));
      if (changed && ready.size > 0) {
        writeUpstream(ready);
        nginx.child.kill('SIGHUP');
        reloads++;
        const want = String(generation);
        const end = Date.now() + 5000;
        while (Date.now() < end) {
          try {
            if ((await (await lbFetch(`${lb}/drill-generation`)).text()) === want) break;
          } catch {
            // nginx between workers
          }
          await sleep(20);
        }
        rotationLog.push(`${secs()} s: in rotation ${[...ready].map((p) => (p === portA ? 'A' : 'B')).join(', ')}`);
        inRotation = ready;
      }
      await sleep(200);
    }
  })();
  t.teardown(async () => {
    polling = false;
    await poller;
  });

  // ---- Prometheus (when installed) -------------------------------------------------
  let prom: Proc | null = null;
  if (PROMETHEUS) {
    const promConf = join(dir, 'prometheus.yml');
    writeFileSync(
      promConf,
      `global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: moe-serve\n    metrics_path: /metrics\n    static_configs:\n      - targets: ['127.0.0.1:${portA}', '127.0.0.1:${portB}']\n`,
    );
    prom = start('prometheus', PROMETHEUS, [
      `--config.file=${promConf}`,
      `--storage.tsdb.path=${join(dir, 'prom-data')}`,
      `--web.listen-address=127.0.0.1:${portProm}`,
      '--storage.tsdb.retention.time=1h',
      '--log.level=warn',
    ], {}, 'SIGTERM');
  }

  await waitFor('both replicas ready', async () => (await getStatus(`http://127.0.0.1:${portA}/ready`)) === 200 && (await getStatus(`http://127.0.0.1:${portB}/ready`)) === 200, 150_000);
  await waitFor('nginx', async () => (await getStatus(`${lb}/drill-generation`)) === 200, 10_000);
  await waitFor('both replicas in rotation', async () => inRotation.has(portA) && inRotation.has(portB) && generation > 0 ? (await (await lbFetch(`${lb}/drill-generation`)).text()) === String(generation) : false, 10_000);
  t.pass(`${secs()} s: replicas A (port ${portA}) and B (port ${portB}) ready, nginx on ${portLb}`);

  // ---- 1. requests spread over both ------------------------------------------------
  const before = [await servedCount(portA), await servedCount(portB)];
  const spread: Completion[] = [];
  for (let round = 0; round < 6; round++) spread.push(...(await Promise.all([0, 1, 2, 3].map(() => complete(lb)))));
  const after = [await servedCount(portA), await servedCount(portB)];
  const perReplica = [after[0] - before[0], after[1] - before[1]];
  t.equal(spread.filter((c) => !c.ok).length, 0, `spread: no failed request ${spread.filter((c) => !c.ok).map((c) => c.error).join('; ')}`);
  t.ok(perReplica[0] > 0 && perReplica[1] > 0, `spread: each replica served some (${perReplica.join(' / ')} of ${spread.length} by moe_request_success_total)`);
  t.equal(perReplica[0] + perReplica[1], spread.length, 'spread: the counters add up to the requests sent');

  // ---- 6b. Prometheus scraped both -------------------------------------------------
  if (prom) {
    const q = `http://127.0.0.1:${portProm}/api/v1/query?query=${encodeURIComponent('sum by (instance) (moe_request_success_total)')}`;
    let result: { metric: { instance: string }; value: [number, string] }[] = [];
    await waitFor('Prometheus to scrape both replicas with the spread counted', async () => {
      try {
        const body = (await (await fetch(q)).json()) as { data?: { result?: typeof result } };
        result = body.data?.result ?? [];
        return result.length === 2 && result.every((r) => Number(r.value[1]) > 0);
      } catch {
        return false;
      }
    }, 30_000);
    const up = (await (await fetch(`http://127.0.0.1:${portProm}/api/v1/query?query=up`)).json()) as { data: { result: { value: [number, string] }[] } };
    t.ok(up.data.result.length === 2 && up.data.result.every((r) => r.value[1] === '1'), 'prometheus: up == 1 for both targets');
    t.pass(`prometheus: ${result.map((r) => `${r.metric.instance} served ${r.value[1]}`).join(', ')}`);
  } else {
    t.comment('prometheus is not installed (apt-get install prometheus): the scrape check is skipped');
  }

  // ---- 2. SIGTERM mid-stream ---------------------------------------------------------
  const victim = replicas.get(portA)!;
  const drainStreams = [0, 1, 2, 3].map(() => openStream(lb, 160));
  await Promise.all(drainStreams.map((s) => s.firstToken));
  const onVictim = drainStreams.filter((s) => s.upstream === `127.0.0.1:${portA}`).length;
  t.ok(onVictim > 0, `SIGTERM: ${onVictim} of ${drainStreams.length} streams are on the replica about to be stopped`);
  victim.proc.child.kill('SIGTERM');
  // The signal is handled asynchronously: "during the drain" starts when the victim says so
  // on /ready (a request that reached it before that is legitimately its own).
  await waitFor(
    'the victim to report draining on /ready',
    async () => {
      try {
        return (await ufetch(`http://127.0.0.1:${portA}/ready`)).status === 503;
      } catch {
        return true; // already gone
      }
    },
    5000,
  );
  const duringDrain: Completion[] = [];
  const victimExit = victim.proc.exited;
  let victimGone = false;
  void victimExit.then(() => (victimGone = true));
  for (let i = 0; i < 40 && !victimGone; i++) {
    duringDrain.push(await complete(lb));
    await sleep(100);
  }
  await Promise.all(drainStreams.map((s) => s.finished));
  const exit = await victimExit;
  t.same(exit, { code: 0, signal: null }, `SIGTERM: the replica exited 0 (${victim.proc.log.split('\n').filter((l) => l.startsWith('moe-serve:')).slice(-2).join(' | ')})`);
  t.ok(drainStreams.every((s) => s.status === 200 && s.done && s.finishReason === 'length' && s.events.every((e) => e !== null)), 'SIGTERM: every in-flight stream finished (finish_reason length, [DONE])');
  t.ok(duringDrain.length > 0, `SIGTERM: ${duringDrain.length} new requests were sent during the drain`);
  t.equal(duringDrain.filter((c) => !c.ok).length, 0, `SIGTERM: none failed (${duringDrain.filter((c) => !c.ok).map((c) => c.error).join('; ')})`);
  const retried = duringDrain.filter((c) => c.upstream.includes(',')).length;
  t.ok(duringDrain.every((c) => c.upstream.split(', ').pop() === `127.0.0.1:${portB}`), `SIGTERM: every request during the drain is answered by the other replica (${retried} after a 503/refusal from the draining one, retried by nginx)`);
  await waitFor('the poller to take the stopped replica out', async () => !inRotation.has(portA), 5000);

  // Back to two replicas.
  replicas.set(portA, startReplica(portA, cacheDir));
  await waitFor('the restarted replica back in rotation', async () => inRotation.has(portA) && inRotation.has(portB), 150_000);

  // ---- 3. SIGKILL mid-stream ---------------------------------------------------------
  const killStreams = [0, 1, 2, 3].map(() => openStream(lb, 160));
  await Promise.all(killStreams.map((s) => s.firstToken));
  const killed = replicas.get(portB)!;
  const onKilled = killStreams.filter((s) => s.upstream === `127.0.0.1:${portB}`);
  const onSurvivor = killStreams.filter((s) => s.upstream === `127.0.0.1:${portA}`);
  t.ok(onKilled.length > 0 && onSurvivor.length > 0, `SIGKILL: streams on both replicas (${onKilled.length} on the one killed)`);
  killed.proc.child.kill('SIGKILL');
  const afterKill: Completion[] = [];
  for (let i = 0; i < 10; i++) afterKill.push(await complete(lb));
  await Promise.all(killStreams.map((s) => s.finished));
  t.same(await killed.proc.exited, { code: null, signal: 'SIGKILL' }, 'SIGKILL: the replica is gone');
  t.ok(onKilled.every((s) => !s.done), `SIGKILL: its clients see the stream end without [DONE] (${onKilled.map((s) => s.readError ?? 'ended').join('; ')})`);
  t.ok(onKilled.every((s) => s.events.length > 0 && s.events.every((e) => e !== null)), 'SIGKILL: every event those clients did get is complete JSON (the cut falls between events)');
  t.ok(onSurvivor.every((s) => s.done && s.finishReason === 'length'), 'SIGKILL: the streams on the other replica finish');
  t.equal(afterKill.filter((c) => !c.ok).length, 0, `SIGKILL: all ${afterKill.length} new requests succeed ${afterKill.filter((c) => !c.ok).map((c) => c.error).join('; ')}`);
  t.ok(afterKill.every((c) => c.upstream.split(', ').pop() === `127.0.0.1:${portA}`), 'SIGKILL: new requests are answered by the surviving replica');

  // ---- 4. nothing half-written ------------------------------------------------------
  const leftovers = existsSync(cacheDir) ? readdirSync(cacheDir).filter((f) => f.includes('.tmp-')) : [];
  t.same(leftovers, [], 'no half-written demo model in the cache directory');
  t.ok(existsSync(join(cacheDir, readdirSync(cacheDir).find((f) => f.startsWith('demo-')) ?? 'none', 'config.json')), 'the demo model is intact');
  const errors = existsSync(join(dir, 'error.log')) ? readFileSync(join(dir, 'error.log'), 'utf8') : '';
  t.match(errors, /upstream prematurely closed|Connection refused|connect\(\) failed/, 'nginx logged the killed upstream');
  t.comment(`rotation changes (${reloads} nginx reloads): ${rotationLog.join('; ')}`);
  const access = readFileSync(join(dir, 'access.log'), 'utf8').trim().split('\n');
  t.comment(`nginx access log: ${access.length} requests; statuses ${JSON.stringify(Object.fromEntries([...new Set(access.map((l) => l.split(' ')[0]))].map((s) => [s, access.filter((l) => l.startsWith(s + ' ')).length])))}; retried on the other replica: ${access.filter((l) => l.split(' ')[1].endsWith(',')).length}`);

  polling = false;
  await poller;
  await stopAll();
  t.comment(`drill took ${secs()} s`);
});
