// A minimal ONNX ModelProto writer: enough protobuf (varints, length-delimited fields,
// fixed32 floats, raw tensor bytes) to build small inference graphs in memory, e.g. an
// oracle MoE block for onnxruntime or a small expert predictor (MatMul/Add/Relu/Sigmoid/
// Softmax). No dependency on the `onnx` or `protobufjs` packages.
//
// Field numbers follow onnx/onnx.proto (proto2):
//   ModelProto       ir_version=1 producer_name=2 producer_version=3 doc_string=6 graph=7 opset_import=8
//   OperatorSetId    domain=1 version=2
//   GraphProto       node=1 name=2 initializer=5 doc_string=10 input=11 output=12 value_info=13
//   NodeProto        input=1 output=2 name=3 op_type=4 attribute=5 doc_string=6 domain=7
//   AttributeProto   name=1 f=2 i=3 s=4 t=5 floats=7 ints=8 strings=9 type=20
//   TensorProto      dims=1 data_type=2 int64_data=7 name=8 raw_data=9
//   ValueInfoProto   name=1 type=2
//   TypeProto        tensor_type=1;  TypeProto.Tensor elem_type=1 shape=2
//   TensorShapeProto dim=1;  Dimension dim_value=1 dim_param=2

// ---------------------------------------------------------------------------
// Protobuf wire format

const WIRE_VARINT = 0;
const WIRE_LEN = 2;
const WIRE_I32 = 5;

/** An append-only protobuf message encoder. */
export class ProtoWriter {
  private chunks: Uint8Array[] = [];
  private cur: number[] = [];
  private size = 0;

  private flush(): void {
    if (this.cur.length) {
      this.chunks.push(Uint8Array.from(this.cur));
      this.cur = [];
    }
  }

  private byte(b: number): void {
    this.cur.push(b & 0xff);
    this.size++;
  }

  private bytesRaw(b: Uint8Array): void {
    this.flush();
    this.chunks.push(b);
    this.size += b.length;
  }

  /** Unsigned varint of a non-negative integer or bigint; negative numbers as 64-bit two's complement. */
  varint(v: number | bigint): void {
    let x = BigInt(v);
    if (x < 0n) x = BigInt.asUintN(64, x);
    if (x <= 0xffffffffn && typeof v === 'number' && v >= 0) {
      // fast path for ordinary non-negative numbers
      let n = Number(x);
      while (n > 0x7f) {
        this.byte((n & 0x7f) | 0x80);
        n = Math.floor(n / 128);
      }
      this.byte(n);
      return;
    }
    while (x > 0x7fn) {
      this.byte(Number(x & 0x7fn) | 0x80);
      x >>= 7n;
    }
    this.byte(Number(x));
  }

  private tag(field: number, wire: number): void {
    this.varint(field * 8 + wire);
  }

  /** An int32/int64/enum/bool field (varint). */
  int(field: number, v: number | bigint): void {
    this.tag(field, WIRE_VARINT);
    this.varint(v);
  }

  /** A float field (fixed32, little endian). */
  float(field: number, v: number): void {
    this.tag(field, WIRE_I32);
    const b = new Uint8Array(4);
    new DataView(b.buffer).setFloat32(0, v, true);
    for (const x of b) this.byte(x);
  }

  /** A bytes field. */
  bytes(field: number, b: Uint8Array): void {
    this.tag(field, WIRE_LEN);
    this.varint(b.length);
    this.bytesRaw(b);
  }

  /** A string field (UTF-8). */
  string(field: number, s: string): void {
    this.bytes(field, new TextEncoder().encode(s));
  }

  /** An embedded message field. */
  message(field: number, m: ProtoWriter): void {
    this.bytes(field, m.finish());
  }

  /** A packed repeated varint field (int64s). Empty lists are omitted. */
  packedInts(field: number, vs: readonly (number | bigint)[]): void {
    if (!vs.length) return;
    const inner = new ProtoWriter();
    for (const v of vs) inner.varint(v);
    this.bytes(field, inner.finish());
  }

