"""`python -m searchllm.evaluate`: the evaluation protocol on a checkpoint, a run dir or a GGUF file."""

from __future__ import annotations

import logging
import sys
from typing import Optional

from searchllm.config import EvalError
from searchllm.evaluate import (
    RESULTS,
    append_results,
    describe,
    describe_gguf,
    describe_safetensors,
    device_of,
    evaluate_gguf,
    evaluate_model,
    evaluate_vllm,
    format_table,
    locate,
)

ENGINES = ("transformers", "vllm")  # a .gguf is always llama.cpp's


def engine_of(args: list[str]) -> tuple[str, list[str]]:
    """`--engine NAME` or `--engine=NAME` anywhere in the arguments; the rest in order."""
    engine, rest, i = "transformers", [], 0
    while i < len(args):
        if args[i] == "--engine" and i + 1 < len(args):
            engine, i = args[i + 1], i + 2
            continue
        if args[i].startswith("--engine="):
            engine = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    return engine, rest


def main(argv: Optional[list[str]] = None) -> int:
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from searchllm.config import ConfigError, load_config
    from searchllm.data import DataError
    from searchllm.evaluate.llamacpp import LlamaCppMissing
    from searchllm.evaluate.vllm_engine import VLLMMissing
    from searchllm.models.loading import ModelError, load_pretrained, register_export_classes

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    args = sys.argv[1:] if argv is None else argv
    engine, args = engine_of(args)
    if not args or args[0].startswith("-") or "=" in args[0] or engine not in ENGINES:
        print(
            "usage: python -m searchllm.evaluate <checkpoint dir | run dir | file.gguf> [--engine "
            + "|".join(ENGINES)
            + "] [eval.key=value ...] [data.root=DIR]",
            file=sys.stderr,
        )
        return 2
    try:
        target = locate(args[0])
        bad = [a for a in args[1:] if not a.startswith(("eval.", "data.root="))]
        if bad:
            raise ConfigError(f"{bad[0]!r}: only eval.* and data.root overrides apply to an evaluation")
        base = target.run_dir / "config.yaml" if target.run_dir else None
        cfg = load_config(args[1:], base_file=base)
        if target.checkpoint.suffix == ".gguf":
            table = evaluate_gguf(
                target.checkpoint,
                AutoTokenizer.from_pretrained(target.checkpoint.parent),
                describe_gguf(target.checkpoint),
                cfg.eval,
                cfg.data.root,
            )
        elif engine == "vllm":  # served by vLLM, in whichever Python has it (evaluate.vllm_engine)
            register_export_classes()  # the tokenizer reads config.json, whose auto_map names these
            table = evaluate_vllm(
                target.checkpoint,
                AutoTokenizer.from_pretrained(target.checkpoint),
                describe_safetensors(target.checkpoint),
                cfg.eval,
                cfg.data.root,
            )
        else:
            model, tokenizer = load_pretrained(str(target.checkpoint))
            model.to(device_of(cfg.eval.device))
            table = evaluate_model(model, tokenizer, describe(model, target.checkpoint), cfg.eval, cfg.data.root)
    except (EvalError, ConfigError, DataError, ModelError, LlamaCppMissing, VLLMMissing) as e:
        print(f"searchllm: error: {e}", file=sys.stderr)
        return 2
    append_results(target.out, table)
    print(format_table(table))
    print(
        f"appended {len(table)} rows to {target.out / RESULTS}.parquet (and .csv); config: "
        f"{OmegaConf.to_yaml(OmegaConf.structured(cfg.eval)).strip().replace(chr(10), '; ')}"
    )
    return 0


if __name__ == "__main__":
    from searchllm.interrupt import cli

    raise SystemExit(cli(main))
