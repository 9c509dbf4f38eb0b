import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import t from 'tap';
import { loadNative, nativeAddonPath, type CpuFeatures } from '../src/engine/native.js';

const FEATURE_KEYS: (keyof CpuFeatures)[] = [
  'sse42',
  'avx',
  'avx2',
  'fma',
  'f16c',
  'avx512f',
  'avx512bw',
  'avx512vl',
  'avx512vnni',
  'avx512bf16',
  'avx512fp16',
  'amxTile',
  'amxInt8',
  'amxBf16',
];

t.test('the addon loads once and reports a version', async (t) => {
  const a = loadNative();
  t.equal(loadNative(), a, 'cached');
  t.match(a.version(), /^\d+\.\d+\.\d+$/);
  const n = a.hardwareConcurrency();
  t.ok(Number.isInteger(n) && n >= 1, `hardwareConcurrency ${n}`);
});

// The files built with wider ISA flags (native/CMakeLists.txt: *_avx2.cc, *_avx512.cc,
// kernels_amx.cc) must define nothing a linker merges with other objects' copies (weak or
// unique symbols: out-of-line template and inline functions), or the copy compiled with
// those flags may be the one every caller gets, on every CPU. It happened: a std::mt19937
// instantiated in kernels_amx.cc served kernels_napi.cc's, and kernelBench stopped an AVX2
// host with an illegal instruction.
t.test('ISA-flagged objects define no symbol a linker could merge across objects', async (t) => {
  const dir = path.join(path.dirname(path.dirname(nativeAddonPath())), 'CMakeFiles', 'moe_native.dir', 'src');
  const objects = fs.readdirSync(dir).filter((f) => /_(avx2|avx512)\.cc\.o$|^kernels_amx\.cc\.o$/.test(f));
  t.ok(objects.length >= 5, `ISA-flagged objects in ${dir}: ${objects.join(', ')}`);
  for (const f of objects) {
    const out = execFileSync('nm', ['-C', '--defined-only', path.join(dir, f)], { encoding: 'utf8' });
    const merged = out
      .split('\n')
      .filter((l) => /^\S*\s+[WwVvu]\s/.test(l))
      .filter((l) => !l.endsWith('DW.ref.__gxx_personality_v0')); // a reference to the C++ runtime's routine, not code of this file
    t.same(merged, [], `${f}: no weak or unique symbols`);
  }
  // And the call that found it: the kernel benchmark on the active ISA.
  const r = loadNative().kernelBench('q8_0', 64, 64, 1, 1, 1 << 16, 0.001);
  t.ok(r.seconds > 0 && Number.isFinite(r.checksum), 'kernelBench runs');
});

t.test('cpuFeatures: every flag a boolean, implications hold', async (t) => {
  const f = loadNative().cpuFeatures();
  t.same(Object.keys(f).sort(), [...FEATURE_KEYS].sort());
  for (const k of FEATURE_KEYS) t.type(f[k], 'boolean', k);
  const implies = (a: keyof CpuFeatures, b: keyof CpuFeatures) => t.ok(!f[a] || f[b], `${a} => ${b}`);
  implies('avx2', 'avx');
  implies('fma', 'avx');
  implies('f16c', 'avx');
  implies('avx512f', 'avx2');
  implies('avx512f', 'fma');
  implies('avx512f', 'f16c');
  for (const k of ['avx512bw', 'avx512vl', 'avx512vnni', 'avx512bf16', 'avx512fp16'] as const) implies(k, 'avx512f');
  implies('amxInt8', 'amxTile');
  implies('amxBf16', 'amxTile');
  if (process.arch === 'x64') t.ok(f.sse42, 'every x86-64 host this runs on has SSE4.2');
  t.same(loadNative().cpuFeatures(), f, 'stable across calls');
});

t.test('cudaInfo never throws and matches the build configuration', async (t) => {
  const info = loadNative().cudaInfo();
  t.type(info.compiled, 'boolean');
  t.ok(Number.isInteger(info.deviceCount) && info.deviceCount >= 0);
  t.equal(info.devices.length, Math.min(info.deviceCount, 64));
  if (info.deviceCount === 0) {
    t.type(info.error, 'string', 'no device: the reason is reported');
    t.ok(info.error!.length > 0);
  } else {
    t.equal(info.error, null);
    for (const d of info.devices) {
      t.type(d.name, 'string');
      t.ok(d.totalMemory > 0);
      t.match(d.computeCapability, /^\d+\.\d+$/);
    }
  }
  const stamp = path.join(path.dirname(path.dirname(nativeAddonPath())), 'moe-native-config.json');
  if (fs.existsSync(stamp)) {
    const cfg = JSON.parse(fs.readFileSync(stamp, 'utf8')) as { defines: { MOE_WITH_CUDA: string } };
    t.equal(info.compiled, cfg.defines.MOE_WITH_CUDA === 'ON', 'compiled iff the build enabled CUDA');
  }
  // This machine has no GPU (and no driver).
  if (!fs.existsSync('/dev/nvidia0')) t.equal(info.deviceCount, 0);
});

t.test('argument checks throw TypeErrors with messages', async (t) => {
  const a = loadNative() as unknown as {
    safetensorsOpen: (p: unknown) => unknown;
    SafetensorsMapping: new (...args: unknown[]) => unknown;
  };
  t.throws(() => a.safetensorsOpen(42), { name: 'TypeError', message: /path must be a string/ });
  t.throws(() => new a.SafetensorsMapping(), { name: 'TypeError', message: /safetensorsOpen/ });
});

t.test('the addon also loads and works in a worker thread', async (t) => {
  const addon = nativeAddonPath();
  const code = `
    const { parentPort } = require('node:worker_threads');
    const a = require(${JSON.stringify(addon)});
    let code = null;
    try { a.safetensorsOpen('/nonexistent/file.safetensors'); } catch (e) { code = e.code; }
    parentPort.postMessage({ version: a.version(), avx: a.cpuFeatures().avx, code });
  `;
  const w = new Worker(code, { eval: true });
  const msg = await new Promise<{ version: string; avx: boolean; code: string }>((resolve, reject) => {
    w.once('message', resolve);
    w.once('error', reject);
  });
  await w.terminate();
  t.equal(msg.version, loadNative().version());
  t.equal(msg.avx, loadNative().cpuFeatures().avx);
  t.equal(msg.code, 'ST_IO');
});
