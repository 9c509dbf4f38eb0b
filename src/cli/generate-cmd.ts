import { availableParallelism } from 'node:os';
import { generateTokens } from '../engine/generate.js';
import { KV_CACHE_BYTES, NativeRunner, WEIGHT_FORMATS, type KvCacheType, type WeightFormat } from '../engine/native-runner.js';
import { storedFormat } from '../engine/weight-format.js';
import type { ModelRunner } from '../engine/runner.js';
import { openModel, type OpenedModel } from '../model/checkpoint.js';
import { ReferenceModel } from '../model/reference.js';
import { IncrementalDecoder } from '../model/tokenizer.js';
import { choiceOpt, intOpt, numOpt, parse, required, UsageError } from './args.js';
import { CapacityError, parseSplit } from '../offload/capacity.js';
import { OffloadRunner } from '../offload/offload-runner.js';
import { ONLINE_POLICY_NAMES, DEFAULT_ONLINE_POLICY } from '../offload/policies.js';
import { RoutingReplay } from '../offload/replay.js';
import type { OffloadOptions } from '../engine/protocol.js';
import { ConfigError, parsePrefetchMinProbability } from '../config.js';

export const WEIGHT_CHOICES = ['auto', ...Object.keys(WEIGHT_FORMATS)] as readonly string[] as readonly ('auto' | WeightFormat)[];


/**
 * The runner a command asked for: the native engine (default), optionally with its experts
 * offloaded and/or its routing replayed from a trace, or the reference pass.
 */
export function makeRunner(
  m: OpenedModel,
  engine: 'native' | 'reference',
  weights: 'auto' | WeightFormat,
  threads: number,
  positions: number,
  extra: { offload?: OffloadOptions; replay?: RoutingReplay; kvCacheType?: KvCacheType } = {},
): ModelRunner | ReferenceModel {
  if (engine === 'reference') {
    if (extra.offload || extra.replay) throw new UsageError('--offload-capacity and --offload-replay-trace need the native engine');
    if (extra.kvCacheType === 'f16') throw new UsageError('--kv-cache-type f16 needs the native engine');
    return ReferenceModel.fromSource(m.spec, (name) => m.weights.float32(name));
  }
  const blockSize = 16;
  const base = {
    weights: weights === 'auto' ? storedFormat(m) : weights,
    threads,
    kvBlockSize: blockSize,
    kvBlocks: Math.ceil(positions / blockSize),
    kvCacheType: extra.kvCacheType,
    replay: extra.replay,
  };
  if (extra.offload) return OffloadRunner.fromCheckpoint(m.spec, m.weights, { ...base, ...extra.offload });
  return NativeRunner.fromCheckpoint(m.spec, m.weights, base);
}

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
  --engine E         native | reference (the plain TypeScript oracle) [native]
  --weights W        weights in memory: auto (as stored) | f32 | bf16 | f16 | q8 | q4 [auto]
  --threads N        compute threads [all cores]
  --kv-cache-type T  KV cache elements: f32 | f16 (half the memory) [f32]
  --offload-capacity C     offload experts to a file, caching C of them in RAM: a fraction
                           (0.25, 25%) or bytes (512MiB), split across layers by --offload-split [off]
  --offload-split S        equal, or one weight per layer (e.g. 2,2,1,1): the budget divided
                           in proportion to the weights, 1 to all experts per layer [equal]
  --offload-policy P       expert cache policy: ${ONLINE_POLICY_NAMES.join(' | ')} [${DEFAULT_ONLINE_POLICY}]
  --offload-lookahead N    layers ahead to prefetch; 0: no prefetch [2]
  --offload-prefetch-min-probability P
                           prefetch an expert only this likely to be used; auto: the compute's
                           slowdown while the slow tier reads, measured at load, at least 0.3 [auto]
  --offload-io-threads N   expert reader threads [2]
  --offload-dir DIR        directory of the expert file [OS temporary directory]
  --offload-replay-trace F take each token's experts from a moe-trace v1 file
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
  engine?: 'native' | 'reference';
  weights?: 'auto' | WeightFormat;
  threads?: number;
  kvCacheType?: KvCacheType;
  offload?: OffloadOptions;
  /** Path of a moe-trace v1 file for routing replay. */
  replayTrace?: string;
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
    const positions = Math.min(m.spec.maxPositionEmbeddings, promptIds.length + a.maxTokens);
    const replay = a.replayTrace ? await RoutingReplay.load(a.replayTrace, { layers: m.spec.numLayers, experts: m.spec.numExperts }) : undefined;
    const model = makeRunner(m, a.engine ?? 'native', a.weights ?? 'auto', a.threads ?? availableParallelism(), positions, { offload: a.offload, replay, kvCacheType: a.kvCacheType });
    const stopIds = [...new Set([...m.spec.eosTokenIds, ...tok.eosTokenIds])];
    const dec = new IncrementalDecoder(tok);
    const gen = generateTokens(model, promptIds, {
      maxTokens: a.maxTokens,
      sampling: { temperature: a.temperature, topP: a.topP, topK: a.topK, minP: 0 },
      seed: a.seed,
      stopIds,
      vocabLimit: tok.vocabSize,
    });
    try {
      for (let r = gen.next(); !r.done; r = gen.next()) out(dec.push(r.value));
    } finally {
      if (!(model instanceof ReferenceModel)) model.close();
    }
    out(dec.flush());
    out('\n');
  } finally {
    m.close();
  }
}

