// An independent oracle for the MoE block: the reference `moeBlock` against onnxruntime's
// com.microsoft `MoE` operator (CPU kernel of onnxruntime-node 1.30) on the same random
// weights, for each architecture. The whole block is computed by ORT: router logits with a
// MatMul, routed experts with `MoE`, and Qwen2-MoE's gated shared expert with standard ops.
//
// What the ORT 1.30 CPU kernel requires / does (read from the schema and checked here):
// - router_probs are raw logits; it takes a float32 softmax over all experts, the top-k,
//   and divides by their sum iff normalize_routing_weights=1.
// - Weights are (out, in) row-major per expert: fc1 (E, 2*I, H), fc2 (E, H, I), like the
//   PyTorch nn.Linear / our checkpoint layout, no transposes.
// - The gated (SwiGLU) form is activation_type='swiglu' with swiglu_fusion=1 only: gate and
//   up fused in fc1 and interleaved by row (row 2i = gate_i, row 2i+1 = up_i); fc3 and
//   swiglu_fusion 0/2 are rejected on CPU. swiglu = g*sigmoid(alpha*g)*(l+beta), with
//   defaults alpha=1, beta=0, no clamp: exactly silu(gate x) * (up x).

import t from 'tap';
import * as ort from 'onnxruntime-node';
import { moeBlock, matvec, route, type ExpertWeights, type LayerWeights, type Routing } from '../src/model/reference.js';
import { Rng } from '../src/model/prng.js';
import type { Architecture, ModelSpec } from '../src/model/spec.js';
import { buildModel, type Initializer, type NodeSpec, type ValueInfo } from '../src/model/onnx-builder.js';

const HIDDEN = 64;
const TOKENS = 17;
const TOL = 1e-4;

interface MoeShape {
  experts: number;
  topK: number;
  width: number;
  renorm: boolean;
  sharedWidth: number;
}

const SHAPES: Record<Architecture, MoeShape> = {
  mixtral: { experts: 8, topK: 2, width: 96, renorm: true, sharedWidth: 0 },
  qwen2_moe: { experts: 16, topK: 4, width: 32, renorm: false, sharedWidth: 128 },
  qwen3_moe: { experts: 32, topK: 8, width: 32, renorm: true, sharedWidth: 0 },
  olmoe: { experts: 64, topK: 8, width: 32, renorm: false, sharedWidth: 0 },
};

function makeSpec(arch: Architecture, s: MoeShape): ModelSpec {
  return {
    arch,
    vocabSize: 256,
    hiddenSize: HIDDEN,
    numLayers: 1,
    numHeads: 4,
    numKvHeads: arch === 'olmoe' ? 4 : 2,
    headDim: 16,
    numExperts: s.experts,
    topK: s.topK,
    expertIntermediateSize: s.width,
    sharedExpertIntermediateSize: s.sharedWidth,
    gating: s.renorm ? 'softmax_topk_renorm' : 'softmax_topk',
    qkNorm: arch === 'qwen3_moe' ? 'per_head' : arch === 'olmoe' ? 'full' : 'none',
    qkvBias: arch === 'qwen2_moe',
    rmsNormEps: 1e-6,
    ropeTheta: 10000,
    maxPositionEmbeddings: 512,
    tieWordEmbeddings: false,
    bosTokenId: 1,
    eosTokenIds: [2],
  };
}

function normal(rng: Rng, n: number, std: number): Float32Array {
  return rng.fillNormal(new Float32Array(n), 0, std);
}

function randomExpert(rng: Rng, hidden: number, width: number): ExpertWeights {
  return {
    gate: normal(rng, width * hidden, 1 / Math.sqrt(hidden)),
    up: normal(rng, width * hidden, 1 / Math.sqrt(hidden)),
    down: normal(rng, hidden * width, 1 / Math.sqrt(width)),
  };
}

/** The MoE-block part of a layer's weights (attention tensors are unused by moeBlock). */
function randomLayer(spec: ModelSpec, seed: number): LayerWeights {
  const rng = new Rng(seed);
  const h = spec.hiddenSize;
  const empty = new Float32Array(0);
  return {
    inputNorm: empty,
    postAttnNorm: empty,
    q: empty,
    k: empty,
    v: empty,
    o: empty,
    qBias: null,
    kBias: null,
    vBias: null,
    qNorm: null,
    kNorm: null,
    router: normal(rng, spec.numExperts * h, 1 / Math.sqrt(h)),
    experts: Array.from({ length: spec.numExperts }, () => randomExpert(rng, h, spec.expertIntermediateSize)),
    shared:
      spec.sharedExpertIntermediateSize > 0
        ? { ...randomExpert(rng, h, spec.sharedExpertIntermediateSize), gateScalar: normal(rng, h, 1 / Math.sqrt(h)) }
        : null,
  };
}

