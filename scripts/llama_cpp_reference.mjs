// What llama.cpp itself computes from a GGUF file pipe exported: its tokenization of a few
// texts, the log-probabilities of the next token after every position (teacher forced, the
// ids pipe's tokenizer gives), and free-running greedy continuations. Run through
// node-llama-cpp 3.21.1 (prebuilt llama.cpp binaries):
//
//   npm install node-llama-cpp@3.21.1   (in some folder, NODE_LLAMA_CPP=<that>/node_modules/node-llama-cpp)
//   node scripts/llama_cpp_reference.mjs model.gguf cases.json > out.json
//
// cases.json: {"texts": [...], "ids": [[...], ...], "greedy_tokens": N, "keep": [ids...] | null}
// (`keep`: the vocabulary ids whose log-probabilities are recorded; null for all of them.)
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [modelPath, casesPath] = process.argv.slice(2);
const lib = process.env.NODE_LLAMA_CPP;
const { getLlama, LlamaLogLevel } = await import(pathToFileURL(path.join(lib, "dist", "index.js")).href);
const cases = JSON.parse(fs.readFileSync(casesPath, "utf8"));
const llama = await getLlama({ gpu: false, logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath });
const out = { tokenized: [], logprobs: [], greedy: [], eos: model.tokens.eos, bos: model.tokens.bos };
for (const text of cases.texts) {
    out.tokenized.push(Array.from(model.tokenize(text, false)));
}
for (const ids of cases.ids) {
    const context = await model.createContext({ contextSize: 256, batchSize: 256, sequences: 1, experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32" });
    const sequence = context.getSequence();
    const input = ids.map((id) => [id, { generateNext: { probabilities: true } }]);
    const steps = await sequence.controlledEvaluate(input);
    out.logprobs.push(steps.map((step) => {
        const p = step.next.probabilities;
        const keep = cases.keep ?? [...Array(model.tokens.vocabularySize ?? p.size).keys()];
        return keep.map((id) => Math.log(p.get(id) ?? 0));
    }));
    await context.dispose();
}
for (const ids of cases.ids) {
    const context = await model.createContext({ contextSize: 256, batchSize: 256, sequences: 1, experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32" });
    const sequence = context.getSequence();
    const generated = [];
    for await (const token of sequence.evaluate(ids, { temperature: 0, yieldEogToken: true })) {
        generated.push(token);
        if (generated.length >= cases.greedy_tokens) break;
    }
    out.greedy.push(generated);
    await context.dispose();
}
console.log(JSON.stringify(out));
await model.dispose();
await llama.dispose();