/** --offload-prefetch-min-probability: auto (the default, as the server's) or a probability. */
function prefetchMinOpt(v: string | boolean | undefined): number | 'auto' {
  if (v === undefined) return 'auto';
  try {
    return parsePrefetchMinProbability(String(v));
  } catch (e) {
    if (e instanceof ConfigError) throw new UsageError(`--offload-prefetch-min-probability must be auto or a number in [0, 1], got ${JSON.stringify(v)}`);
    throw e;
  }
}

/** --offload-* flags → offload options (undefined without --offload-capacity). */
function offloadFlags(v: Record<string, string | boolean | undefined>): OffloadOptions | undefined {
  const cap = v['offload-capacity'];
  const others = ['offload-split', 'offload-policy', 'offload-lookahead', 'offload-prefetch-min-probability', 'offload-io-threads', 'offload-dir'].filter((f) => v[f] !== undefined);
  if (typeof cap !== 'string' || cap === '') {
    if (others.length > 0) throw new UsageError(`--${others[0]} needs --offload-capacity`);
    return undefined;
  }
  const split = v['offload-split'];
  if (typeof split === 'string') {
    try {
      parseSplit(split);
    } catch (e) {
      if (e instanceof CapacityError) throw new UsageError(`--offload-split: ${e.message}`);
      throw e;
    }
  }
  return {
    capacity: cap,
    ...(typeof split === 'string' && parseSplit(split).kind !== 'equal' ? { split, splitName: '--offload-split' } : {}),
    policy: choiceOpt(v, 'offload-policy', ONLINE_POLICY_NAMES, DEFAULT_ONLINE_POLICY),
    lookahead: intOpt(v, 'offload-lookahead', 2, 0, 64),
    prefetchMinProbability: prefetchMinOpt(v['offload-prefetch-min-probability']),
    ioThreads: intOpt(v, 'offload-io-threads', 2, 1, 256),
    ...(typeof v['offload-dir'] === 'string' && v['offload-dir'] !== '' ? { dir: v['offload-dir'] } : {}),
  };
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
      engine: { type: 'string' },
      weights: { type: 'string' },
      threads: { type: 'string' },
      'kv-cache-type': { type: 'string' },
      'offload-capacity': { type: 'string' },
      'offload-split': { type: 'string' },
      'offload-policy': { type: 'string' },
      'offload-lookahead': { type: 'string' },
      'offload-prefetch-min-probability': { type: 'string' },
      'offload-io-threads': { type: 'string' },
      'offload-dir': { type: 'string' },
      'offload-replay-trace': { type: 'string' },
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
        engine: choiceOpt(v, 'engine', ['native', 'reference'] as const, 'native'),
        weights: choiceOpt(v, 'weights', WEIGHT_CHOICES, 'auto'),
        kvCacheType: choiceOpt(v, 'kv-cache-type', Object.keys(KV_CACHE_BYTES) as KvCacheType[], 'f32'),
        threads: intOpt(v, 'threads', availableParallelism(), 1, 1024),
        offload: offloadFlags(v),
        replayTrace: typeof v['offload-replay-trace'] === 'string' && v['offload-replay-trace'] !== '' ? v['offload-replay-trace'] : undefined,
      },
      (s) => process.stdout.write(s),
    );
    return 0;
  },
};