/** (rows, cols) row-major → (cols, rows) row-major. */
function transpose(a: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(a.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = a[r * cols + c];
  return out;
}

/**
 * The block as one ONNX graph. Outputs: `y` (tokens, hidden) the block's output, `logits`
 * (tokens, E) the router logits, and `routing` (tokens, E): the gate weight ORT's MoE kernel
 * gave each expert (0 when not selected), observed with a second MoE node on the same
 * logits whose experts have zero weights and a one-hot fc2 bias (needs hidden = E there: the
 * probe's "hidden states" are the logits themselves, which its zero weights ignore).
 */
function buildBlockGraph(spec: ModelSpec, lw: LayerWeights): Uint8Array {
  const H = spec.hiddenSize;
  const E = spec.numExperts;
  const I = spec.expertIntermediateSize;
  const fc1 = new Float32Array(E * 2 * I * H);
  const fc2 = new Float32Array(E * H * I);
  lw.experts.forEach((ex, e) => {
    for (let i = 0; i < I; i++) {
      fc1.set(ex.gate.subarray(i * H, (i + 1) * H), ((e * 2 * I) + 2 * i) * H);
      fc1.set(ex.up.subarray(i * H, (i + 1) * H), ((e * 2 * I) + 2 * i + 1) * H);
    }
    fc2.set(ex.down, e * H * I);
  });
  const probeBias = new Float32Array(E * E);
  for (let e = 0; e < E; e++) probeBias[e * E + e] = 1;

  const moeAttrs = { k: spec.topK, activation_type: 'swiglu', swiglu_fusion: 1, normalize_routing_weights: spec.gating === 'softmax_topk_renorm' ? 1 : 0 };
  const initializers: Initializer[] = [
    { name: 'router_t', dims: [H, E], data: transpose(lw.router, E, H) },
    { name: 'fc1', dims: [E, 2 * I, H], data: fc1 },
    { name: 'fc2', dims: [E, H, I], data: fc2 },
    { name: 'probe_fc1', dims: [E, 2, E], data: new Float32Array(E * 2 * E) },
    { name: 'probe_fc2', dims: [E, E, 1], data: new Float32Array(E * E) },
    { name: 'probe_fc2_bias', dims: [E, E], data: probeBias },
  ];
  const nodes: NodeSpec[] = [
    { opType: 'MatMul', inputs: ['x', 'router_t'], outputs: ['logits'] },
    { opType: 'MoE', domain: 'com.microsoft', inputs: ['x', 'logits', 'fc1', '', 'fc2'], outputs: [lw.shared ? 'routed' : 'y'], attributes: moeAttrs },
    { opType: 'MoE', domain: 'com.microsoft', inputs: ['logits', 'logits', 'probe_fc1', '', 'probe_fc2', 'probe_fc2_bias'], outputs: ['routing'], attributes: moeAttrs },
  ];
  if (lw.shared) {
    const S = spec.sharedExpertIntermediateSize;
    initializers.push(
      { name: 'sh_gate_t', dims: [H, S], data: transpose(lw.shared.gate, S, H) },
      { name: 'sh_up_t', dims: [H, S], data: transpose(lw.shared.up, S, H) },
      { name: 'sh_down_t', dims: [S, H], data: transpose(lw.shared.down, H, S) },
      { name: 'sh_scalar_t', dims: [H, 1], data: Float32Array.from(lw.shared.gateScalar) },
    );
    nodes.push(
      { opType: 'MatMul', inputs: ['x', 'sh_gate_t'], outputs: ['sh_g'] },
      { opType: 'Sigmoid', inputs: ['sh_g'], outputs: ['sh_g_sig'] },
      { opType: 'Mul', inputs: ['sh_g', 'sh_g_sig'], outputs: ['sh_g_silu'] },
      { opType: 'MatMul', inputs: ['x', 'sh_up_t'], outputs: ['sh_u'] },
      { opType: 'Mul', inputs: ['sh_g_silu', 'sh_u'], outputs: ['sh_act'] },
      { opType: 'MatMul', inputs: ['sh_act', 'sh_down_t'], outputs: ['sh_out'] },
      { opType: 'MatMul', inputs: ['x', 'sh_scalar_t'], outputs: ['sh_s'] },
      { opType: 'Sigmoid', inputs: ['sh_s'], outputs: ['sh_s_sig'] },
      { opType: 'Mul', inputs: ['sh_out', 'sh_s_sig'], outputs: ['sh_gated'] },
      { opType: 'Add', inputs: ['routed', 'sh_gated'], outputs: ['y'] },
    );
  }
  const inputs: ValueInfo[] = [{ name: 'x', shape: ['tokens', H] }];
  const outputs: ValueInfo[] = [
    { name: 'y', shape: ['tokens', H] },
    { name: 'logits', shape: ['tokens', E] },
    { name: 'routing', shape: ['tokens', E] },
  ];
  return buildModel({
    inputs,
    outputs,
    initializers,
    nodes,
    opsets: [
      { domain: '', version: 17 },
      { domain: 'com.microsoft', version: 1 },
    ],
  });
}

function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}

