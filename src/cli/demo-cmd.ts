import { existsSync, mkdirSync, renameSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { envSettings } from '../config.js';
import { makeModel } from '../model/make-model.js';
import { parse } from './args.js';
import { runGenerate } from './generate-cmd.js';

const DEMO_ARCH = 'qwen3_moe';
const DEMO_PRESET = 'demo';
const DEMO_SEED = 1;
/** Bump when the generated demo checkpoint changes, so stale caches are not reused. */
const DEMO_REVISION = 2;

/** The built-in demo model's directory, generated on first use and reused after. */
export function ensureDemoModel(log: (s: string) => void = () => {}): string {
  const root = envSettings().cacheDir;
  const dir = join(root, `demo-${DEMO_ARCH}-r${DEMO_REVISION}`);
  if (existsSync(join(dir, 'config.json'))) return dir;
  mkdirSync(root, { recursive: true });
  // Written to a private directory and renamed, so an interrupted run never leaves half a model.
  const tmp = `${dir}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  log(`generating the built-in demo model into ${dir} ...\n`);
  makeModel({ arch: DEMO_ARCH, out: tmp, preset: DEMO_PRESET, seed: DEMO_SEED, dtype: 'bf16' });
  try {
    renameSync(tmp, dir);
  } catch (e) {
    rmSync(tmp, { recursive: true, force: true });
    if (!existsSync(join(dir, 'config.json'))) throw e;
  }
  return dir;
}

export const demoCommand = {
  summary: 'run the built-in demo model (generated on first use, no download)',
  async run(argv: string[]): Promise<number> {
    const v = parse(argv, { prompt: { type: 'string' } });
    if (v.help) {
      process.stdout.write('usage: moe-serve demo [--prompt TEXT]\n\nGenerates the built-in demo model on first use and prints a chat reply.\n');
      return 0;
    }
    const dir = ensureDemoModel((s) => process.stderr.write(s));
    const prompt = typeof v.prompt === 'string' ? v.prompt : 'Explain how a mixture-of-experts model decides which experts handle each token.';
    process.stderr.write(`demo model: ${dir}\nprompt: ${prompt}\n`);
    await runGenerate({ model: dir, prompt, chat: true, maxTokens: 48, temperature: 0.8, topP: 0.95, topK: 0, seed: 0 }, (s) => process.stdout.write(s));
    return 0;
  },
};