  /** A packed repeated float field. Empty lists are omitted. */
  packedFloats(field: number, vs: ArrayLike<number>): void {
    if (!vs.length) return;
    const b = new Uint8Array(vs.length * 4);
    const dv = new DataView(b.buffer);
    for (let i = 0; i < vs.length; i++) dv.setFloat32(i * 4, vs[i], true);
    this.bytes(field, b);
  }

  finish(): Uint8Array {
    this.flush();
    if (this.chunks.length === 1) return this.chunks[0];
    const out = new Uint8Array(this.size);
    let off = 0;
    for (const c of this.chunks) {
      out.set(c, off);
      off += c.length;
    }
    return out;
  }
}

// ---------------------------------------------------------------------------
// ONNX model description

/** TensorProto.DataType codes. */
export const DataType = {
  FLOAT: 1,
  UINT8: 2,
  INT8: 3,
  INT32: 6,
  INT64: 7,
  BOOL: 9,
  FLOAT16: 10,
  DOUBLE: 11,
} as const;
export type DataTypeCode = (typeof DataType)[keyof typeof DataType];

/** A dimension: a fixed size, or a symbolic name such as 'tokens'. */
export type Dim = number | string;

/** A graph input or output: name, element type (default float) and shape (omit for unknown). */
export interface ValueInfo {
  name: string;
  elemType?: DataTypeCode;
  shape?: readonly Dim[];
}

/** A constant tensor stored in the graph. Float32Array → FLOAT, Int32Array → INT32, BigInt64Array → INT64, Uint8Array → UINT8. */
export interface Initializer {
  name: string;
  dims: readonly number[];
  data: Float32Array | Int32Array | BigInt64Array | Uint8Array;
}

/** An attribute value; the type is inferred (number → INT if integral unless wrapped with `{float}`). */
export type AttrValue =
  | number // INT when an integer, FLOAT otherwise
  | { float: number } // always FLOAT
  | { floats: readonly number[] }
  | string // STRING
  | readonly number[] // INTS
  | bigint; // INT

export interface NodeSpec {
  opType: string;
  inputs: readonly string[]; // '' for an omitted optional input
  outputs: readonly string[];
  name?: string;
  /** Operator domain: '' (default, ai.onnx) or e.g. 'com.microsoft'. */
  domain?: string;
  attributes?: Record<string, AttrValue>;
}

export interface OpsetImport {
  domain: string; // '' for ai.onnx
  version: number;
}

export interface ModelSpecOnnx {
  inputs: readonly ValueInfo[];
  outputs: readonly ValueInfo[];
  initializers?: readonly Initializer[];
  nodes: readonly NodeSpec[];
  /** Default: ai.onnx 17 only; add { domain: 'com.microsoft', version: 1 } for contrib ops. */
  opsets?: readonly OpsetImport[];
  /** Default 8 (onnxruntime 1.30 accepts up to 10+). */
  irVersion?: number;
  graphName?: string;
  producerName?: string;
}

const ATTR_FLOAT = 1;
const ATTR_INT = 2;
const ATTR_STRING = 3;
const ATTR_FLOATS = 6;
const ATTR_INTS = 7;

function encodeAttribute(name: string, v: AttrValue): ProtoWriter {
  const a = new ProtoWriter();
  a.string(1, name);
  if (typeof v === 'bigint') {
    a.int(3, v);
    a.int(20, ATTR_INT);
  } else if (typeof v === 'number') {
    if (Number.isInteger(v)) {
      a.int(3, v);
      a.int(20, ATTR_INT);
    } else {
      a.float(2, v);
      a.int(20, ATTR_FLOAT);
    }
  } else if (typeof v === 'string') {
    a.string(4, v);
    a.int(20, ATTR_STRING);
  } else if (Array.isArray(v)) {
    a.packedInts(8, v as readonly number[]);
    a.int(20, ATTR_INTS);
  } else if ('float' in v) {
    a.float(2, v.float);
    a.int(20, ATTR_FLOAT);
  } else if ('floats' in v) {
    a.packedFloats(7, v.floats);
    a.int(20, ATTR_FLOATS);
  } else {
    throw new Error(`attribute ${name}: unsupported value`);
  }
  return a;
}

