"""The level database (EvoPress, Týr-the-Pruner, ZipLM): every block's attention and MLP pruned in advance
at every level, with compensated weights, so a candidate of the level search is assembled from stored
entries (no solve per candidate) and is exactly what the export will hold. Knows nothing of Ray.

Units: attention by whole query heads inside their KV group (q rows + o_proj columns; a KV head goes with
the last query head of its group); MLP by intermediate channels. Per module, a greedy OBS order (remove
the unit whose removal costs the least output error ||W X - W' X||^2 given the remaining columns' H^-1,
compensate the remaining columns, downdate H^-1; ZipLM) decides which units each level keeps (levels are
nested), and the kept o/down columns of every level are refit by reform.py's exact least squares with
damping toward the original weights. Levels are spaced by the same absolute number of parameters in every
layer: attention one query head per level (`heads=free`) or one per KV group (`heads=equal`, every layer
stays a standard GQA layer), MLP `mlp_levels` equal steps of channels; a level switch between two layers
therefore keeps the total exactly. With `weighting=fisher` the MLP's OBS costs weigh output directions by
the block's K-FAC output factor (ShardRunner.output_factors), so errors the rest of the model ignores are cheap.

Error accumulation (`inputs=accumulated`, Týr): each block's calibration inputs come from the upstream
blocks pruned at the levels the target implies (the uniform assignment), with their database weights;
inside a block, the MLP's statistics come after the attention pruned at its implied level.
`inputs=dense` uses the original model's activations everywhere. `refit` names what a level's refit
reproduces: the original module on the same inputs (module, the default), the dense model's module output
(dense) or its residual stream after the module (stream, also cancelling the upstream error; worse on
held-out text, docs/results.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Generator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from searchllm.config import LevelError, LevelParams
from searchllm.models.adapters import Geometry
from searchllm.models.sliced import LayerSlice
from searchllm.pruning.obs import gram, module_levels, obs_channel_order, obs_head_order
from searchllm.streams import imap_streams, in_streams

if TYPE_CHECKING:
    from searchllm.pruning.shard import ShardRunner


class LevelSpace:
    """Level counts and parameter costs of each module type (the same in every layer).

    Attention level a keeps a query heads (free) or a per KV group (equal); MLP level m keeps
    m * intermediate / mlp_levels channels. The top level is the original module, level 0 removes it."""

    def __init__(self, g: Geometry, p: LevelParams) -> None:
        p.check(g)
        self.geometry, self.params = g, p
        self.attn_top = g.num_heads if p.heads == "free" else g.group_size
        self.mlp_top = p.mlp_levels
        self.mlp_step = g.intermediate // p.mlp_levels
        self.norms = int(g.layer_count(0, 0, 0))

    @property
    def num_layers(self) -> int:
        return self.geometry.num_layers

    @property
    def top(self) -> np.ndarray:
        return np.array([self.attn_top, self.mlp_top])

    def full(self) -> np.ndarray:
        return np.tile(self.top, (self.num_layers, 1))

    def heads_kept(self, a: int) -> int:
        return a if self.params.heads == "free" else a * self.geometry.num_kv_heads

    def channels(self, m: int) -> int:
        return m * self.mlp_step

    def attn_params(self, q_heads: int, kv_heads: int) -> int:
        g = self.geometry
        return int(g.layer_count(kv_heads * g.head_dim, 0, q_heads * g.head_dim)) - self.norms

    def mlp_params(self, m: int) -> int:
        return int(self.geometry.layer_count(0, self.channels(m), 0)) - self.norms

    def nominal_attn_params(self, a: int) -> int:
        """Before the OBS order is known: KV heads kept as long as their groups can keep a query head."""
        q = self.heads_kept(a)
        return self.attn_params(q, min(q, self.geometry.num_kv_heads))

    def nominal_params(self, genome: np.ndarray) -> int:
        g = self.geometry
        return int(
            g.outer_params + sum(self.nominal_attn_params(a) + self.mlp_params(m) + self.norms for a, m in genome)
        )


@dataclass
class LayerLevels:
    """One layer's entries: removal orders, compensated weights and relative errors of every level."""

    layer: int
    head_order: list[int]  # query heads (global index kv * group + r) in the order OBS removes them
    mlp_order: list[int]  # MLP channels in removal order
    attn: dict[int, torch.Tensor] = field(default_factory=dict)  # level -> o_proj over its kept columns
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)  # level -> down_proj over its kept channels
    attn_error: list[float] = field(default_factory=list)  # per level: ||WX - W'X'||^2 / ||WX||^2
    mlp_error: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.attn, self.mlp) for t in d.values())

    def kept_heads(self, space: LevelSpace, a: int) -> list[int]:
        removed = set(self.head_order[: space.geometry.num_heads - space.heads_kept(a)])
        return [h for h in range(space.geometry.num_heads) if h not in removed]

    def kept_channels(self, space: LevelSpace, m: int) -> list[int]:
        removed = set(self.mlp_order[: space.geometry.intermediate - space.channels(m)])
        return [c for c in range(space.geometry.intermediate) if c not in removed]

    def slice(self, space: LevelSpace, a: int, m: int) -> LayerSlice:
        g = space.geometry
        heads = self.kept_heads(space, a)
        q_heads = tuple(
            tuple(h % g.group_size for h in heads if h // g.group_size == kv) for kv in range(g.num_kv_heads)
        )
        pairs = tuple(range(g.head_dim // 2))
        kv_pairs = tuple(pairs if q else () for q in q_heads)
        return LayerSlice(kv_pairs, tuple(self.kept_channels(space, m)), True, q_heads)

    def overrides(self, space: LevelSpace, a: int, m: int) -> dict[str, torch.Tensor]:
        """The compensated weights of these levels (none at the top level: the original weights)."""
        out = {}
        if a in self.attn:
            out["o"] = self.attn[a]
        if m in self.mlp:
            out["down"] = self.mlp[m]
        return out

    def params(self, space: LevelSpace, a: int, m: int) -> int:
        return self.slice(space, a, m).params(space.geometry)


# -- building a shard's layers -----------------------------------------------------------------------------


def iter_build(
    runner: "ShardRunner",
    space: LevelSpace,
    implied: np.ndarray,
    inp: torch.Tensor,
    batch: int = 1,
    done: Mapping[int, LayerLevels] | None = None,
    factors: Mapping[int, torch.Tensor] | None = None,
) -> Generator[LayerLevels | None, None, torch.Tensor]:
    """Build the entries of every layer of a shard, in order, yielding each layer's LayerLevels as soon as
    it is done (None for a layer in `done`, built before: it is only run, so the layers after it see the
    same inputs) and returning the hidden states leaving the shard (the stream of the next shard; with
    levels.refit other than module, the pruned and the dense stream stacked).

    `inp` is the calibration tokens on the first shard, else the stream entering the shard; `implied` the
    (L, 2) levels the stream is pruned at (inputs=accumulated); `factors` each layer's MLP output factor
    (ShardRunner.output_factors; unweighted OBS where absent)."""
    p, g, done, factors = space.params, runner.geometry, done or {}, factors or {}
    dtype = getattr(torch, p.dtype)
    accumulate = p.inputs == "accumulated"
    aim = p.refit if accumulate else "module"  # on dense inputs every target is the module's own output
    if runner.spec.first:
        h_all = runner.embed(inp)
        hd_all = h_all if aim != "module" else None
    else:
        x = inp.to(runner.device, runner.dtype)
        h_all, hd_all = (x, None) if aim == "module" else x.chunk(2)
    full = LayerSlice.full(g)

    def rows(a: torch.Tensor) -> torch.Tensor:
        return a.reshape(-1, a.shape[-1]).float()

    def cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return gram(rows(a)) if a is b else rows(a).T @ rows(b)

    for i in runner.spec.layers:
        t0 = time.perf_counter()
        block: Any = runner.block(i, full)  # a sliced decoder layer (its submodules are attributes)
        w = runner.blocks_w[i]
        a_imp, m_imp = (int(x) for x in implied[i])
        xs, dense = [], []
        entry = done.get(i)  # built before: only run (no statistics), so the next layers see the same inputs
        build = entry is None
        starts = range(0, h_all.shape[0], batch)

        def attention(s: int):
            """One batch through the attention: o's input, the attention's output, the dense stream's block
            (aim != module) and this batch's statistics (G; R, YY toward the dense targets)."""
            h, rec = h_all[s : s + batch], dict[str, torch.Tensor]()
            attn_out = block.self_attn(block.input_layernorm(h), *runner.rope(h), rec.__setitem__)
            x, d, stats = rec["o"], None, [cross(rec["o"], rec["o"])] if build else []
            if hd_all is not None:  # the dense block on the dense stream, the targets and the next dense stream
                hd = hd_all[s : s + batch]
                attn_d = block.self_attn(block.input_layernorm(hd), *runner.rope(hd))
                mid_d = block.attn_residual(hd, attn_d)
                mlp_d = block.mlp(block.post_attention_layernorm(mid_d))
                d = (block.mlp_residual(mid_d, mlp_d), mlp_d)
                y = attn_d if aim == "dense" else mid_d - h
                y = y - w["o_bias"] if w.get("o_bias") is not None else y  # the bias stays as it is
                stats += [cross(y, x), cross(y, y)] if build else []
            return (x, attn_out), d, stats

        with torch.no_grad():
            sums: list[torch.Tensor] = []  # G, R, YY summed in batch order: the same whatever the streams
            for x_out, d, stats in imap_streams(attention, starts, runner.streams):
                xs.append(x_out)
                if d is not None:
                    dense.append(d)
                sums = stats if not sums else [a.add_(b) for a, b in zip(sums, stats)]
            if build:
                G, target = _summed(sums)
                order = obs_head_order(w["o"], G, g, p.heads == "equal", p.obs_damp)
                entry = LayerLevels(i, order, [])
                kept = [
                    sum((list(range(h * g.head_dim, (h + 1) * g.head_dim)) for h in entry.kept_heads(space, a)), [])
                    for a in range(space.attn_top + 1)
                ]
                entry.attn, entry.attn_error = module_levels(w["o"], G, kept, p.damp, dtype, None, target)
                del G, target
            sums = []
            assert entry is not None
            built: LayerLevels = entry  # (the batches' functions below see it narrowed)
            # The MLP sees the attention at its implied level (its kept heads' outputs, compensated o).
            a_cols = _head_cols(built.kept_heads(space, a_imp), g)

            def mlp(b: int):
                """One batch into the MLP: its features (and full-width output where the implied level keeps the
                whole MLP), its input stream and statistics (Gd; R, YY toward the dense targets)."""
                x, attn_out = xs[b]
                h = h_all[b * batch : b * batch + x.shape[0]]
                if accumulate and a_imp != space.attn_top:
                    attn_out = _project(x, a_cols, built.attn.get(a_imp), w.get("o_bias"), h)
                mid = block.attn_residual(h, attn_out)
                f = block.mlp.features(block.post_attention_layernorm(mid))
                down = block.mlp.down_proj(f) if not accumulate or m_imp == space.mlp_top else None
                stats = [cross(f, f)] if build else []
                if build and aim != "module":
                    out_d, mlp_d = dense[b]
                    y = mlp_d if aim == "dense" else out_d - mid
                    y = y - w["down_bias"] if w.get("down_bias") is not None else y
                    stats += [cross(y, f), cross(y, y)]
                return (f, down), mid, stats

            feats, mids = [], []
            for feat, mid, stats in imap_streams(mlp, range(len(xs)), runner.streams):
                feats.append(feat)
                mids.append(mid)
                sums = stats if not sums else [a.add_(b) for a, b in zip(sums, stats)]
            xs.clear()
            if build:
                Gd, target = _summed(sums)
                entry.mlp_order = obs_channel_order(
                    w["down"], Gd, space.mlp_step, p.obs_group, p.obs_damp, factors.get(i)
                )
                kept = [entry.kept_channels(space, m) for m in range(space.mlp_top + 1)]
                entry.mlp, entry.mlp_error = module_levels(w["down"], Gd, kept, p.damp, dtype, factors.get(i), target)
                del Gd, target
            sums = []
            m_cols = entry.kept_channels(space, m_imp)

            def output(b: int) -> torch.Tensor:
                (f, mlp_out), mid = feats[b], mids[b]
                if accumulate and m_imp != space.mlp_top:
                    mlp_out = _project(f, m_cols, built.mlp.get(m_imp), w.get("down_bias"), mid)
                return block.mlp_residual(mid, mlp_out)

            h_all = torch.cat(in_streams(output, range(len(feats)), runner.streams))
            if aim != "module":
                hd_all = torch.cat([out_d for out_d, _ in dense])
            for held in (feats, mids, dense):
                held.clear()
        entry.seconds = time.perf_counter() - t0
        yield None if i in done else entry
    return h_all if hd_all is None else torch.cat([h_all, hd_all])


def build_local(
    runner: "ShardRunner",
    space: LevelSpace,
    implied: np.ndarray,
    inp: torch.Tensor,
    batch: int = 1,
    done: Mapping[int, LayerLevels] | None = None,
    factors: Mapping[int, torch.Tensor] | None = None,
) -> tuple[dict[int, LayerLevels], torch.Tensor]:
    """iter_build run to the end in this process (one shard, no actors): the entries it built, by layer,
    and the calibration stream leaving the shard (the next shard's input)."""
    gen, out = iter_build(runner, space, implied, inp, batch, done, factors), dict[int, LayerLevels]()
    while True:
        try:
            entry = next(gen)
        except StopIteration as stop:
            return out, stop.value
        if entry is not None:
            out[entry.layer] = entry


def _summed(sums: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """A module's statistics summed over the batches: (its input Gram, (R, YY) toward the dense targets or
    None where it reproduces its own output)."""
    return sums[0], (sums[1], sums[2]) if len(sums) == 3 else None


def _head_cols(heads: list[int], g: Geometry) -> list[int]:
    return [h * g.head_dim + d for h in heads for d in range(g.head_dim)]


def _project(
    x: torch.Tensor, cols: list[int], weight: torch.Tensor | None, bias: torch.Tensor | None, like: torch.Tensor
) -> torch.Tensor:
    """Output of a column-pruned o/down: kept input columns through the level's weights (zero if none kept)."""
    if not cols:
        return torch.zeros_like(like)
    assert weight is not None, "a level that keeps columns has weights"
    idx = torch.tensor(cols, dtype=torch.long, device=x.device)
    out = x.index_select(-1, idx) @ weight.to(x.device, x.dtype).T
    return out + bias if bias is not None else out


# -- the database on disk -------------------------------------------------------------------------------------


class LevelDatabase:
    """All layers' entries, and what a candidate (an (L, 2) array of attention and MLP levels) is made of."""

    def __init__(self, space: LevelSpace, layers: Mapping[int, LayerLevels]) -> None:
        self.space, self.layers = space, dict(layers)
        L = space.num_layers
        missing = [i for i in range(L) if i not in self.layers]
        if missing:
            raise LevelError(f"the level database lacks layers {missing[:5]}")
        # Exact parameter costs of every level of every layer (a KV head goes with its group's last query head).
        g = space.geometry
        self.attn_cost = np.zeros((L, space.attn_top + 1), dtype=np.int64)
        for i, e in self.layers.items():
            for a in range(space.attn_top + 1):
                heads = e.kept_heads(space, a)
                self.attn_cost[i, a] = space.attn_params(len(heads), len({h // g.group_size for h in heads}))
        self.mlp_cost = np.array([space.mlp_params(m) for m in range(space.mlp_top + 1)], dtype=np.int64)

    def params(self, genome: np.ndarray) -> int:
        g, s = self.space.geometry, self.space
        L = s.num_layers
        return int(
            g.outer_params
            + L * s.norms
            + self.attn_cost[np.arange(L), genome[:, 0]].sum()
            + self.mlp_cost[genome[:, 1]].sum()
        )

    def costs(self, layer: int, module: int) -> np.ndarray:
        return self.attn_cost[layer] if module == 0 else self.mlp_cost

    def slices(self, genome: np.ndarray) -> list[LayerSlice]:
        return [self.layers[i].slice(self.space, int(a), int(m)) for i, (a, m) in enumerate(genome)]

    def overrides(self, genome: np.ndarray, dtype: torch.dtype | None = None) -> dict[int, dict[str, torch.Tensor]]:
        out = {}
        for i, (a, m) in enumerate(genome):
            w = self.layers[i].overrides(self.space, int(a), int(m))
            if w:
                out[i] = {k: v.to(dtype) if dtype is not None else v for k, v in w.items()}
        return out

    def errors(self) -> tuple[np.ndarray, np.ndarray]:
        L = self.space.num_layers
        return (
            np.array([self.layers[i].attn_error for i in range(L)]),
            np.array([self.layers[i].mlp_error for i in range(L)]),
        )

    def nbytes(self) -> int:
        return sum(e.nbytes() for e in self.layers.values())


def predicted_bytes(space: LevelSpace, layers: int | None = None) -> int:
    """The database's size on disk, from the geometry and the level settings alone: every level below the top
    that keeps something stores its refit o_proj / down_proj (hidden x kept columns) in levels.dtype; each
    layer's file adds a header (the removal orders and errors as JSON). Of `layers` layers (default all)."""
    g = space.geometry
    size = torch.finfo(getattr(torch, space.params.dtype)).bits // 8
    cols = sum(space.heads_kept(a) * g.head_dim for a in range(1, space.attn_top))
    cols += sum(space.channels(m) for m in range(1, space.mlp_top))
    header = 6 * (g.num_heads + g.intermediate) + 64 * (space.attn_top + space.mlp_top) + 1024
    return (g.num_layers if layers is None else layers) * (g.hidden * cols * size + header)


def save_layer(folder: Path, entry: LayerLevels) -> None:
    """One layer's entries as safetensors (weights) with its orders and errors in the metadata; atomic."""
    from safetensors.torch import save_file

    from searchllm.files import writing

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"attn.{k}": v for k, v in entry.attn.items()} | {f"mlp.{k}": v for k, v in entry.mlp.items()}
    meta = {k: json.dumps(v) for k, v in asdict(entry).items() if k not in ("attn", "mlp")}
    with writing(
        folder / f"layer-{entry.layer:04d}.safetensors", folder / f".layer-{entry.layer:04d}.safetensors.tmp"
    ) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_layers(folder: Path) -> dict[int, LayerLevels]:
    """The saved layers (a damaged file is named, with how to rebuild just that layer)."""
    from safetensors import safe_open

    from searchllm.files import damaged

    out = {}
    for f in sorted(folder.glob("layer-*.safetensors")):
        try:
            with safe_open(str(f), "pt") as st:
                meta = {k: json.loads(v) for k, v in st.metadata().items()}
                entry = LayerLevels(**meta)
                for key in st.keys():
                    kind, level = key.split(".")
                    getattr(entry, kind)[int(level)] = st.get_tensor(key)
        except Exception as e:  # safetensors raises its own SafetensorError (and others) on a cut file
            raise damaged(f, e, f"delete it to build that layer again on resume (rm {f})") from None
        out[entry.layer] = entry
    return out


# -- starting points ------------------------------------------------------------------------------------------


def uniform_genome(space: LevelSpace, count_fn, lo: int, hi: int, attn_level: int) -> np.ndarray | None:
    """Every layer at `attn_level` and the same MLP level (the first k layers one MLP level higher) so the
    count lands in [lo, hi] as close to the middle as it can; None when no MLP level fits."""
    L, best = space.num_layers, None
    mid = (lo + hi) / 2
    for m in range(space.mlp_top + 1):
        for k in range(L if m < space.mlp_top else 1):
            genome = np.tile([attn_level, m], (L, 1))
            genome[:k, 1] += 1
            n = count_fn(genome)
            if lo <= n <= hi and (best is None or abs(n - mid) < best[0]):
                best = (abs(n - mid), genome)
    return None if best is None else best[1]


def implied_levels(space: LevelSpace, lo: int, hi: int, mlp_floor: float = 0.5) -> np.ndarray:
    """The uniform assignment the target implies before the database exists (its inputs for error
    accumulation; nominal counts): attention kept whole while the MLP alone can meet the target keeping
    `mlp_floor` of its channels, else the same kept share in attention and MLP. (On SmolLM2 at 0.8 a
    whole attention with a thinner MLP scored far better than pruned heads: the search's generation 0.)"""
    genome = uniform_genome(space, space.nominal_params, lo, hi, space.attn_top)
    if genome is not None and genome[:, 1].min() >= mlp_floor * space.mlp_top:
        return genome
    g = space.geometry
    share = ((lo + hi) / 2 - g.outer_params - g.num_layers * space.norms) / (
        g.num_layers * (g.layer_params - space.norms)
    )
    a = int(np.clip(round(share * space.attn_top), 0, space.attn_top))
    for attn in sorted(range(space.attn_top + 1), key=lambda x: abs(x - a)):
        genome = uniform_genome(space, space.nominal_params, lo, hi, attn)
        if genome is not None:
            return genome
    raise LevelError(
        f"no assignment of levels reaches {lo}..{hi} parameters; lower levels.mlp_levels steps or widen budget.tol"
    )


def error_allocation(db: LevelDatabase, lo: int, hi: int) -> np.ndarray:
    """Greedy allocation from the database's own errors: starting from the full model, repeatedly lower
    the module whose next level adds the least relative error per parameter saved, until the count
    is inside the band."""
    s = db.space
    genome = s.full()
    attn_err, mlp_err = db.errors()
    err = (attn_err, mlp_err)
    target = (lo + hi) / 2
    while db.params(genome) > target:
        best = None
        for i in range(s.num_layers):
            for mod in (0, 1):
                lvl = genome[i, mod]
                if lvl == 0:
                    continue
                cost = db.costs(i, mod)
                saved = cost[lvl] - cost[lvl - 1]
                added = err[mod][i, lvl - 1] - err[mod][i, lvl]
                score = added / max(saved, 1)
                if best is None or score < best[0]:
                    best = (score, i, mod)
        if best is None:
            break
        genome[best[1], best[2]] -= 1
    return genome


class GenomeCodec:
    """Level assignments -> what a stage actor applies: each layer as (attention level, MLP level), which
    its ShardRunner assembles from the database entries it holds."""

    def slices(self, genome: np.ndarray) -> list[tuple[int, int]]:
        return [(int(a), int(m)) for a, m in genome]
