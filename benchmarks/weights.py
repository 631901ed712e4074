"""Weights once per node: on a simulated 2-node Ray cluster (two raylets, two object stores, one machine),
how long the driver's put takes, how long each evaluator actor takes to start with its shard mapped,
and on how many nodes each shard's object ends up.

    python benchmarks/weights.py [--replicas-per-node 2]

Runs on SmolLM2-135M (fp32, 538 MB). Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas-per-node", type=int, default=2)
    a = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster
    from ray.experimental import get_object_locations

    from searchllm.cluster.pool import EvaluatorPool
    from searchllm.config import ModelConfig, RayConfig
    from searchllm.data import data_root
    from searchllm.models.loading import load

    m = load(ModelConfig(), data_root("auto"))
    mib = sum(t.numel() * t.element_size() for t in m.model.state_dict().values()) / 2**20
    cpus = a.replicas_per_node
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": cpus, "include_dashboard": False, "object_store_memory": 2 * 2**30},
    )
    cluster.add_node(num_cpus=cpus, object_store_memory=2 * 2**30)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    head = ray.get_runtime_context().get_node_id()
    try:
        tokens = {"fitness": m.tokenizer("hello world", return_tensors="pt").input_ids}
        tokens |= {"calibration": tokens["fitness"], "report": tokens["fitness"]}
        with EvaluatorPool(
            m.model, m.adapter, RayConfig(replicas=2 * a.replicas_per_node, max_restarts=0), "float32", tokens
        ) as pool:
            actors = [x for chain in pool.placed for x in chain]
            where = get_object_locations(pool.shard_refs)
            copies = [len(v["node_ids"]) for v in where.values()]
            print(f"\nSmolLM2-135M ({mib:.0f} MiB fp32), 2 simulated nodes, {len(actors)} evaluator actors\n")
            print(
                f"driver put into the object store: {pool.put_seconds:.3f} s; copies of the weights across nodes: "
                f"{copies}\n"
            )
            print("| actor | node | start with weights mapped s |")
            print("|---|---|---|")
            for i, x in enumerate(sorted(actors, key=lambda x: x["node"] != head)):
                print(f"| {i} | {'driver node' if x['node'] == head else 'second node'} | {x['load_s']:.3f} |")
            # What the actors' start hides (their arguments arrive before __init__): the transfer itself. A
            # fresh copy of the weights fetched on the second node, then again by another task there.
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            from searchllm.models.weights import share

            other = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head)
            fresh = ray.put(share(m.model.state_dict()))
            fetch = ray.remote(num_cpus=0)(_fetch).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(other, soft=False)
            )
            first, again = ray.get(fetch.remote([fresh])), ray.get(fetch.remote([fresh]))
            print(
                f"\nfetch of the weights on the second node: first {first:.3f} s (copied from the driver's node), "
                f"again {again:.3f} s (already there); copies now: "
                f"{[len(v['node_ids']) for v in get_object_locations([fresh]).values()]}"
            )
    finally:
        ray.shutdown()
        cluster.shutdown()


def _fetch(refs) -> float:
    import time

    import ray

    t0 = time.perf_counter()
    ray.get(refs[0])
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
