// The safetensors header validation and the JSON parser under it (native/src/
// safetensors_format.cc, json.cc) against the mutation fuzzer native/fuzz/
// fuzz_safetensors.cc, built here with AddressSanitizer and UBSan: malformed, truncated,
// overflowing and mis-tiled files must be rejected with StError, never read out of bounds;
// an accepted file must keep what st_parse promises (tensors inside the data section,
// sizes matching shapes, exact tiling). Fixed seeds: the same files every run.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t from 'tap';
import { tempDir } from './helpers/models.js';

const root = path.join(import.meta.dirname, '..');
const src = path.join(root, 'native', 'src');
const cxx = process.env.CXX || 'g++';
const SANITIZE = ['-fsanitize=address,undefined', '-fno-sanitize-recover=all'];

// Whether the compiler can build with the sanitizers here (a probe program); the test is
// skipped, saying why, where it cannot.
function sanitizerProblem(): string | false {
  const dir = mkdtempSync(path.join(tmpdir(), 'moe-serve-fuzz-probe-'));
  try {
    const probe = spawnSync(cxx, ['-x', 'c++', '-', ...SANITIZE, '-o', path.join(dir, 'probe')], { input: 'int main() { return 0; }\n', encoding: 'utf8' });
    if (probe.error) return `${cxx} cannot build with AddressSanitizer and UBSan here: ${probe.error.message}`;
    if (probe.status !== 0) return `${cxx} cannot build with AddressSanitizer and UBSan here: ${probe.stderr.trim().split('\n')[0]}`;
    return false;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

t.test('safetensors header validation under the sanitizer fuzzer', { skip: sanitizerProblem() }, async (t) => {
  const dir = tempDir(t);
  const exe = path.join(dir, 'fuzz_safetensors');
  const build = spawnSync(
    cxx,
    ['-std=c++17', '-O1', '-g', ...SANITIZE, `-I${src}`, path.join(root, 'native', 'fuzz', 'fuzz_safetensors.cc'), path.join(src, 'safetensors_format.cc'), path.join(src, 'json.cc'), '-o', exe],
    { encoding: 'utf8' },
  );
  t.equal(build.status, 0, `the harness builds${build.status === 0 ? '' : ': ' + build.stderr}`);
  if (build.status !== 0) return;
  const iterations = 60000;
  for (const seed of [1, 2]) {
    const run = spawnSync(exe, [String(iterations), String(seed)], { encoding: 'utf8', timeout: 120_000 });
    t.equal(run.status, 0, `seed ${seed}: no sanitizer report, no broken promise${run.status === 0 ? '' : ':\n' + run.stderr.slice(0, 4000)}`);
    const m = /iterations (\d+) accepted (\d+) rejected (\d+)/.exec(run.stdout);
    t.ok(m, `seed ${seed}: ${run.stdout.trim()}`);
    if (!m) continue;
    const [, n, accepted, rejected] = m.map(Number);
    t.equal(n, iterations);
    t.equal(accepted + rejected, iterations, 'every file either accepted or rejected with StError');
    // Both paths are exercised: the accepted files' invariants and the rejections.
    t.ok(accepted > iterations / 50, `seed ${seed}: ${accepted} files accepted and checked`);
    t.ok(rejected > iterations / 2, `seed ${seed}: ${rejected} files rejected`);
  }
});
