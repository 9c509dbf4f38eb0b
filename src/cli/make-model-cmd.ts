import { makeModel } from '../model/make-model.js';
import { PRESETS } from '../model/presets.js';
import { ARCHITECTURES, paramCounts } from '../model/spec.js';
import { choiceOpt, intOpt, parse, required } from './args.js';

const HELP = `usage: moe-serve make-model --arch ${ARCHITECTURES.join('|')} --out DIR [options]

Writes a Hugging Face checkpoint directory with deterministic random weights:
config.json, model.safetensors (or shards with model.safetensors.index.json),
tokenizer.json (byte-level BPE), tokenizer_config.json (with chat_template).

options:
  --arch NAME      architecture (${ARCHITECTURES.join(', ')})
  --out DIR        output directory (created if missing)
  --preset NAME    shape preset: ${Object.entries(PRESETS).map(([k, p]) => `${k} (${p.description})`).join('; ')} [tiny]
  --seed N         random seed [0]
  --dtype T        f32 | f16 | bf16 [f32]
  --shards N       number of safetensors files [1]
`;

export const makeModelCommand = {
  summary: 'write a checkpoint directory with random weights (fixtures, demo, benchmarks)',
  async run(argv: string[]): Promise<number> {
    const v = parse(argv, {
      arch: { type: 'string' },
      out: { type: 'string' },
      preset: { type: 'string' },
      seed: { type: 'string' },
      dtype: { type: 'string' },
      shards: { type: 'string' },
    });
    if (v.help) {
      process.stdout.write(HELP);
      return 0;
    }
    const arch = choiceOpt(v, 'arch', ARCHITECTURES);
    const out = required(v, 'out');
    const preset = typeof v.preset === 'string' ? v.preset : 'tiny';
    const spec = makeModel({
      arch,
      out,
      preset,
      seed: intOpt(v, 'seed', 0, 0, 0xffffffff),
      dtype: choiceOpt(v, 'dtype', ['f32', 'f16', 'bf16'] as const, 'f32'),
      shards: intOpt(v, 'shards', 1, 1, 1000),
    });
    const c = paramCounts(spec);
    process.stdout.write(`wrote ${arch} (${preset}) to ${out}: ${spec.numLayers} layers, ${spec.numExperts} experts, ${(c.expertParams + c.nonExpertParams).toLocaleString('en-US')} parameters\n`);
    return 0;
  },
};