/** max |a - b| / max(1, max |a|). */
function relErr(ref: ArrayLike<number>, got: ArrayLike<number>): number {
  if (ref.length !== got.length) return Infinity;
  let m = 0;
  for (let i = 0; i < ref.length; i++) m = Math.max(m, Math.abs(ref[i] - got[i]));
  return m / Math.max(1, maxAbs(ref));
}

/** ORT's routing of token t read off the probe: (expert, weight) pairs, highest weight first. */
function observedRouting(probe: Float32Array, t: number, E: number): Routing {
  const ids: number[] = [];
  for (let e = 0; e < E; e++) if (probe[t * E + e] !== 0) ids.push(e);
  ids.sort((a, b) => probe[t * E + b] - probe[t * E + a] || a - b);
  return { experts: ids, weights: ids.map((e) => probe[t * E + e]) };
}

t.test('the onnx builder writes a model ORT runs (MatMul + Add + Relu + Softmax)', async (t) => {
  const bytes = buildModel({
    inputs: [{ name: 'x', shape: ['n', 3] }],
    outputs: [{ name: 'p', shape: ['n', 2] }],
    initializers: [
      { name: 'W', dims: [3, 2], data: Float32Array.from([1, -2, 3, 4, -5, 6]) },
      { name: 'b', dims: [2], data: Float32Array.from([0.5, -0.5]) },
    ],
    nodes: [
      { opType: 'MatMul', inputs: ['x', 'W'], outputs: ['h'] },
      { opType: 'Add', inputs: ['h', 'b'], outputs: ['hb'] },
      { opType: 'Relu', inputs: ['hb'], outputs: ['r'] },
      { opType: 'Softmax', inputs: ['r'], outputs: ['p'], attributes: { axis: -1 } },
    ],
  });
  const session = await ort.InferenceSession.create(bytes, { logSeverityLevel: 3 });
  const x = Float32Array.from([1, 2, 3, -1, 0, 1]);
  const out = await session.run({ x: new ort.Tensor('float32', x, [2, 3]) });
  const p = out.p.data as Float32Array;
  const expected: number[] = [];
  for (let r = 0; r < 2; r++) {
    const h = [0, 1].map((c) => Math.max(0, [0, 1, 2].reduce((s, k) => s + x[r * 3 + k] * [1, -2, 3, 4, -5, 6][k * 2 + c], 0) + [0.5, -0.5][c]));
    const z = Math.exp(h[0]) + Math.exp(h[1]);
    expected.push(Math.exp(h[0]) / z, Math.exp(h[1]) / z);
  }
  t.same(out.p.dims, [2, 2]);
  t.ok(relErr(expected, p) < 1e-6, `softmax(relu(xW+b)) ${Array.from(p)} vs ${expected}`);
});

