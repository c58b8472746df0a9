"""Fuzz `gptlab serve` from its own OpenAPI schema with schemathesis: no request may make it fail
(a 5xx, a crash, a hang); schema mismatches are listed apart, as nits.

    python benchmarks/fuzz_serve.py [--max-examples 50] [--seed 1] [--out DIR]

Starts a real ``gptlab serve --api-key KEY`` subprocess (bench_serve.Server) on a tiny random-initialised
model whose byte-level BPE has the chat tokens and whose config names the chat format, so any text
encodes and both generation routes generate. Its ``/openapi.json`` is narrowed to the limits the server
enforces (``contract``: FastAPI publishes any string as the model name, any integer as max_tokens, so
almost no generated request would reach the model otherwise), and ``schemathesis run`` goes twice:
with the key (every operation, valid and invalid inputs) and without it (the 401 paths). Checks:
not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
negative_data_rejection; each request times out after 30 s (a hang shows as an error), and an operation
keeps being tested after its first failure (``--continue-on-failure``): FastAPI's schema declares 422, not
the 400 this server answers, so otherwise the first invalid input would end an operation's run.

Then a few requests schemathesis never makes (``EDGES``: lone surrogates, an enormous batch) must each
get a 4xx within 30 s; the server runs with an 8 GB address-space limit, so the batch cannot take the
machine's memory.

A 5xx, a response that is not the JSON it claims, or an error (network failure, timeout, a server that
died) is a bug: exit status 1. The rest are schema nits (a status or content type the schema does not
declare, a body it does not describe). schemathesis's own output, with a curl reproducer per failure,
is printed as it runs; its JSON reports go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_serve import Server  # noqa: E402

KEY = "sk-fuzz"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "negative_data_rejection")
BUGS = {"ServerError", "MalformedJson", "ResponseTimeExceeded"}  # schemathesis failure types
MEMORY_LIMIT = 8 << 30  # the server's address space: a request that wants more fails fast
# Requests schemathesis does not make (its strings are valid UTF-8; its arrays stay small): each must get a 4xx.
EDGES = [("/tokenize", '{"prompt": "\\ud800"}'),  # a lone surrogate: valid JSON, not encodable text
         ("/v1/completions", '{"prompt": ["ok", "a\\udfff"], "max_tokens": 2}'),
         ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud83d"}], "max_tokens": 2}'),
         ("/web/next", '{"text": "\\ud800"}'),
         ("/web/feedback", '{"messages": [{"role": "user", "content": "\\ud800"}], "answer": "x", "rating": "up"}'),
         ("/web/rankings", '{"prompt": "\\ud800", "responses": ["a", "b"], "ranking": [0, 1]}'),
         # 800k rows (prompts x n) from 400 kB of body: a 13 GB KV cache at once, or hours of the batcher's time
         ("/v1/completions", json.dumps({"prompt": [[0]] * 100_000, "n": 8, "max_tokens": 63}, separators=(",", ":")))]


def tiny_run(out: Path) -> Path:
    """1 layer x 32, context 64, a 300-token byte-level BPE with the chat tokens, saved with chat_format."""
    import torch

    from gptlab import GPT, GPTConfig
    from gptlab.chat import CHAT_FORMAT, add_chat_tokens
    from gptlab.runs import save_model
    from gptlab.tokenizer import train_bpe

    rng = random.Random(0)
    tok = train_bpe(iter(" ".join(rng.choices(["the", "cat", "sat", "on", "a", "mat"], k=10)) for _ in range(500)),
                    300)
    add_chat_tokens(tok)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size))
    return save_model(out, model, tok, extra={"chat_format": CHAT_FORMAT})


def contract(schema: dict[str, Any], name: str, vocab: int, block: int) -> dict[str, Any]:
    """The published schema narrowed to the limits the server enforces (model name, roles, ranges, token
    ids), so that valid requests get past validation into generation and invalid ones test that validation
    (negative_data_rejection). Nothing is narrowed beyond what the server refuses."""
    def opt(s: dict[str, Any]) -> dict[str, Any]:
        return {"anyOf": [s, {"type": "null"}]}

    def ints(lo: int, hi: int | None = None) -> dict[str, Any]:
        return {"type": "integer", "minimum": lo, **({} if hi is None else {"maximum": hi})}

    text = {"type": "string", "minLength": 1}
    ids = {"type": "array", "minItems": 1, "items": ints(0, vocab - 1)}
    sampling = {"model": {"enum": [name, None]}, "max_tokens": opt(ints(0, block)), "n": opt(ints(1, 8)),
                "temperature": opt({"type": "number", "minimum": 0, "maximum": 100}),
                "top_p": opt({"type": "number", "exclusiveMinimum": 0, "maximum": 1}), "top_k": opt(ints(-1)),
                "seed": opt(ints(-2 ** 63, 2 ** 64 - 1)),
                "stop": opt({"anyOf": [text, {"type": "array", "maxItems": 16, "items": text}]})}
    fields = {
        "CompletionRequest": {**sampling, "logprobs": opt(ints(0, 5)), "prompt": {"anyOf": [
            text, {"type": "array", "minItems": 1, "items": text}, ids,
            {"type": "array", "minItems": 1, "items": ids}]}},
        "ChatRequest": {**sampling, "top_logprobs": opt(ints(0, 20)), "max_completion_tokens": opt(ints(0, block)),
                        "messages": {"type": "array", "minItems": 1,
                                     "items": {"$ref": "#/components/schemas/ChatMessage"}}},
        "ChatMessage": {"role": {"enum": ["system", "developer", "user", "assistant"]}},
        "ContentPart": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
        "DetokenizeRequest": {"tokens": {"type": "array", "items": ints(0, vocab - 1)}}}
    components = schema["components"]["schemas"]
    for component, props in fields.items():
        components[component]["properties"].update(props)
    components["ContentPart"]["required"] = ["type", "text"]
    schema["paths"]["/v1/models/{name}"]["get"]["parameters"][0]["schema"] = {"enum": [name]}
    return schema


def fuzz(schema: Path, url: str, report: Path, max_examples: int, seed: int, headers: list[str]) -> dict[str, Any]:
    """One ``schemathesis run``; returns its JSON report."""
    cmd = [str(Path(sys.executable).parent / "schemathesis"), "run", str(schema), "--url", url, "--checks", CHECKS,
           "--max-examples", str(max_examples), "--seed", str(seed), "--workers", "1", "--request-timeout", "30",
           "--continue-on-failure", "--generation-database", "none", "--no-color", "--output-sanitize", "false",
           "--report", "json", "--report-json-path", str(report)]
    for h in headers:
        cmd += ["--header", h]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=False, cwd=report.parent)  # its crash cache (.schemathesis/) goes there too
    return json.loads(report.read_text())


def summarise(name: str, doc: dict[str, Any]) -> int:
    """Print one run's summary; returns its number of bugs."""
    ops, cases = doc["operations"] or {}, doc["test_cases"]
    bugs = [f for f in doc["failures"] if f["type"] in BUGS] + doc["errors"]
    nits = [f for f in doc["failures"] if f["type"] not in BUGS]
    print(f"\n{name}: {ops.get('tested')} of {ops.get('total')} operations tested, {cases['generated']} test cases, "
          f"{cases['with_failures']} with failures ({cases['unique_failures']} unique), {cases['errored']} errored; "
          f"{doc['running_time']:.0f} s")
    for label, group in (("BUG", bugs), ("schema nit", nits)):
        for f in group:
            where = ", ".join(f.get("operations") or [])
            print(f"  {label}: {f.get('type', 'error')}: {f['title']} x{f['count']}" + (f" [{where}]" if where else ""))
    return sum(f["count"] for f in bugs)


