import { exportGguf, GGUF_EXPORT_TYPES } from '../model/gguf-export.js';
import { choiceOpt, parse, required } from './args.js';

const HELP = `usage: moe-serve export-gguf --model DIR --out FILE [--type ${GGUF_EXPORT_TYPES.join('|')}]

Converts a checkpoint directory to a GGUF file that llama.cpp loads as the same
model: llama.cpp's architecture and hyperparameter keys, the tokenizer, and the
tensors under llama.cpp's names (routed experts stacked per layer). Norms, biases
and routers stay F32; the other matrices take --type, except that q4_0 applies to
the experts only and the other matrices are Q8_0 (as the engine's --weights q4).

options:
  --model DIR      checkpoint directory
  --out FILE       GGUF file to write (overwritten)
  --type T         ${GGUF_EXPORT_TYPES.join(' | ')} [f16]
`;

export const exportGgufCommand = {
  summary: 'convert a checkpoint to a GGUF file for llama.cpp',
  async run(argv: string[]): Promise<number> {
    const v = parse(argv, { model: { type: 'string' }, out: { type: 'string' }, type: { type: 'string' } });
    if (v.help) {
      process.stdout.write(HELP);
      return 0;
    }
    const model = required(v, 'model');
    const out = required(v, 'out');
    const type = choiceOpt(v, 'type', GGUF_EXPORT_TYPES, 'f16');
    const r = await exportGguf(model, out, type);
    for (const w of r.warnings) process.stderr.write(`moe-serve export-gguf: warning: ${w}\n`);
    process.stdout.write(
      `wrote ${out}: ${r.arch}, ${type}, ${r.tensors} tensors, vocabulary ${r.vocabSize}` +
        `${r.fillerTokens ? ` (${r.fillerTokens} filler tokens)` : ''}, ${(r.fileBytes / 2 ** 20).toFixed(2)} MiB\n`,
    );
    return 0;
  },
};