const ARCHS: Architecture[] = ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe'];
ARCHS.forEach((arch, ai) => {
  t.test(`${arch}: reference moeBlock equals onnxruntime's com.microsoft MoE`, async (t) => {
    const shape = SHAPES[arch];
    const spec = makeSpec(arch, shape);
    const lw = randomLayer(spec, 1000 + ai);
    const x = normal(new Rng(2000 + ai), TOKENS * HIDDEN, 1);

    const ref = moeBlock(spec, lw, x, TOKENS);
    const session = await ort.InferenceSession.create(buildBlockGraph(spec, lw), { logSeverityLevel: 3 });
    const out = await session.run({ x: new ort.Tensor('float32', x, [TOKENS, HIDDEN]) });
    const y = out.y.data as Float32Array;
    const logits = out.logits.data as Float32Array;
    const probe = out.routing.data as Float32Array;
    t.same(out.y.dims, [TOKENS, HIDDEN]);

    // Router logits: graph MatMul vs the reference matvec.
    const E = spec.numExperts;
    const refLogits = new Float32Array(TOKENS * E);
    for (let tok = 0; tok < TOKENS; tok++) refLogits.set(matvec(lw.router, E, HIDDEN, x, tok * HIDDEN), tok * E);
    t.ok(relErr(refLogits, logits) < 1e-5, 'router logits agree');

    // Top-k choice and gate weights as ORT's kernel made them.
    let sameExperts = 0;
    let weightErr = 0;
    for (let tok = 0; tok < TOKENS; tok++) {
      const want = ref.routing[tok];
      const got = observedRouting(probe, tok, E);
      if (JSON.stringify([...want.experts].sort((a, b) => a - b)) === JSON.stringify([...got.experts].sort((a, b) => a - b))) sameExperts++;
      const byId = new Map(got.experts.map((e, i) => [e, got.weights[i]]));
      want.experts.forEach((e, i) => (weightErr = Math.max(weightErr, Math.abs((byId.get(e) ?? 0) - want.weights[i]))));
    }
    t.equal(sameExperts, TOKENS, 'ORT selects the same top-k experts for every token');
    t.ok(weightErr < 1e-5, `ORT's gate weights agree (max diff ${weightErr.toExponential(2)})`);
    // The routing rule's renormalisation is visible: weights sum to 1 iff renorm.
    const sum0 = ref.routing[0].weights.reduce((a, b) => a + b, 0);
    t.equal(Math.abs(sum0 - 1) < 1e-9, spec.gating === 'softmax_topk_renorm', 'gating rule as intended');

    // The block output.
    const err = relErr(ref.out, y);
    t.comment(`${arch}: max |ref - ort| / max(1, max|ref|) = ${err.toExponential(3)} (max|ref| = ${maxAbs(ref.out).toFixed(3)})`);
    t.ok(err <= TOL, `block output agrees within ${TOL}`);
    t.ok(maxAbs(ref.out) > 0.05, 'the output is not trivially small');

    // Negative control: perturb one routed expert (the first token's top choice) in the
    // reference only, by 1% of its down projection; the comparison must notice.
    const victim = ref.routing[0].experts[0];
    const perturbed: LayerWeights = {
      ...lw,
      experts: lw.experts.map((ex, e) => (e === victim ? { ...ex, down: ex.down.map((v) => v * 1.01) } : ex)),
    };
    const bad = moeBlock(spec, perturbed, x, TOKENS);
    const badErr = relErr(bad.out, y);
    t.ok(badErr > 10 * TOL, `perturbing expert ${victim} is detected (err ${badErr.toExponential(2)})`);

    // Forcing a different routing on one token (swap its k-th choice for an unselected
    // expert) is detected too: ORT really uses the top-k it chose.
    const forced = ref.routing.map((r) => ({ experts: [...r.experts], weights: [...r.weights] }));
    const unused = Array.from({ length: E }, (_, e) => e).find((e) => !forced[0].experts.includes(e))!;
    forced[0].experts[spec.topK - 1] = unused;
    const wrong = moeBlock(spec, lw, x, TOKENS, forced);
    t.ok(relErr(wrong.out, y) > 10 * TOL, 'a different expert choice is detected');
    // Sanity of the forced path itself: forcing the reference's own routing is a no-op.
    t.equal(relErr(moeBlock(spec, lw, x, TOKENS, ref.routing).out, ref.out), 0);
    // And route() on ORT's logits gives the same experts as on the reference logits.
    for (let tok = 0; tok < TOKENS; tok++) {
      const r = route(spec, logits.subarray(tok * E, (tok + 1) * E));
      if (JSON.stringify(r.experts) !== JSON.stringify(ref.routing[tok].experts)) t.fail(`token ${tok}: routing differs on ORT logits`);
    }
  });
});
