"""Export formats: what `export.format` names (hf | gguf | both). Knows nothing of Ray.

A writer takes the built export (an in-memory model, export.build) and writes its files into the export
dir, then reloads what it wrote and checks it on the report windows; it returns its manifest record.
Adding a format is adding a writer here with `register`.

  hf    the Hugging Face checkpoint (export.save), reloaded with from_pretrained.
  gguf  llama.cpp files (gguf_export.write, f32), quantized by llama.cpp into each of export.gguf_types,
        every file reloaded in llama.cpp and scored there; an Ollama Modelfile beside the first type.
  vllm  the checkpoint vLLM serves (export.vllm), in <export>/vllm beside the HF checkpoint, reloaded in
        transformers and scored; `python -m searchllm.evaluate <export>/vllm --engine vllm` scores it in vLLM.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

log = logging.getLogger("searchllm")

FORMATS = {
    "hf": ("hf",),
    "gguf": ("gguf",),
    "both": ("hf", "gguf"),
    "vllm": ("hf", "vllm"),
    "all": ("hf", "gguf", "vllm"),
}


@dataclass
class ExportJob:
    model: torch.nn.Module  # the built export, in memory
    info: Any  # export.ExportInfo
    out: Path
    tokenizer: Any
    report: torch.Tensor  # the report windows every writer checks its reloaded files on
    batch: int = 1
    source_checkpoint: Optional[str] = None
    source_gguf: Optional[Path] = None  # the source GGUF, whose tokenizer a GGUF export copies
    gguf_types: list[str] = field(default_factory=lambda: ["f16"])
    ref_ppl: Optional[float] = None  # the in-memory model's report perplexity
    # budget.size: each weight's llama.cpp type (GGUF name -> type) and importance matrix, as scored
    tensor_types: Optional[dict[str, str]] = None
    imatrix: Optional[dict[str, Any]] = None


WRITERS: dict[str, Callable[[ExportJob], dict]] = {}


def register(name: str) -> Callable[[Callable[[ExportJob], dict]], Callable[[ExportJob], dict]]:
    def deco(fn):
        WRITERS[name] = fn
        return fn

    return deco


def check_format(fmt: str, gguf_types: list[str], model_type: Optional[str] = None) -> None:
    """export.format and export.gguf_types up front (one line naming the value), before any work."""
    from searchllm.export.gguf import GGUFError, check_types, family_of

    if fmt not in FORMATS:
        raise GGUFError(f"export.format={fmt!r} is not allowed; choose one of: {', '.join(FORMATS)}")
    if "vllm" in FORMATS[fmt] and model_type is not None:
        from searchllm.export.vllm import check_family

        check_family(model_type)
    if "gguf" not in FORMATS[fmt]:
        return
    check_types(list(gguf_types))
    if model_type is not None:
        family_of(type("Config", (), {"model_type": model_type})())
    from searchllm.evaluate.llamacpp import require

    require()


class ExportDirError(ValueError):
    pass


def check_export_dir(path: Path, overwrite: bool) -> None:
    """An existing export.dir is replaced only when it is a searchllm export (or export.overwrite=true):
    never a user's folder by accident."""
    if path.is_dir() and any(path.iterdir()) and not (path / "searchllm_export.json").is_file() and not overwrite:
        raise ExportDirError(
            f"export.dir={str(path)!r} exists and is not a searchllm export; choose another dir "
            "or set export.overwrite=true to replace it"
        )


