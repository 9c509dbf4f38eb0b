import { compareStats, synthesizeTrace, type StatsComparison } from '../offload/synth-trace.js';
import { intOpt, numOpt, parse, required, UsageError } from './args.js';

const HELP = `usage: moe-serve synth-trace --like FILE --requests N --out FILE [--seed S]
                             [--tokens-per-request M] [--no-weights]
                             [--request-variation V [--topics T]] [--json]

Writes a many-request moe-trace v1 file whose routing statistics match a real trace
(--like): per-layer expert popularity, temporal reuse rate per layer (share of the
previous token's experts kept at the same layer) and co-occurrence across adjacent
layers (P(expert at l+1 | expert at l)). Then prints both traces' statistics side by side.

Model, per request, token and layer: keep n of the previous token's experts at the
layer, n drawn from a chain over the token's layers (the real trace's transition of
keep counts between adjacent layers, tilted per layer to match its reuse rate), so a
token that repeats its predecessor at one layer tends to at the next; fill the other slots without replacement from
a mixture (fitted per-layer weight) of the cross-layer conditional given this token's
experts at l-1 and the layer's popularity. The first P positions are prefill, P within
+-25% of a real request's prompt length. Deterministic per --seed (default 1).

Requests on different topics route to different experts, which one real request cannot
show: with --request-variation V (0 to 1, default 0) each request's expert ids at each
layer are renamed by a random shuffle of a fraction V of the layer's experts, the same
for all its tokens. Requests draw their renaming from --topics T of them (default: one
per request), so requests of one topic share favourite experts. Renaming within a request
leaves its statistics as they were (the comparison above is of the requests before
renaming); the pooled popularity of the file flattens, and is printed too.

Options:
  --tokens-per-request M  tokens per request, prefill included (default: a real request's)
  --no-weights            leave the weights column empty (default: real per-rank mean weights)
  --request-variation V   share of each layer's experts renamed per topic (default 0: none)
  --topics T              renamings the requests draw from (default: one per request)
  --json                  one JSON object with the comparison
`;

export function formatComparison(c: StatsComparison, realName: string, synthName: string, halves: StatsComparison | null = null): string {
  const f = (x: number) => (Number.isNaN(x) ? '   n/a' : x.toFixed(4).padStart(8));
  return [
    `statistic                                        real       synth     |diff| / distance`,
    `popularity TV distance, mean over layers          -          -       ${f(c.popularityTV)}   (real vs uniform: ${f(c.popularityTVUniform).trim()})`,
    `reuse rate, mean over layers                ${f(c.reuseMeanReal)}    ${f(c.reuseMeanSynth)}    mean ${f(c.reuseMeanAbsDiff).trim()}, max ${f(c.reuseMaxAbsDiff).trim()} over layers`,
    `cross-layer P(f at l+1 | e at l), top pairs       -          -       ${f(c.coocMeanAbsDiff)}   mean abs diff over ${c.coocPairs} pairs (independent layers: ${f(c.coocIndependentMeanAbsDiff).trim()})`,
    ...(halves
      ? [
          `  for scale, the real trace's halves against each other: popularity TV ${f(halves.popularityTV).trim()}, reuse mean diff ${f(halves.reuseMeanAbsDiff).trim()}, co-occurrence ${f(halves.coocMeanAbsDiff).trim()}`,
        ]
      : []),
    `keep counts of adjacent layers, correlation  ${f(c.keepCorrReal)}    ${f(c.keepCorrSynth)}    ${f(Math.abs(c.keepCorrReal - c.keepCorrSynth))}   (how reuse is coupled across a token's layers)`,
    `(real: ${realName}; synth: ${synthName})`,
  ].join('\n');
}

