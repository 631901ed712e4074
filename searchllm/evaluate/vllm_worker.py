"""One vLLM engine answering requests on stdin, run by searchllm.evaluate.vllm_engine in vLLM's own Python.

Standalone on purpose (vLLM and the standard library only): vLLM pins its own transformers, so it often
lives in a venv of its own where searchllm is not installed. Requests and replies are JSON lines; replies
start with MARK so vLLM's own output on stdout is told apart.
  {"op": "logprobs", "windows": [[ids]]} -> {"nll": sum of -log p(token | prefix) over tokens 1..T, "tokens": n}
  {"op": "greedy", "prompt": [ids], "n": k} -> {"tokens": [k ids]}
  {"op": "speed", "prompt": [ids], "decode": k} -> {"prefill_tok_s": .., "decode_tok_s": ..}
"""

import json
import os
import sys
import time

MARK = "@@searchllm "


def reply(obj) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    args = json.loads(sys.argv[1])
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    # On CPU the engine core and its worker in processes of their own each import vLLM again (~17 s of a 29 s
    # start on 2 cores) and overlap nothing an evaluation needs; on GPUs vLLM's own defaults, as users serve.
    cpu = current_platform.is_cpu()
    if cpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    llm = LLM(
        model=args["model"],
        trust_remote_code=True,
        dtype=args["dtype"],
        max_model_len=args["max_len"],
        enforce_eager=args["eager"],
        model_impl=args.get("impl", "auto"),
        skip_tokenizer_init=True,
        kv_cache_memory_bytes=args["kv_bytes"],
        enable_prefix_caching=False,  # every window and timing computes its whole prompt
        seed=0,
        **({"distributed_executor_backend": "uni"} if cpu else {}),
    )
    reply({"ready": True, "version": vllm.__version__})

    def run(prompts, **kw):
        params = SamplingParams(temperature=0.0, detokenize=False, ignore_eos=True, **kw)
        return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "logprobs":
            nll, n = 0.0, 0
            for out in run(req["windows"], max_tokens=1, prompt_logprobs=0):
                for tok, lp in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
                    nll -= lp[tok].logprob
                    n += 1
            reply({"nll": nll, "tokens": n})
        elif req["op"] == "greedy":
            reply({"tokens": list(run([req["prompt"]], max_tokens=req["n"])[0].outputs[0].token_ids)})
        elif req["op"] == "speed":
            prompt, k = req["prompt"], req["decode"]
            run([prompt[:8]], max_tokens=2)  # warm-up: first-call allocations out of the timing
            t0 = time.perf_counter()
            run([prompt], max_tokens=1)
            t1 = time.perf_counter()
            run([prompt], max_tokens=k + 1)
            t2 = time.perf_counter()
            reply({"prefill_tok_s": len(prompt) / (t1 - t0), "decode_tok_s": k / max(t2 - t1 - (t1 - t0), 1e-9)})
        else:
            reply({"error": f"unknown op {req['op']!r}"})


if __name__ == "__main__":
    main()
