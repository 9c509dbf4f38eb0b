// The moe-serve command line as users run it: the built launcher in bin/.

import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { ARCHITECTURES } from '../src/model/spec.js';
import { tempDir } from './helpers/models.js';

const BIN = join(import.meta.dirname, '..', 'bin', 'moe-serve.js');

function cli(args: string[], env: Record<string, string> = {}) {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...process.env, ...env }, timeout: 120_000 });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

for (const arch of ARCHITECTURES) {
  t.test(`make-model, inspect and generate: ${arch}`, async (t) => {
    const dir = join(tempDir(t), arch);
    const made = cli(['make-model', '--arch', arch, '--out', dir, '--seed', '3', '--dtype', 'bf16']);
    t.equal(made.code, 0, made.err);
    for (const f of ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']) t.ok(existsSync(join(dir, f)), f);

    const ins = cli(['inspect', '--model', dir, '--json']);
    t.equal(ins.code, 0, ins.err);
    const report = JSON.parse(ins.out);
    const cfg = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8'));
    t.equal(report.layers, cfg.num_hidden_layers);
    t.equal(report.top_k, cfg.num_experts_per_tok);
    t.equal(report.experts, cfg.num_experts ?? cfg.num_local_experts);
    t.equal(report.expert_bytes, report.expert_params * 2, 'bf16 expert bytes');
    t.equal(report.non_expert_bytes, report.non_expert_params * 2, 'bf16 other bytes');

    const args = ['generate', '--model', dir, '--prompt', 'Hello, experts!', '--max-tokens', '8', '--temperature', '0'];
    const g1 = cli(args);
    t.equal(g1.code, 0, g1.err);
    t.ok(g1.out.length > 1, 'prints a continuation');
    t.equal(cli(args).out, g1.out, 'greedy generation is deterministic');
    const chat = cli(['generate', '--model', dir, '--prompt', 'hi', '--chat', '--max-tokens', '4', '--seed', '5']);
    t.equal(chat.code, 0, chat.err);
  });
}

t.test('make-model is deterministic per seed and shards on request', async (t) => {
  const root = tempDir(t);
  const a = join(root, 'a');
  const b = join(root, 'b');
  const c = join(root, 'c');
  t.equal(cli(['make-model', '--arch', 'olmoe', '--out', a, '--seed', '9']).code, 0);
  t.equal(cli(['make-model', '--arch', 'olmoe', '--out', b, '--seed', '9']).code, 0);
  t.ok(readFileSync(join(a, 'model.safetensors')).equals(readFileSync(join(b, 'model.safetensors'))), 'same bytes for the same seed');
  t.equal(cli(['make-model', '--arch', 'olmoe', '--out', c, '--seed', '9', '--shards', '3']).code, 0);
  const index = JSON.parse(readFileSync(join(c, 'model.safetensors.index.json'), 'utf8'));
  t.equal(new Set(Object.values(index.weight_map)).size, 3);
  // The sharded checkpoint holds the same model: same greedy output.
  const gen = (dir: string) => cli(['generate', '--model', dir, '--prompt', 'abc', '--max-tokens', '6', '--temperature', '0']).out;
  t.equal(gen(c), gen(a));
});

t.test('errors are one clear line and a non-zero exit', async (t) => {
  const noArch = cli(['make-model', '--out', '/tmp/x']);
  t.equal(noArch.code, 2);
  t.match(noArch.err, /^moe-serve make-model: --arch is required/);
  const badArch = cli(['make-model', '--arch', 'gpt2', '--out', '/tmp/x']);
  t.match(badArch.err, /--arch must be one of mixtral, qwen2_moe, qwen3_moe, olmoe/);
  const unknown = cli(['make-model', '--arch', 'olmoe', '--bogus']);
  t.equal(unknown.code, 2);
  t.match(unknown.err, /Unknown option '--bogus'/);
  const missing = cli(['inspect', '--model', '/nonexistent/model']);
  t.equal(missing.code, 1);
  t.equal(missing.err.trim().split('\n').length, 1);
  t.match(missing.err, /model directory not found/);
  t.equal(cli(['frobnicate']).code, 2);
  for (const cmd of ['make-model', 'generate', 'inspect', 'demo']) {
    const h = cli([cmd, '--help']);
    t.equal(h.code, 0);
    t.match(h.out, /^usage: moe-serve /);
  }
});

t.test('demo model is generated once into the cache directory and reused', async (t) => {
  const cache = tempDir(t);
  const first = cli(['demo', '--prompt', 'hello'], { MOE_SERVE_CACHE_DIR: cache });
  t.equal(first.code, 0, first.err);
  t.match(first.err, /generating the built-in demo model/);
  const second = cli(['demo', '--prompt', 'hello'], { MOE_SERVE_CACHE_DIR: cache });
  t.equal(second.code, 0, second.err);
  t.notMatch(second.err, /generating/);
  t.equal(second.out, first.out, 'same seed, same reply');
});