def edges(url: str, auth: dict[str, str]) -> int:
    """Send ``EDGES``; print each answer, returns how many were not a 4xx (5xx, timeout, dropped connection)."""
    bugs = 0
    print("\nedge cases (each must be refused with a 4xx):")
    for path, raw in EDGES:  # a connection each: after a 500 the server drops the connection it came on
        try:
            r = httpx.post(url + path, content=raw, headers={**auth, "Content-Type": "application/json"}, timeout=30)
            answer, ok = f"{r.status_code} {r.text[:150]}", 400 <= r.status_code < 500
        except httpx.HTTPError as e:
            answer, ok = f"{type(e).__name__}: {e}", False
        bugs += not ok
        shown = raw if len(raw) < 120 else raw[:60] + f"... ({len(raw)} bytes)"
        print(f"  {'ok' if ok else 'BUG'}: POST {path} {shown}\n      -> {answer}")
    return bugs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-examples", type=int, default=50, help="test cases per operation and phase")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "fuzz_serve")
    args = ap.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    with (tempfile.TemporaryDirectory() as tmp,
          Server(tiny_run(Path(tmp) / "tiny"), "--api-key", KEY, memory_limit=MEMORY_LIMIT) as server):
        auth = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=server.url, headers=auth) as http:
            info = http.get("/tokenizer_info").json()
            published, model = http.get("/openapi.json").json(), http.get("/v1/models").json()["data"][0]["id"]
        schema = args.out / "openapi.json"
        schema.write_text(json.dumps(contract(published, model, info["vocab_size"], info["max_model_len"]), indent=1))
        runs = {name: fuzz(schema, server.url, args.out / f"{name.replace(' ', '_')}.json", args.max_examples,
                           args.seed, headers)
                for name, headers in (("with key", [f"Authorization: {auth['Authorization']}"]), ("without key", []))}
        bugs = edges(server.url, auth)
        alive = server.proc.poll() is None
    bugs += sum(summarise(name, doc) for name, doc in runs.items())
    print(f"\nserver still running at the end: {alive}; bugs: {bugs}")
    return 1 if bugs or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
