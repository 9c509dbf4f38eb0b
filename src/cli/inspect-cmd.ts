import { openModel } from '../model/checkpoint.js';
import { HF_CLASS, paramCounts } from '../model/spec.js';
import { parse, required } from './args.js';

const HELP = `usage: moe-serve inspect --model DIR [--json]

Prints a checkpoint's architecture, shape, and parameter bytes split into routed
experts and everything else (at the stored dtype).
`;

const DTYPE_BYTES: Record<string, number> = { F32: 4, F16: 2, BF16: 2 };

export const inspectCommand = {
  summary: "print a checkpoint's architecture, shape and parameter bytes",
  async run(argv: string[]): Promise<number> {
    const v = parse(argv, { model: { type: 'string' }, json: { type: 'boolean' } });
    if (v.help) {
      process.stdout.write(HELP);
      return 0;
    }
    const m = await openModel(required(v, 'model'));
    try {
      const s = m.spec;
      const c = paramCounts(s);
      let expertBytes = 0;
      let otherBytes = 0;
      const dtypes = new Set<string>();
      for (const name of m.weights.names()) {
        const info = m.weights.info(name);
        dtypes.add(info.dtype);
        const bytes = info.shape.reduce((a, b) => a * b, 1) * (DTYPE_BYTES[info.dtype] ?? 0);
        if (/\.experts\.\d+\./.test(name)) expertBytes += bytes;
        else otherBytes += bytes;
      }
      const report = {
        architecture: HF_CLASS[s.arch],
        layers: s.numLayers,
        hidden_size: s.hiddenSize,
        heads: s.numHeads,
        kv_heads: s.numKvHeads,
        head_dim: s.headDim,
        experts: s.numExperts,
        top_k: s.topK,
        expert_width: s.expertIntermediateSize,
        shared_expert_width: s.sharedExpertIntermediateSize,
        gating: s.gating,
        vocab_size: s.vocabSize,
        tokenizer_ids: m.tokenizer.vocabSize,
        context_length: s.maxPositionEmbeddings,
        dtypes: [...dtypes].sort(),
        expert_params: c.expertParams,
        non_expert_params: c.nonExpertParams,
        expert_bytes: expertBytes,
        non_expert_bytes: otherBytes,
        bytes_per_expert: expertBytes / (s.numLayers * s.numExperts),
        active_params_per_token: c.nonExpertParams + s.numLayers * s.topK * c.perExpertParams,
      };
      if (v.json) {
        process.stdout.write(JSON.stringify(report) + '\n');
      } else {
        const mb = (b: number) => `${(b / 2 ** 20).toFixed(2)} MiB`;
        process.stdout.write(
          [
            `architecture     ${report.architecture}`,
            `layers           ${s.numLayers}`,
            `hidden           ${s.hiddenSize} (heads ${s.numHeads}, kv heads ${s.numKvHeads}, head dim ${s.headDim})`,
            `experts          ${s.numExperts}, top-${s.topK}, width ${s.expertIntermediateSize}${s.sharedExpertIntermediateSize ? `, shared expert width ${s.sharedExpertIntermediateSize}` : ''}`,
            `gating           ${s.gating}`,
            `vocabulary       ${s.vocabSize} (tokenizer ${m.tokenizer.vocabSize})`,
            `context          ${s.maxPositionEmbeddings}`,
            `dtypes           ${report.dtypes.join(', ')}`,
            `expert params    ${c.expertParams.toLocaleString('en-US')} (${mb(expertBytes)})`,
            `other params     ${c.nonExpertParams.toLocaleString('en-US')} (${mb(otherBytes)})`,
            `per expert       ${mb(report.bytes_per_expert)}`,
            `active / token   ${report.active_params_per_token.toLocaleString('en-US')} params`,
          ].join('\n') + '\n',
        );
      }
      return 0;
    } finally {
      m.close();
    }
  },
};