function elemTypeOf(data: Initializer['data']): DataTypeCode {
  if (data instanceof Float32Array) return DataType.FLOAT;
  if (data instanceof Int32Array) return DataType.INT32;
  if (data instanceof BigInt64Array) return DataType.INT64;
  return DataType.UINT8;
}

/** Encodes a TensorProto with little-endian raw_data. */
export function encodeTensor(t: Initializer): ProtoWriter {
  const count = t.dims.reduce((a, b) => a * b, 1);
  if (count !== t.data.length) throw new Error(`initializer ${t.name}: dims ${t.dims.join('x')} != ${t.data.length} values`);
  const w = new ProtoWriter();
  w.packedInts(1, t.dims);
  w.int(2, elemTypeOf(t.data));
  w.string(8, t.name);
  // raw_data must be little endian; copy so the bytes are exactly the view's (and to be LE-safe).
  const raw = new Uint8Array(t.data.byteLength);
  const dv = new DataView(raw.buffer);
  const d = t.data;
  if (d instanceof Float32Array) for (let i = 0; i < d.length; i++) dv.setFloat32(i * 4, d[i], true);
  else if (d instanceof Int32Array) for (let i = 0; i < d.length; i++) dv.setInt32(i * 4, d[i], true);
  else if (d instanceof BigInt64Array) for (let i = 0; i < d.length; i++) dv.setBigInt64(i * 8, d[i], true);
  else raw.set(d);
  w.bytes(9, raw);
  return w;
}

function encodeValueInfo(v: ValueInfo): ProtoWriter {
  const tensorType = new ProtoWriter();
  tensorType.int(1, v.elemType ?? DataType.FLOAT);
  if (v.shape) {
    const shape = new ProtoWriter();
    for (const d of v.shape) {
      const dim = new ProtoWriter();
      if (typeof d === 'number') dim.int(1, d);
      else dim.string(2, d);
      shape.message(1, dim);
    }
    tensorType.message(2, shape);
  }
  const type = new ProtoWriter();
  type.message(1, tensorType);
  const w = new ProtoWriter();
  w.string(1, v.name);
  w.message(2, type);
  return w;
}

function encodeNode(n: NodeSpec, index: number): ProtoWriter {
  const w = new ProtoWriter();
  for (const i of n.inputs) w.string(1, i);
  for (const o of n.outputs) w.string(2, o);
  w.string(3, n.name ?? `${n.opType}_${index}`);
  w.string(4, n.opType);
  for (const [k, v] of Object.entries(n.attributes ?? {})) w.message(5, encodeAttribute(k, v));
  if (n.domain) w.string(7, n.domain);
  return w;
}

/** Serialises a ModelProto; pass the bytes to `InferenceSession.create(bytes)`. */
export function buildModel(m: ModelSpecOnnx): Uint8Array {
  const graph = new ProtoWriter();
  m.nodes.forEach((n, i) => graph.message(1, encodeNode(n, i)));
  graph.string(2, m.graphName ?? 'graph');
  for (const t of m.initializers ?? []) graph.message(5, encodeTensor(t));
  for (const v of m.inputs) graph.message(11, encodeValueInfo(v));
  for (const v of m.outputs) graph.message(12, encodeValueInfo(v));

  const model = new ProtoWriter();
  model.int(1, m.irVersion ?? 8);
  model.string(2, m.producerName ?? 'moe-serve');
  model.message(7, graph);
  for (const o of m.opsets ?? [{ domain: '', version: 17 }]) {
    const op = new ProtoWriter();
    op.string(1, o.domain);
    op.int(2, o.version);
    model.message(8, op);
  }
  return model.finish();
}
