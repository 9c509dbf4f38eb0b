/**
 * The JSON objects of an OpenAI-style SSE stream (`data: {...}` frames separated by blank
 * lines), as each frame arrives; `data: [DONE]` and non-data frames are skipped.
 */
export async function* sseObjects(body: AsyncIterable<Buffer | string>): AsyncGenerator<Record<string, any>> {
  let buf = '';
  for await (const chunk of body) {
    buf += chunk.toString();
    let k: number;
    while ((k = buf.indexOf('\n\n')) >= 0) {
      const frame = buf.slice(0, k);
      buf = buf.slice(k + 2);
      if (!frame.startsWith('data: ') || frame === 'data: [DONE]') continue;
      yield JSON.parse(frame.slice(6));
    }
  }
}