def write_all(job: ExportJob, fmt: str) -> dict:
    """Every writer of the format, in order, into a temporary sibling of the export dir that replaces it
    only once every writer has written and checked its files (a killed driver or a full disk leaves no
    half-written export under the real name). One record: the HF writer's keys, plus `gguf`."""
    from searchllm.files import RunFileError, alive

    final, i = job.out, job.info
    for left in final.parent.glob(f".{final.name}.*-*"):  # what a killed driver's export left behind
        pid = left.name.rsplit("-", 1)[-1]
        if left.is_dir() and pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    job.out = tmp
    try:
        record: dict = {"formats": list(FORMATS[fmt]), "kind": i.kind, "params": i.params, "layers": i.layers}
        for name in FORMATS[fmt]:
            record |= WRITERS[name](job)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunFileError(
            f"cannot write the export {final}: {e.strerror or e}; nothing was replaced, resume to export again"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        job.out = final
    # the files now live under the final name
    record = json.loads(json.dumps(record).replace(json.dumps(str(tmp))[1:-1], json.dumps(str(final))[1:-1]))
    record["dir"] = str(final)
    if "ppl" not in record:  # gguf alone: the export's report perplexity is llama.cpp's, on the first file
        record["ppl"] = record["gguf"]["files"][0]["ppl"]
    return record


def _rel(ppl: float, ref: Optional[float]) -> Optional[float]:
    return None if ref is None else abs(ppl - ref) / ref


@register("hf")
def write_hf(job: ExportJob) -> dict:
    from searchllm.evaluate import perplexity
    from searchllm.export.hf import save
    from searchllm.models.loading import load_pretrained

    save(job.model, job.info, job.out, job.tokenizer, job.source_checkpoint)
    reloaded, _ = load_pretrained(str(job.out))
    ppl = perplexity(reloaded, job.report, job.batch).ppl
    rel = _rel(ppl, job.ref_ppl)
    log.info(
        "exported %s checkpoint to %s (%d params); reloaded from disk: report ppl %.3f (%.1e relative to in-memory)",
        job.info.kind,
        job.out,
        job.info.params,
        ppl,
        rel or 0.0,
    )
    return {
        "attention_padding": job.info.padding,
        "zero_biases": job.info.zero_biases,
        "reload_rel_diff": rel,
        "ppl": ppl,
    }


MIXED = "model-mixed"  # the stitched file of a byte budget (its name is in the bytes the budget counts)


def gguf_files(
    model, tokenizer, out: Path, source_gguf: Optional[Path], types: list[str], tensor_types=None, imatrix=None
):
    """`out`/model-<type>.gguf for every type: written in f32, quantized by llama.cpp (the f32 file is kept
    only when asked for); with `tensor_types` (a byte budget's choice) one file, model-mixed.gguf, each
    weight quantized by libggml to its own type. Returns (GGUFInfo of the f32 or mixed write, [(type, path)])."""
    from searchllm.evaluate import llamacpp
    from searchllm.export.gguf import FTYPES, write

    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)  # tokenizer.json: the GGUF's vocabulary when the source was no GGUF
    if tensor_types is not None:
        path = out / f"{MIXED}.gguf"
        tmp = path.with_name(f".{path.name}.tmp")
        info = write(model, out, tmp, source_gguf, types=tensor_types, imatrix=imatrix, name=MIXED)
        os.replace(tmp, path)
        info.path = str(path)
        return info, [("mixed", path)]
    f32 = out / ".model-f32.gguf.tmp"  # every file under a temp name until complete
    info = write(model, out, f32, source_gguf)
    paths = []
    for t in types:
        path = out / f"model-{t}.gguf"
        if t != "f32":
            tmp = path.with_name(f".{path.name}.tmp")
            llamacpp.quantize(f32, tmp, FTYPES[t])
            os.replace(tmp, path)
        paths.append((t, path))
    if "f32" in types:
        os.replace(f32, out / "model-f32.gguf")
    else:
        f32.unlink()
    info.path = str(out / "model-f32.gguf")
    return info, paths


@register("gguf")
def write_gguf(job: ExportJob) -> dict:
    from searchllm.evaluate import llamacpp
    from searchllm.export.gguf import modelfile
    from searchllm.export.hf import write_info

    info, paths = gguf_files(
        job.model, job.tokenizer, job.out, job.source_gguf, job.gguf_types, job.tensor_types, job.imatrix
    )
    write_info(job.info, job.out)
    files = []
    for t, path in paths:
        llm = llamacpp.load(path, job.report.shape[1])
        ppl = llamacpp.perplexity(llm, job.report).ppl
        del llm
        files.append({"type": t, "path": str(path), "bytes": path.stat().st_size, "ppl": ppl})
        log.info(
            "exported GGUF %s (%s, %.1f MiB): llama.cpp report ppl %.3f",
            path.name,
            info.arch,
            path.stat().st_size / 2**20,
            ppl,
        )
    chat = getattr(job.tokenizer, "chat_template", None)
    (job.out / "Modelfile").write_text(
        modelfile(Path(files[0]["path"]).name, chat, getattr(job.tokenizer, "eos_token", None))
    )
    return {
        "gguf": {
            "arch": info.arch,
            "layers": info.layers,
            "params": info.params,
            "padding_params": info.padding_params,
            "files": files,
            "modelfile": str(job.out / "Modelfile"),
        }
    }


def plain_base(checkpoint: Optional[str], layers: int):
    """The source family's own config at the source's sizes with `layers` layers (the per-layer vLLM
    form's global values)."""
    from transformers import AutoConfig

    from searchllm.export.vllm import VLLMError
    from searchllm.models.adapters import adapter_for

    try:
        if checkpoint is None:
            raise OSError("unknown")
        adapter = adapter_for(AutoConfig.from_pretrained(checkpoint))
    except OSError:
        raise VLLMError(
            f"the vLLM export needs the source model's config, which cannot be read from {checkpoint!r}; "
            "run the driver once more with the same model.* settings (it writes the source checkpoint again)"
        ) from None
    g = adapter.geometry()
    return adapter.plain_config(layers, g.num_kv_heads, g.intermediate, g.group_size)


@register("vllm")
def write_vllm(job: ExportJob) -> dict:
    from searchllm.evaluate import perplexity
    from searchllm.export import vllm
    from searchllm.models.loading import load_pretrained

    base, config = None, getattr(job.model, "config", None)
    if config is not None and config.model_type == "searchllm":
        base = plain_base(job.source_checkpoint, int(config.num_hidden_layers))
    model, info = vllm.build(job.model, base)
    out = vllm.save(model, info, job.out / vllm.SUBDIR, job.tokenizer, job.out)
    del model
    reloaded, _ = load_pretrained(str(out))
    ppl = perplexity(reloaded, job.report, job.batch).ppl
    rel = _rel(ppl, job.ref_ppl)
    log.info(
        "exported the vLLM checkpoint (%s, %s, %d params of which %d zeros) to %s; reloaded in transformers: "
        "report ppl %.3f (%.1e relative to in-memory)",
        info.kind,
        info.architecture,
        info.params,
        info.padding_params,
        out,
        ppl,
        rel or 0.0,
    )
    return {"vllm": asdict(info) | {"dir": str(out), "ppl": ppl, "reload_rel_diff": rel}}
