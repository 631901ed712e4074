"""A contiguous shard of a model's decoder layers, runnable for any subnet. Knows nothing of Ray.

An evaluator replica is a chain of shards: the first embeds tokens, the last applies the final norm and
LM head and returns the negative log-likelihood. One shard holding every layer is the whole model.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from searchllm.models.adapters import Architecture
from searchllm.models.blocks import linear, norm
from searchllm.models.generate import KVCache, generators, sample_next
from searchllm.models.sliced import LayerSlice, build_block
from searchllm.models.weights import SharedState, unshare
from searchllm.pruning.joint import EMBED
from searchllm.pruning.prefix import PrefixCache
from searchllm.pruning.scores import GramAccumulator, LayerScores, compensation, layer_scores
from searchllm.streams import in_streams

if TYPE_CHECKING:
    from searchllm.pruning.levels import LayerLevels, LevelSpace


@dataclass
class ShardSpec:
    start: int
    stop: int
    first: bool
    last: bool

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)


def split_layers(num_layers: int, stages: int) -> list[ShardSpec]:
    if not 1 <= stages <= num_layers:
        raise ValueError(f"ray.stages={stages} must be between 1 and the model's {num_layers} layers")
    bounds = np.linspace(0, num_layers, stages + 1).round().astype(int)
    return [ShardSpec(int(a), int(b), i == 0, i == stages - 1) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def shard_state_names(arch: Architecture, spec: ShardSpec) -> list[str]:
    """The state-dict names a ShardRunner of `spec` reads."""
    names = [n for i in spec.layers for n in arch.block_keys[i].values()]
    outer = arch.outer_keys
    first, last = ("embed", "positions"), ("norm", "norm_bias", "lm_head")
    names += [outer[k] for k in (first if spec.first else ()) + (last if spec.last else ()) if k in outer]
    return list(dict.fromkeys(names))


@dataclass
class NLL:
    total: float  # summed negative log-likelihood (nats), or summed KL divergence from the dense model (kind kl)
    tokens: int
    seconds: float = 0.0
    error: Optional[str] = None  # why the evaluation failed (total is then inf)
    kind: str = "nll"

    @property
    def ppl(self) -> float:
        return float(np.exp(self.total / self.tokens))

    @property
    def value(self) -> float:
        """The fitness: perplexity, or mean KL per token (nats); inf when the evaluation failed."""
        if not np.isfinite(self.total):
            return float("inf")
        return self.ppl if self.kind == "nll" else self.total / self.tokens


def topk_targets(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense model's k most likely next tokens per position, from its log-probabilities: (log-probs, ids)."""
    top = torch.topk(logp, min(k, logp.shape[-1]), -1)
    return top.values, top.indices.to(torch.int32)


KL_ROWS = 64  # positions per float block of sparse_kl: 64 x vocab stays in cache (whole windows: 1.5x slower on CPU)


def sparse_kl(logits: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Summed KL(P_dense || Q) over positions, on the dense model's top-k tokens plus one bin for the
    rest of the vocabulary (the KL of the coarsened distributions: a lower bound of the full KL, equal to
    it when k is the vocabulary). `logits` may be in any dtype: each block of KL_ROWS positions is scored in
    float32, every position alone, so the sum is the same to the bit however the blocks fall."""
    logp, idx = target
    kl = torch.empty(logits.shape[0], device=logits.device)
    for s in range(0, logits.shape[0], KL_ROWS):
        rows = slice(s, s + KL_ROWS)
        logq_k = F.log_softmax(logits[rows].float(), -1).gather(-1, idx[rows].long())
        p = logp[rows].exp()
        p_rest = (1 - p.sum(-1)).clamp_min(0)
        q_rest = (1 - logq_k.exp().sum(-1)).clamp_min(1e-30)
        rest = torch.where(
            p_rest > 1e-12, p_rest * (p_rest.clamp_min(1e-30).log() - q_rest.log()), torch.zeros_like(p_rest)
        )
        kl[rows] = (p * (logp[rows] - logq_k)).sum(-1) + rest
    return kl.sum()


def drawn_tokens(logits: torch.Tensor, seed: int, window: int) -> torch.Tensor:
    """One next token per position drawn from the model's own distribution (the true Fisher's labels),
    seeded by window index: the same draws however the windows are batched or sharded. By inverse CDF, one
    uniform per position against a float64 running sum: torch.multinomial draws an exponential per vocabulary
    entry, about 4x the time (a fifth of the output factors' on CPU)."""
    gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + window)
    cdf = torch.softmax(logits.detach().float(), -1).cpu().cumsum(-1, dtype=torch.float64)
    u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, generator=gen) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max_(cdf.shape[-1] - 1)[:, 0].to(logits.device)