export const synthTraceCommand = {
  summary: 'synthesize a many-request routing trace matching a real one',
  async run(argv: string[]): Promise<number> {
    const v = parse(argv, {
      like: { type: 'string' },
      requests: { type: 'string' },
      out: { type: 'string' },
      seed: { type: 'string' },
      'tokens-per-request': { type: 'string' },
      'no-weights': { type: 'boolean' },
      'request-variation': { type: 'string' },
      topics: { type: 'string' },
      json: { type: 'boolean' },
    });
    if (v.help) {
      process.stdout.write(HELP);
      return 0;
    }
    const like = required(v, 'like');
    const out = required(v, 'out');
    required(v, 'requests');
    const requests = intOpt(v, 'requests', 1, 1, 1e9);
    const seed = intOpt(v, 'seed', 1, 0, 0xffffffff);
    const tokensPerRequest = v['tokens-per-request'] === undefined ? undefined : intOpt(v, 'tokens-per-request', 1, 1, 1e9);
    const requestVariation = numOpt(v, 'request-variation', 0, 0, 1);
    if (v.topics !== undefined && v['request-variation'] === undefined) throw new UsageError('--topics needs --request-variation');
    const topics = v.topics === undefined ? undefined : intOpt(v, 'topics', 1, 1, 1e9);
    const r = await synthesizeTrace({ like, out, requests, seed, tokensPerRequest, noWeights: !!v['no-weights'], requestVariation, topics });
    const pooled = r.written === r.synth ? null : { vsReal: compareStats(r.real, r.written).popularityTV, vsUniform: compareStats(r.written, r.written).popularityTVUniform };
    const c = r.comparison;
    if (v.json) {
      process.stdout.write(
        JSON.stringify({
          like,
          out,
          requests,
          seed,
          rows: r.rowsWritten,
          real: { requests: r.real.requests, tokens: r.real.tokens },
          synth: { requests: r.synth.requests, tokens: r.synth.tokens },
          popularity_tv: c.popularityTV,
          popularity_tv_uniform: c.popularityTVUniform,
          reuse_mean_real: c.reuseMeanReal,
          reuse_mean_synth: c.reuseMeanSynth,
          reuse_mean_abs_diff: c.reuseMeanAbsDiff,
          reuse_max_abs_diff: c.reuseMaxAbsDiff,
          cooc_mean_abs_diff: c.coocMeanAbsDiff,
          cooc_independent_mean_abs_diff: c.coocIndependentMeanAbsDiff,
          cooc_pairs: c.coocPairs,
          keep_corr_real: c.keepCorrReal,
          keep_corr_synth: c.keepCorrSynth,
          request_variation: requestVariation,
          topics: topics ?? requests,
          pooled_popularity_tv: pooled?.vsReal ?? c.popularityTV,
          pooled_popularity_tv_uniform: pooled?.vsUniform ?? compareStats(r.synth, r.synth).popularityTVUniform,
          real_halves: r.realHalves
            ? { popularity_tv: r.realHalves.popularityTV, reuse_mean_abs_diff: r.realHalves.reuseMeanAbsDiff, cooc_mean_abs_diff: r.realHalves.coocMeanAbsDiff }
            : null,
        }) + '\n',
      );
      return 0;
    }
    const h = r.header;
    process.stdout.write(
      [
        `real         ${like} (${h.model || 'unnamed'}: ${h.layers} layers, ${h.experts} experts, top-${h.topK}): ${r.real.requests} request(s), ${r.real.tokens} tokens`,
        `synthetic    ${out}: ${r.synth.requests} request(s), ${r.synth.tokens} tokens, ${r.rowsWritten} rows, seed ${seed}`,
        '',
        formatComparison(c, like, r.written === r.synth ? out : `${out}, its requests before renaming`, r.realHalves),
        ...(pooled
          ? [
              '',
              `across requests (--request-variation ${requestVariation}, ${topics ?? requests} topics): the file's pooled popularity is at TV ${pooled.vsReal.toFixed(4)} from the real request's, ${pooled.vsUniform.toFixed(4)} from uniform (the real request: ${c.popularityTVUniform.toFixed(4)})`,
            ]
          : []),
      ].join('\n') + '\n',
    );
    return 0;
  },
};
