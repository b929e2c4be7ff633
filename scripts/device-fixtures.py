"""Greedy answers of `ludus generate` on a device against the Hugging Face fixtures
(tests/fixtures/smollm2/chat.json, made by scripts/reference/hf_reference.py in f32 on CPU).

    python3 scripts/device-fixtures.py LUDUS_BIN MODEL DEVICE FORMAT... > fixtures.json

FORMAT is f32, bf16 or int4. For each fixture conversation that `ludus generate --chat`
can express (a user line, optionally a system line), it checks that the prompt tokenizes
to the fixture's ids and reports how many greedy tokens agree with transformers' before
the first difference, and the fixture's top-1/top-2 logit margin at that step (a small
margin is a near-tie that any change of kernel may flip). Prints one JSON object.
"""
import json
import os
import subprocess
import sys
import time

FLAGS = {
    "f32": ["--quantize", "none", "--dtype", "f32"],
    "bf16": ["--quantize", "none", "--dtype", "bf16"],
    "int4": ["--quantize", "int4"],
}


def main():
    binary, model, device, formats = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "smollm2")
    cases = json.load(open(os.path.join(root, "chat.json")))
    report = {"device": device, "cases": []}
    for index, case in enumerate(cases):
        roles = [m["role"] for m in case["messages"]]
        if roles not in (["user"], ["system", "user"]):
            report["cases"].append({"case": index, "skipped": "a multi-turn chat (--chat takes one user line)"})
            continue
        expected = case["greedy_ids_until_eos"]
        if case["stopped_at_eos"]:
            expected = expected[:-1]  # ludus reports the end of sequence as its finish reason
        margins = case.get("greedy_step_margins", [])
        for fmt in formats:
            args = [binary, "generate", "--model", model, "--device", device, *FLAGS[fmt], "--temperature", "0",
                    "--max-tokens", str(len(expected) + 8), "--json"]
            for m in case["messages"]:
                args += ["--system" if m["role"] == "system" else "--chat", m["content"]]
            started = time.time()
            row = {"case": index, "format": fmt}
            try:
                run = subprocess.run(args, capture_output=True, text=True, timeout=300)
            except subprocess.TimeoutExpired:
                row["error"] = "timed out after 300 s"
                report["cases"].append(row)
                continue
            row["process_s"] = round(time.time() - started, 2)
            if run.returncode != 0:
                # libtorch's message comes first, its backtrace after: keep both ends.
                row["error"] = run.stderr[:1500] + (" … " + run.stderr[-500:] if len(run.stderr) > 2000 else "")
                report["cases"].append(row)
                continue
            out = json.loads(run.stdout)
            got = out["completion_tokens"]
            agree = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            # The end-of-sequence token may be reported as the last completion token.
            identical = got in (expected, case["greedy_ids_until_eos"])
            row.update({
                "prompt_ids_match": out["prompt_tokens"] == case["prompt_ids"],
                "agreeing_tokens": agree,
                "expected_tokens": len(expected),
                "identical": identical,
                "finish_reason": out["finish_reason"],
                "margin_at_difference": None if identical or agree >= len(margins) else margins[agree],
                "text": out["text"][:160],
                "time_to_first_token_ms": out["timings"]["time_to_first_token_ms"],
                "decode_tokens_per_s": out["timings"]["decode_tokens_per_s"],
            })
            report["cases"].append(row)
    json.dump(report, sys.stdout, indent=1)
    print()
    # A run that failed is a failed check; answers that part at a near-tie are not.
    sys.exit(1 if any("error" in row for row in report["cases"]) else 0)


if __name__ == "__main__":
    main()
