"""`python -m searchllm.export RUN`: a finished run's export in more formats, without searching again."""

from __future__ import annotations

import json
from pathlib import Path

from searchllm.export.hf import ExportInfo


def main(argv: list[str] | None = None) -> int:
    """`python -m searchllm.export RUN [export.format=gguf] [export.gguf_types=[...]]`: write a finished run's
    export in more formats (no search again): the HF export in RUN/export is read back and each writer of
    export.format it lacks is run; the manifest's export record gains their records."""
    import logging
    import sys

    from searchllm.config import ConfigError, load_config
    from searchllm.data import DataError, data_root, token_sets
    from searchllm.evaluate.llamacpp import LlamaCppMissing
    from searchllm.export.formats import FORMATS, WRITERS, ExportJob, check_format
    from searchllm.export.gguf import GGUFError
    from searchllm.export.vllm import VLLMError
    from searchllm.models.loading import ModelError, load_pretrained, source_gguf
    from searchllm.rundir import RunDir, RunFileError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    args = sys.argv[1:] if argv is None else argv
    if not args or "=" in args[0]:
        print(
            "usage: python -m searchllm.export RUN_DIR [export.format=gguf] [export.gguf_types=[f16,q8_0,q4_k_m]]",
            file=sys.stderr,
        )
        return 2
    run = Path(args[0]).expanduser()
    try:
        if not (run / "config.yaml").is_file() or not (run / "manifest.json").is_file():
            raise ConfigError(
                f"{str(run)!r} is not a finished searchllm run dir (config.yaml and manifest.json); give one"
            )
        bad = [a for a in args[1:] if not a.startswith(("export.format=", "export.gguf_types=", "data.root="))]
        if bad:
            raise ConfigError(
                f"{bad[0]!r}: only export.format, export.gguf_types and data.root apply to a finished run"
            )
        cfg = load_config(args[1:], base_file=run / "config.yaml")
        rundir = RunDir(run)
        manifest = rundir.load_json("manifest.json")  # a damaged manifest: one line (RunFileError)
        out = rundir.export_dir(cfg.export.dir)  # not the manifest's path: a copied run's is the original's
        conf = json.loads((out / "config.json").read_text())
        check_format(cfg.export.format, cfg.export.gguf_types, conf.get("source_model_type") or conf["model_type"])
        model, tokenizer = load_pretrained(str(out))
        report = token_sets(cfg, tokenizer)[0]["report"]
        info = ExportInfo(
            **{k: v for k, v in json.loads((out / "searchllm_export.json").read_text()).items() if k != "padding"}
        )
        job = ExportJob(
            model,
            info,
            out,
            tokenizer,
            report,
            cfg.data.batch,
            manifest.get("source", {}).get("checkpoint"),
            source_gguf(cfg.model, data_root(cfg.data.root)),
            list(cfg.export.gguf_types),
            manifest.get("perplexity", {}).get("exported"),
        )
        record = manifest["export"]
        record["dir"] = str(out)
        before = {f["type"]: f for f in record.get("gguf", {}).get("files", [])}
        for name in FORMATS[cfg.export.format]:
            if name == "hf":
                continue  # the run's own export, already written and checked
            record |= WRITERS[name](job)
        if "gguf" in record:  # types written before stay listed unless rewritten now
            record["gguf"]["files"] = list((before | {f["type"]: f for f in record["gguf"]["files"]}).values())
        record["formats"] = sorted(set(record.get("formats", ["hf"])) | set(FORMATS[cfg.export.format]))
        rundir.save_json("manifest.json", manifest)
    except (ConfigError, DataError, ModelError, GGUFError, VLLMError, LlamaCppMissing, RunFileError) as e:
        print(f"searchllm: error: {e}", file=sys.stderr)
        return 2
    for f in record.get("gguf", {}).get("files", []):
        print(f"{f['path']}: {f['bytes'] / 2**20:.1f} MiB, llama.cpp report ppl {f['ppl']:.3f}")
    if "vllm" in record:
        v = record["vllm"]
        print(f"{v['dir']}: vLLM checkpoint ({v['kind']}), transformers report ppl {v['ppl']:.3f}")
    return 0


if __name__ == "__main__":
    from searchllm.interrupt import cli

    raise SystemExit(cli(main))