class QuantCache:
    """Quantized weights by (layer, levels, kind, type) in the runner's dtype, least recently used dropped
    past `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self.data: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.lock = threading.Lock()  # streams of one candidate share its weights (ShardRunner.streams)

    def get(self, key: tuple, make) -> torch.Tensor:
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                return self.data[key]
            t = make()
            self.data[key], self.bytes = t, self.bytes + t.numel() * t.element_size()
            while self.bytes > self.max_bytes and len(self.data) > 1:
                _, old = self.data.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
            return t


def bf16_native(device: torch.device) -> bool:
    """Whether the device computes bfloat16 natively (CUDA with bf16; a CPU with AVX-512 bf16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return (
        device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def resolve_score_dtype(name: str, model_dtype: torch.dtype, native: bool) -> torch.dtype:
    """levels.score_dtype: `model` is model_dtype; `auto` is bfloat16 where the device computes it natively
    (`native`: its matrix units make scoring 1.5-3x faster) and model_dtype elsewhere."""
    if name == "model":
        return model_dtype
    if name != "auto":
        return getattr(torch, name)
    return torch.bfloat16 if native and model_dtype == torch.float32 else model_dtype


def planned_weight_bytes(numel: int, model_dtype: torch.dtype, score_dtype: str) -> int:
    """Bytes of weights a stage actor holds, planned before its device is known: the model.dtype copy, and the
    scorer's second copy where levels.score_dtype may differ from it (`auto` counts the bfloat16 copy it makes
    wherever bfloat16 is native: a float32 model on a GPU holds 1.5x its float32 bytes)."""
    scored = resolve_score_dtype(score_dtype, model_dtype, native=True)
    return numel * (model_dtype.itemsize + (scored.itemsize if scored != model_dtype else 0))


class ShardRunner:
    def __init__(
        self,
        arch: Architecture,
        state: SharedState | Mapping[str, torch.Tensor],
        spec: ShardSpec,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.arch, self.spec, self.device, self.dtype = arch, spec, torch.device(device), dtype
        self.geometry = arch.geometry
        tensors = unshare(state) if any(isinstance(v, np.ndarray) for v in state.values()) else dict(state)

        def get(name: str) -> torch.Tensor:
            # On CPU at the stored dtype this is the shared tensor itself (no copy); never written.
            return tensors[name].to(device=self.device, dtype=dtype)

        self.blocks_w = {i: {k: get(n) for k, n in arch.block_keys[i].items()} for i in spec.layers}
        outer = arch.outer_keys
        # The weights at their stored precision: what the GGUF export quantizes (budget.size).
        self.source = {i: {k: tensors[n] for k, n in arch.block_keys[i].items()} for i in spec.layers}
        ends = (("embed", "embed", spec.first), ("head", "lm_head", spec.last))
        self.source_outer = {k: tensors[outer[n]] for k, n, on in ends if on}
        self.embed_w = get(outer["embed"]) if spec.first else None
        self.positions_w = get(outer["positions"]) if spec.first and "positions" in outer else None
        self.norm_w = get(outer["norm"]) if spec.last else None
        self.norm_b = get(outer["norm_bias"]) if spec.last and "norm_bias" in outer else None
        self.head_w = get(outer["lm_head"]) if spec.last else None
        self.rotary = arch.rope.to(self.device) if arch.rope is not None else None
        self.block_config = arch.block
        self.eps = self.block_config.rms_norm_eps
        self._cos_sin: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.scores: dict[int, LayerScores] = {}
        # Reformed o/down weights per layer, valid for the slice they were solved for.
        self.reformed: dict[int, tuple[LayerSlice, dict[str, torch.Tensor]]] = {}
        # Calibration means of o/down inputs per layer: when set, every other slice runs with FLAP's
        # bias compensation (a cheap stand-in for reformation during the search).
        self.means: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # The level database's entries of this shard's layers: a layer given as (attention level, MLP
        # level) instead of a LayerSlice is assembled from them (slice + compensated o/down).
        self.levels: dict[int, "LayerLevels"] = {}
        self.level_space: Optional["LevelSpace"] = None
        # Prefix states of level candidates (set with the database; None: every candidate runs every layer).
        self.prefix: Optional[PrefixCache] = None
        # The dense model's top-k next-token distributions per token set (last shard): KL fitness.
        self.targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._decode: dict[str, Any] = {}  # the batch being sampled (decode_begin)
        # Quantized-and-read-back weights of joint candidates (budget.size); sized by quant.cache_mb on use.
        self.quant = QuantCache(2**30)
        self.outer_type: Optional[int] = None  # the token embedding's type index of the candidate being run
        self.streams = 1  # window batches run at once (searchllm.streams; the scores do not depend on it)

    # -- building -------------------------------------------------------------------------------------
    def blocks(
        self, slices: Sequence[LayerSlice | tuple[int, int]] | Mapping[int, Any], layers: Sequence[int] | None = None
    ) -> nn.ModuleDict:
        """Physically sliced blocks of this shard's active layers (or of `layers`; slices indexed by global
        layer; a layer may be given by its levels in the level database instead)."""
        resolved = {i: self.resolve(i, slices[i]) for i in (self.spec.layers if layers is None else layers)}
        return nn.ModuleDict({str(i): self.block(i, s, w) for i, (s, w) in resolved.items() if s.active})

    def resolve(
        self, layer: int, x: LayerSlice | tuple[int, int]
    ) -> tuple[LayerSlice, Mapping[str, torch.Tensor] | None]:
        """A layer's slice and the tensors replacing its sliced ones."""
        if isinstance(x, LayerSlice):
            return x, self._overrides(layer, x)
        if len(x) > 2:
            return self._quantized(layer, tuple(int(v) for v in x))
        entry, (a, m) = self.levels[layer], (int(v) for v in x)
        w = entry.overrides(self.level_space, a, m)
        return entry.slice(self.level_space, a, m), {k: v.to(self.device, self.dtype) for k, v in w.items()}

    def block(self, layer: int, s: LayerSlice, overrides: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """One layer's sliced block; `overrides` replaces sliced tensors (reformed o/down) by standard key."""
        return build_block(
            self.block_config, self.blocks_w[layer], s, self.geometry, overrides, self.arch.windows[layer]
        )

    def _quantized(self, layer: int, x: tuple[int, ...]) -> tuple[LayerSlice, dict[str, torch.Tensor]]:
        """A joint candidate's layer: its levels' slice with every weight quantized to its type by libggml
        (with the layer's importance matrix) and read back, as llama.cpp will compute with it."""
        from searchllm.pruning.joint import KINDS, weight_of
        from searchllm.quant.ggml import roundtrip

        space, entry = self.level_space, self.levels[layer]
        assert space is not None and hasattr(space, "types"), "a joint candidate needs set_levels with the types"
        self.quant.max_bytes = space.cache_bytes
        a, m = x[0], x[1]
        s, refit = entry.slice(space, a, m), entry.overrides(space, a, m)
        out = {}
        for j, kind in enumerate(KINDS):
            key = (layer, a, m, kind, space.types[x[2 + j]])

            def make(kind=kind, key=key):
                w, kept = weight_of(self.source[layer], refit, s, self.geometry, kind)
                if w.size == 0:
                    return torch.from_numpy(w).to(self.dtype)
                imat = space.input_imatrix(layer, kind, kept)
                return torch.from_numpy(roundtrip(w, key[-1], imat, f"blk.{layer}.{kind}")).to(self.dtype)

            out[kind] = self.quant.get(key, make).to(self.device)
        return s, out

    def outer_weight(self, which: str) -> torch.Tensor:
        """The embedding ("embed") or LM head ("head") of the candidate being run: the original, or the
        token embedding quantized to the candidate's type (tied or not, both take it)."""
        plain = self.embed_w if which == "embed" else self.head_w
        if self.outer_type is None:
            return plain
        from searchllm.quant.ggml import roundtrip

        space = self.level_space
        assert space is not None and hasattr(space, "types")
        t, src = space.types[self.outer_type], self.source_outer[which]
        ends = list(self.source_outer.values())
        tied = len(ends) == 2 and ends[0].data_ptr() == ends[1].data_ptr()
        # The LM head's input statistics weigh the head (and the tied embedding, which is the head too).
        imat = space.imatrix.get("output") if which == "head" or tied else None

        def make():
            return torch.from_numpy(roundtrip(src.float().numpy(), t, imat, "token_embd")).to(self.dtype)

        return self.quant.get((src.data_ptr(), t), make).to(self.device)

    def _overrides(self, layer: int, s: LayerSlice) -> dict[str, torch.Tensor] | None:
        got = self.reformed.get(layer)
        if got is not None and got[0] == s:
            return got[1]
        if layer in self.means:
            return compensation(self.blocks_w[layer], s, self.geometry, *self.means[layer])
        return None

    def cos_sin(self, seqlen: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.rotary is None:
            return None, None
        if seqlen not in self._cos_sin:
            pos = torch.arange(seqlen, device=self.device)[None]
            probe = torch.empty(1, device=self.device, dtype=self.dtype)
            self._cos_sin[seqlen] = self.rotary(probe, pos)
        return self._cos_sin[seqlen]

    def rope(self, h: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The rotary cos/sin for a batch of hidden states `h` (None, None without rotary positions)."""
        cos, sin = self.cos_sin(h.shape[1])
        if cos is None:
            return None, None
        return cos.expand(h.shape[0], -1, -1), sin.expand(h.shape[0], -1, -1)

    # -- running --------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token embeddings of positions start.. (windows are whole sequences: start 0)."""
        h = F.embedding(tokens.to(self.device), self.outer_weight("embed"))
        if self.block_config.embed_scale != 1.0:
            h = h * torch.tensor(self.block_config.embed_scale, dtype=h.dtype)
        if self.positions_w is not None:
            pos = torch.arange(start, start + tokens.shape[-1], device=self.device) + self.block_config.position_offset
            h = h + F.embedding(pos, self.positions_w)
        return h

    @torch.no_grad()
    def run_block(self, block: nn.Module, h: torch.Tensor, record=None) -> torch.Tensor:
        """One block on one batch of hidden states; `record(key, x)` sees its module inputs."""
        return block(h, *self.rope(h), record)

    @torch.no_grad()
    def run_blocks(
        self, blocks: Mapping[str, nn.Module], hidden: torch.Tensor, batch: int = 1, record=None, out=None
    ) -> torch.Tensor:
        """Blocks keyed by their layer index, in order, over all windows `batch` at a time;
        `record(layer, key, x)` sees every block's module inputs, `out(layer, h)` every block's output, both
        batch after batch (without `record`, `streams` batches run at once and `out` sees them in order)."""
        hidden = hidden.to(self.device, self.dtype)

        def chain(s: int) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
            h, seen = hidden[s : s + batch], []
            for name, block in blocks.items():
                rec = None if record is None else (lambda key, x, _i=int(name): record(_i, key, x))
                h = self.run_block(block, h, rec)
                if out is not None:
                    seen.append((int(name), h))
            return h, seen

        done = in_streams(chain, range(0, hidden.shape[0], batch), self.streams if record is None else 1)
        for _, seen in done:
            for layer, h in seen:
                out(layer, h)
        return torch.cat([h for h, _ in done])

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return norm(h.to(self.device), self.norm_w, self.norm_b, self.eps, self.block_config.norm_offset)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head's output in the runner's dtype."""
        return linear(self.final_norm(h), self.outer_weight("head"))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h).float()

    def per_window(self, fn, count: int) -> float:
        """sum(fn(j) for j < count), the windows in `streams` at once, added in window order."""
        return sum(in_streams(fn, range(count), self.streams))

    def nll(self, hidden: torch.Tensor, tokens: torch.Tensor) -> NLL:
        tokens = tokens.to(self.device)

        def window(j: int) -> float:  # one window at a time: logits are vocab-wide
            return float(F.cross_entropy(self.logits(hidden[j])[:-1], tokens[j, 1:], reduction="sum"))

        return NLL(self.per_window(window, len(tokens)), sum(t.numel() - 1 for t in tokens))

    def kl(self, hidden: torch.Tensor, which: str) -> NLL:
        """Summed sparse KL from the dense model's cached targets of token set `which` (per position)."""
        logp, idx = self.targets[which]
        total = self.per_window(lambda j: float(sparse_kl(self.head(hidden[j])[:-1], (logp[j], idx[j]))), len(hidden))
        return NLL(total, sum(h.shape[0] - 1 for h in hidden), kind="kl")

    def set_targets(self, hidden: torch.Tensor, tokens: torch.Tensor, which: str, k: int) -> NLL:
        """Cache the top-k next-token distributions of these (dense) hidden states as token set `which`'s
        KL targets; returns their NLL on `tokens` (from the same logits: the LM head runs once)."""
        tokens = tokens.to(self.device)
        tops: list = [None] * len(tokens)

        def window(j: int) -> float:
            logp = F.log_softmax(self.logits(hidden[j])[:-1], -1)
            tops[j] = topk_targets(logp, k)
            return -float(logp.gather(-1, tokens[j, 1:, None]).sum())

        total = self.per_window(window, len(tokens))
        self.targets[which] = (torch.stack([p[0] for p in tops]), torch.stack([p[1] for p in tops]))
        return NLL(total, sum(t.numel() - 1 for t in tokens))

    def forward(
        self,
        slices: Sequence[LayerSlice | tuple[int, int]],
        inp: torch.Tensor,
        tokens: torch.Tensor | None = None,
        batch: int = 1,
        metric: str = "nll",
        which: str = "",
    ) -> torch.Tensor | NLL:
        """Embed (first shard) or take hidden states, run this shard's blocks, and score (last shard):
        `metric` nll (perplexity), kl (against token set `which`'s cached targets), or targets:k (cache
        the top-k distributions of this subnet, the dense model, as `which`'s targets; returns its nll
        and the targets)."""
        t0 = time.perf_counter()
        first = slices[self.spec.layers[0]]
        self.outer_type = int(first[EMBED]) if isinstance(first, tuple) and len(first) > EMBED else None
        with torch.no_grad():
            layers = self.spec.layers
            cache = (
                self.prefix
                if self.prefix is not None and which and all(isinstance(slices[i], tuple) for i in range(layers.stop))
                else None
            )
            done, hidden = cache.longest(which, slices, layers) if cache is not None else (0, None)
            if hidden is None:
                hidden = self.embed(inp) if self.spec.first else inp
            blocks = self.blocks(slices, layers[done:])
            record = None
            if cache is not None:  # every block's output but the model's last (nothing extends a whole candidate)
                parts: dict[int, list[torch.Tensor]] = {
                    int(i): [] for i in blocks if not (self.spec.last and int(i) == layers[-1])
                }
                record = lambda i, h: parts[i].append(h) if i in parts else None  # noqa: E731
            hidden = self.run_blocks(blocks, hidden, batch, out=record)
            if cache is not None:
                for i, hs in parts.items():
                    cache.put(which, slices, i, torch.cat(hs))
            if self.spec.last:
                tokens = tokens if tokens is not None else inp
                if metric.startswith("targets:"):
                    out = self.set_targets(hidden, tokens, which, int(metric.split(":")[1]))
                else:
                    out = self.kl(hidden, which) if metric == "kl" else self.nll(hidden, tokens)
                out.seconds = time.perf_counter() - t0
                return (out, self.targets[which]) if metric.startswith("targets:") else out
        return hidden

    # -- calibration (dense model) ---------------------------------------------------------------------
    def output_factors(
        self,
        inp: torch.Tensor,
        grad_out: torch.Tensor | None = None,
        batch: int = 1,
        seed: int = 0,
    ) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """K-FAC output factors of the dense shard's MLPs (LLM-Surgeon): per layer, sum over tokens of g g^T
        for the loss gradient g where the MLP adds into the residual stream (float64, hidden x hidden). The
        loss is the NLL of next tokens drawn from the dense model's own distribution (seeded per window), so
        the factors belong to the true Fisher: the curvature of the KL from the dense model, the level
        search's fitness. The last shard starts the backward pass; the others take `grad_out`, the gradient
        of their output. Returns the gradient of the input (None on the first shard: tokens) and the factors."""
        g, full = self.geometry, LayerSlice.full(self.geometry)
        blocks = self.blocks({i: full for i in self.spec.layers})
        factors = {
            i: torch.zeros(g.hidden, g.hidden, dtype=torch.float64, device=self.device) for i in self.spec.layers
        }

        def accumulate(acc: torch.Tensor):
            def hook(_module, _inputs, out: torch.Tensor) -> None:
                def on_grad(grad: torch.Tensor) -> None:
                    gf = grad.reshape(-1, grad.shape[-1]).double()
                    acc.add_(gf.T @ gf)

                out.register_hook(on_grad)

            return hook

        handles = [b.mlp.register_forward_hook(accumulate(factors[int(i)])) for i, b in blocks.items()]
        grads = []
        try:
            for s in range(0, inp.shape[0], batch):
                x = inp[s : s + batch]
                # a leaf needing its gradient on every shard: the blocks' weights need none
                h = (self.embed(x) if self.spec.first else x.to(self.device, self.dtype)).requires_grad_(True)
                cos, sin = self.rope(h)
                with torch.enable_grad():
                    out = h
                    for block in blocks.values():
                        out = block(out, cos, sin)
                    if self.spec.last:
                        loss = 0.0
                        for k, o in enumerate(out):
                            logits = self.logits(o)[:-1]
                            loss = loss + F.cross_entropy(logits, drawn_tokens(logits, seed, s + k), reduction="sum")
                        loss.backward()
                    else:
                        out.backward(grad_out[s : s + batch].to(self.device, out.dtype))
                if not self.spec.first:
                    grads.append(h.grad.detach())
        finally:
            for handle in handles:
                handle.remove()
        return (torch.cat(grads) if grads else None), {i: f.cpu() for i, f in factors.items()}

    # -- sampling (the generate stage) ----------------------------------------------------------------------
    def decode_begin(self, rows: int, max_len: int, seed: int, indices: list[int]) -> None:
        """A new batch of sequences to sample (the dense model): an empty KV cache for this shard's layers,
        and on the last shard one generator per sequence, seeded by its index."""
        full = LayerSlice.full(self.geometry)
        self._decode = {
            "blocks": self.blocks({i: full for i in self.spec.layers}),
            "cache": KVCache(max_len),
            "gens": generators(seed, indices) if self.spec.last else None,
            "max_len": max_len,
        }

    @torch.no_grad()
    def decode_step(self, inp: torch.Tensor, start: int, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
        """The next positions of the batch begun by decode_begin: `inp` holds token ids (first shard) or the
        hidden states of positions start.. (others); returns the hidden states, or on the last shard the
        next token of every sequence sampled from the last position."""
        state = self._decode
        h = self.embed(inp, start) if self.spec.first else inp.to(self.device, self.dtype)
        cos, sin = self.cos_sin(state["max_len"])
        t = h.shape[1]
        if cos is not None:
            cos = cos[:, start : start + t].expand(h.shape[0], -1, -1)
            sin = sin[:, start : start + t].expand(h.shape[0], -1, -1)
        for name, block in state["blocks"].items():
            h = block(h, cos, sin, None, None, state["cache"], int(name))
        if not self.spec.last:
            return h
        return sample_next(self.logits(h[:, -1]), temperature, top_p, state["gens"])

    def decode_rest(self, inp: torch.Tensor, start: int, stop: int, temperature: float, top_p: float) -> torch.Tensor:
        """decode_step on a whole model until the sequences are `stop` long: the tokens of positions
        start + len(inp) .. stop - 1, the same draws as step by step (no hop between calls per token)."""
        pos, out = start + inp.shape[1], [self.decode_step(inp, start, temperature, top_p)]
        while pos + 1 < stop:
            out.append(self.decode_step(out[-1][:, None], pos, temperature, top_p))
            pos += 1
        return torch.stack(out, 1)

    def calibrate(self, inp: torch.Tensor, batch: int = 1, damp: float = 0.01) -> torch.Tensor:
        """Run the dense shard layer by layer over all calibration windows, scoring each layer's channels
        from its input Gram matrices (only one layer's Grams alive at a time); returns the output hidden."""
        full = LayerSlice.full(self.geometry)
        with torch.no_grad():
            hidden = self.embed(inp) if self.spec.first else inp.to(self.device, self.dtype)
            for i in self.spec.layers:
                grams = GramAccumulator()
                block = self.block(i, full)
                before, hidden = hidden, self.run_blocks({str(i): block}, hidden, batch, record=grams.add)
                self.scores[i] = layer_scores(self.blocks_w[i], grams, i, self.geometry, damp)
                cos = F.cosine_similarity(before.float(), hidden.float(), dim=-1)
                self.scores[i].influence = (1 - cos.mean()).reshape(1).cpu()
        return hidden
