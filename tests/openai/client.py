"""The official `openai` Python client against a running `kith up`.

Usage: client.py BASE_URL MODEL. Exits non-zero, with the reason, on the
first behaviour that differs from what an OpenAI client expects. Run by
agent/tests/api.rs, which starts kith.
"""
import sys
import time

import openai
from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base + "/v1", api_key="kith-needs-no-key", max_retries=0, timeout=120)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what.split(":")[0])


# Models: the text model is listed with its task, and retrievable by id.
listed = {m.id: m for m in client.models.list().data}
check(model in listed, f"models.list lists {model}: got {sorted(listed)}")
check(getattr(listed[model], "task", None) == "text-generation", f"{model} has task text-generation: {listed[model]}")
check(client.models.retrieve(model).id == model, "models.retrieve finds the model")

# A chat completion with usage counts.
r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=24, temperature=0)
text = r.choices[0].message.content
check("Paris" in text, f"chat answers the question: {text!r}")
check(r.object == "chat.completion" and r.choices[0].message.role == "assistant", f"chat object shape: {r}")
u = r.usage
check(u.prompt_tokens > 5 and 0 < u.completion_tokens <= 24 and u.total_tokens == u.prompt_tokens + u.completion_tokens,
      f"usage counts add up: {u}")
check(r.choices[0].finish_reason in ("stop", "length"), f"finish_reason: {r.choices[0].finish_reason}")

# max_tokens is honoured and reported as `length`.
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count from 1 to 50."}],
                                   max_tokens=5, temperature=0)
check(r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length",
      f"max_tokens=5 gives 5 tokens and finish_reason length: {r.usage}, {r.choices[0].finish_reason}")

# A stop string ends the answer before it.
r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=24, temperature=0, stop=["Paris"])
check("Paris" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop",
      f"stop=['Paris'] stops before it: {r.choices[0].message.content!r}")

# The same seed gives the same sampled text.
def sampled(seed):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me about cats."}],
                                          max_tokens=16, temperature=1.0, top_p=0.95, seed=seed).choices[0].message.content
a, b = sampled(7), sampled(7)
check(a == b, f"seed 7 twice gives the same text: {a!r} vs {b!r}")

# Streaming: chunks arrive while the answer is being generated, then usage.
started = time.monotonic()
arrivals, pieces, finish, usage = [], [], None, None
stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count from 1 to 30, separated by commas."}],
                                        max_tokens=40, temperature=0, stream=True, stream_options={"include_usage": True})
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        arrivals.append(time.monotonic())
        pieces.append(chunk.choices[0].delta.content)
    if chunk.choices and chunk.choices[0].finish_reason:
        finish = chunk.choices[0].finish_reason
    if chunk.usage:
        usage = chunk.usage
ended = time.monotonic()
check(len(arrivals) >= 10, f"the stream has many content chunks: {len(arrivals)}")
check(ended - arrivals[0] > 0.2 and arrivals[-1] - arrivals[0] > 0.2,
      f"chunks arrive before the end: first after {arrivals[0] - started:.2f} s, end after {ended - started:.2f} s")
check(finish in ("stop", "length"), f"the stream ends with a finish_reason: {finish}")
check(usage is not None and usage.completion_tokens >= len(arrivals) - 1,
      f"include_usage sends the counts: {usage}")
check("1" in "".join(pieces), f"the streamed text counts: {''.join(pieces)!r}")

# A plain completion.
r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
check(r.object == "text_completion" and "Paris" in r.choices[0].text, f"completion continues the text: {r.choices[0].text!r}")
check(r.usage.completion_tokens <= 8, f"completion usage: {r.usage}")

# Streaming completion.
parts = [c.choices[0].text for c in client.completions.create(model=model, prompt="One, two, three,", max_tokens=6,
                                                               temperature=0, stream=True) if c.choices]
check(len(parts) >= 3, f"completion streams pieces: {parts}")

# Errors arrive as the client's typed exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=QUESTION)
    check(False, "an unknown model is an error")
except openai.NotFoundError as e:
    check(e.status_code == 404 and e.code == "model_not_found", f"unknown model: 404 model_not_found ({e.code})")
try:
    client.chat.completions.create(model=model, messages=QUESTION, temperature=5)
    check(False, "temperature 5 is an error")
except openai.BadRequestError as e:
    check(e.status_code == 400 and "temperature" in str(e), f"temperature=5: 400 naming it ({e})")
try:
    client.chat.completions.create(model=model, messages=[])
    check(False, "no messages is an error")
except openai.BadRequestError as e:
    check("messages" in str(e), f"empty messages: 400 naming it ({e})")
print("all checks passed")
