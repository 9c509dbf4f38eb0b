import { generateTokens } from '../engine/generate.js';
import { openModel } from '../model/checkpoint.js';
import { ReferenceModel } from '../model/reference.js';
import { IncrementalDecoder } from '../model/tokenizer.js';
import { intOpt, numOpt, parse, required } from './args.js';

const HELP = `usage: moe-serve generate --model DIR --prompt TEXT [options]

Prints the model's continuation of a prompt.

options:
  --model DIR        checkpoint directory
  --prompt TEXT      the prompt
  --chat             wrap the prompt as a user turn with the model's chat template
  --system TEXT      system message (with --chat)
  --max-tokens N     tokens to generate at most [64]
  --temperature T    0 for greedy [0.7]
  --top-p P          nucleus sampling [1]
  --top-k K          keep the K most likely tokens, 0 for all [0]
  --seed N           sampling seed [0]
`;

export interface GenerateArgs {
  model: string;
  prompt: string;
  chat: boolean;
  system?: string;
  maxTokens: number;
  temperature: number;
  topP: number;
  topK: number;
  seed: number;
}

export async function runGenerate(a: GenerateArgs, out: (s: string) => void): Promise<void> {
  const m = await openModel(a.model);
  try {
    const tok = m.tokenizer;
    let promptIds: number[];
    if (a.chat) {
      const messages = a.system ? [{ role: 'system', content: a.system }] : [];
      messages.push({ role: 'user', content: a.prompt });
      promptIds = tok.encode(tok.applyChatTemplate(messages, { addGenerationPrompt: true }), { addSpecialTokens: false });
    } else {
      promptIds = tok.encode(a.prompt, { addSpecialTokens: true });
    }
    if (promptIds.length === 0) throw new Error('the prompt is empty');
    if (promptIds.length >= m.spec.maxPositionEmbeddings) {
      throw new Error(`the prompt has ${promptIds.length} tokens; the model's context is ${m.spec.maxPositionEmbeddings}`);
    }
    const model = ReferenceModel.fromSource(m.spec, (name) => m.weights.float32(name));
    const stopIds = [...new Set([...m.spec.eosTokenIds, ...tok.eosTokenIds])];
    const dec = new IncrementalDecoder(tok);
    const gen = generateTokens(model, promptIds, {
      maxTokens: a.maxTokens,
      sampling: { temperature: a.temperature, topP: a.topP, topK: a.topK, minP: 0 },
      seed: a.seed,
      stopIds,
      vocabLimit: tok.vocabSize,
    });
    for (let r = gen.next(); !r.done; r = gen.next()) out(dec.push(r.value));
    out(dec.flush());
    out('\n');
  } finally {
    m.close();
  }
}

export const generateCommand = {
  summary: "print a model's continuation of a prompt",
  async run(argv: string[]): Promise<number> {
    const v = parse(argv, {
      model: { type: 'string' },
      prompt: { type: 'string' },
      chat: { type: 'boolean' },
      system: { type: 'string' },
      'max-tokens': { type: 'string' },
      temperature: { type: 'string' },
      'top-p': { type: 'string' },
      'top-k': { type: 'string' },
      seed: { type: 'string' },
    });
    if (v.help) {
      process.stdout.write(HELP);
      return 0;
    }
    await runGenerate(
      {
        model: required(v, 'model'),
        prompt: required(v, 'prompt'),
        chat: v.chat === true,
        system: typeof v.system === 'string' ? v.system : undefined,
        maxTokens: intOpt(v, 'max-tokens', 64, 1, 1 << 20),
        temperature: numOpt(v, 'temperature', 0.7, 0, 100),
        topP: numOpt(v, 'top-p', 1, 0.000001, 1),
        topK: intOpt(v, 'top-k', 0, 0),
        seed: intOpt(v, 'seed', 0, 0, 0xffffffff),
      },
      (s) => process.stdout.write(s),
    );
    return 0;
  },
};
