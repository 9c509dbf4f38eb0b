// config.json of each architecture ⇄ ModelSpec, and the errors bad configs give.

import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { hfConfigFromSpec, ModelConfigError, readModelSpec, specFromHfConfig } from '../src/model/hf-config.js';
import { openModel } from '../src/model/checkpoint.js';
import { ARCHITECTURES, HF_CLASS, paramCounts } from '../src/model/spec.js';
import { checkpointTensors } from '../src/model/tensor-names.js';
import { tinySpec, writeModel } from './helpers/models.js';

for (const arch of ARCHITECTURES) {
  t.test(`${arch}: config.json round-trips to the same spec`, async (t) => {
    const spec = tinySpec(arch);
    const cfg = hfConfigFromSpec(spec, 'float32');
    t.equal((cfg.architectures as string[])[0], HF_CLASS[arch]);
    t.same(specFromHfConfig(JSON.parse(JSON.stringify(cfg))), spec);
    const c = paramCounts(spec);
    const total = checkpointTensors(spec).reduce((a, x) => a + x.shape.reduce((p, q) => p * q, 1), 0);
    t.equal(c.expertParams + c.nonExpertParams, total, 'parameter count matches the tensors');
  });
}

t.test('real field names per architecture', async (t) => {
  const mix = hfConfigFromSpec(tinySpec('mixtral'), 'bfloat16');
  t.equal(mix.num_local_experts, 8);
  t.equal(mix.intermediate_size, 96);
  const q2 = hfConfigFromSpec(tinySpec('qwen2_moe'), 'bfloat16');
  t.equal(q2.moe_intermediate_size, 32);
  t.equal(q2.shared_expert_intermediate_size, 128);
  t.equal(q2.norm_topk_prob, false);
  const q3 = hfConfigFromSpec(tinySpec('qwen3_moe'), 'bfloat16');
  t.equal(q3.norm_topk_prob, true);
  t.equal(q3.head_dim, 32);
  const ol = hfConfigFromSpec(tinySpec('olmoe'), 'bfloat16');
  t.equal(ol.num_experts, 64);
  t.equal(ol.num_experts_per_tok, 8);
});

t.test('config errors name the field', async (t) => {
  const base = hfConfigFromSpec(tinySpec('qwen3_moe'), 'float32');
  const bad = (patch: Record<string, unknown>, field: string | null, re: RegExp) => {
    const cfg = { ...base, ...patch };
    for (const [k, v] of Object.entries(patch)) if (v === undefined) delete cfg[k];
    let err: unknown = null;
    try {
      specFromHfConfig(cfg);
    } catch (e) {
      err = e;
    }
    t.ok(err instanceof ModelConfigError, `${JSON.stringify(patch)} is rejected`);
    t.equal((err as ModelConfigError).field, field);
    t.match((err as Error).message, re);
  };
  bad({ hidden_size: undefined }, 'hidden_size', /missing field "hidden_size"/);
  bad({ num_experts: 'many' }, 'num_experts', /must be an integer/);
  bad({ num_experts_per_tok: 0 }, 'num_experts_per_tok', />= 1/);
  bad({ num_experts_per_tok: 999 }, 'num_experts_per_tok', /exceeds the number of experts/);
  bad({ num_key_value_heads: 3 }, 'num_key_value_heads', /multiple/);
  bad({ hidden_act: 'gelu' }, 'hidden_act', /unsupported value/);
  bad({ mlp_only_layers: [0] }, 'mlp_only_layers', /every layer must be a MoE layer/);
  bad({ rope_scaling: { type: 'yarn', factor: 4 } }, 'rope_scaling', /rope scaling/);
  bad({ rms_norm_eps: -1 }, 'rms_norm_eps', /> 0/);
  bad({ eos_token_id: 1e9 }, 'eos_token_id', /outside vocab_size/);
  bad({ architectures: ['DeepseekV3ForCausalLM'], model_type: 'deepseek_v3' }, 'architectures', /MixtralForCausalLM.*Qwen2MoeForCausalLM.*Qwen3MoeForCausalLM.*OlmoeForCausalLM/);
  t.throws(() => specFromHfConfig([1, 2]), /expected a JSON object/);
});

t.test('checkpoint directory errors', async (t) => {
  const dir = writeModel(t, { arch: 'mixtral' });
  const cfgPath = join(dir, 'config.json');
  const good = readFileSync(cfgPath, 'utf8');
  t.same(readModelSpec(dir), tinySpec('mixtral'));

  writeFileSync(cfgPath, '{"architectures": ["MixtralForCausalLM"], ');
  t.throws(() => readModelSpec(dir), /config\.json is not valid JSON/);

  // A config that disagrees with the tensors: the error names the tensor and both shapes.
  writeFileSync(cfgPath, good.replace('"intermediate_size": 96', '"intermediate_size": 80'));
  await t.rejects(openModel(dir), /tensor model\.layers\.0\.block_sparse_moe\.experts\.0\.w1\.weight has shape \[96,64\], config\.json implies \[80,64\]/);

  writeFileSync(cfgPath, good.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'));
  await t.rejects(openModel(dir), /missing tensor model\.layers\.2\.input_layernorm\.weight/);

  await t.rejects(openModel(join(dir, 'nope')), /model directory not found/);
});
