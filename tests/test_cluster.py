"""Running on a real cluster: shipped cluster configs, layout and placement, `ray job submit`, two nodes."""

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from searchllm.cluster.layout import ClusterError, NodeInfo, choose_layout
from searchllm.config import RayConfig, load_config
from searchllm.pruning.shard import planned_weight_bytes

from conftest import start_local_ray, tiny_run_args
from helpers import evaluator_pool

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def driver_overrides(command: str) -> list[str]:
    """The arguments after `python -m searchllm.driver` in a shell command line."""
    words = shlex.split(command.replace("\\\n", " "))
    at = words.index("searchllm.driver")
    assert words[at - 2 : at] == ["python", "-m"], command
    return words[at + 1 :]


def test_the_cluster_launcher_config_is_valid_for_ray_up_and_installs_searchllm():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(dict(cfg)))  # what `ray up` checks
    workers = [t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]]
    assert any(
        t["node_config"]["InstanceType"].startswith(("g", "p")) and t["max_workers"] >= 1 for t in workers
    )  # GPU instances
    setup = " && ".join(cfg["setup_commands"])
    assert setup.index("torch==") < setup.index("/home/ray/searchllm")  # torch pinned first, then this checkout
    assert cfg["file_mounts"]["/home/ray/searchllm"] == "."
    assert "--metrics-export-port=8080" in " ".join(cfg["head_start_ray_commands"])


def test_the_rayjob_manifest_runs_the_driver_with_real_config_keys_on_gpu_workers():
    job = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    cfg = load_config(driver_overrides(spec["entrypoint"]))  # raises on an unknown key or a bad value
    assert cfg.resume == "auto" and cfg.run_dir.startswith("/data/") and cfg.ray.replicas == "auto"
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["pip"][0].startswith("torch==") and any("searchllm" in p for p in env["pip"])
    import ray

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    for group in cluster["workerGroupSpecs"]:
        [container] = group["template"]["spec"]["containers"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]  # the run dir survives a retry


def readme_driver_commands() -> list[str]:
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")  # join continued lines
    spans = re.findall(r"```bash\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text)
    return [line for span in spans for line in span.splitlines() if "python -m searchllm.driver" in line]


def test_every_driver_command_in_the_readme_uses_real_config_keys():
    commands = readme_driver_commands()
    assert len(commands) >= 5
    for command in commands:
        argv = driver_overrides(command.split(" && ")[-1])
        if any(a.startswith("resume=runs/") for a in argv):  # continues a run: only execution keys
            from searchllm.config import check_resume_overrides

            check_resume_overrides(argv)
            continue
        load_config(argv)


# -- layout --------------------------------------------------------------------------------------------


def nodes(n, cpus=16, gpus=4, memory=256 * GiB):
    return [NodeInfo(f"node{i}", cpus, gpus, memory) for i in range(n)]


def test_auto_gives_every_gpu_a_replica_when_the_model_fits_one_gpu():
    lay = choose_layout(RayConfig(replicas="auto", stages="auto"), nodes(2), 13 * GiB, 32, gpu_memory=24 * GiB)
    assert (lay.replicas, lay.stages, lay.num_gpus) == (8, 1, 1.0)
    assert sorted(lay.nodes) == ["node0"] * 4 + ["node1"] * 4  # spread: 4 replicas per node
    assert "stages=auto -> 1" in lay.why and "replicas=auto -> 8" in lay.why


def test_auto_shards_a_model_too_big_for_one_gpu_and_keeps_each_replica_on_one_node():
    lay = choose_layout(RayConfig(replicas="auto", stages="auto"), nodes(2), 130 * GiB, 80, gpu_memory=80 * GiB)
    assert (lay.replicas, lay.stages) == (2, 3)  # 169 GiB with room: 3 GPUs per replica, 8 GPUs -> 2 replicas
    assert lay.nodes == ["node0", "node1"]


def test_a_float32_model_scored_in_bfloat16_plans_gpus_for_both_copies_of_its_weights():
    numel = 8_000_000_000  # Llama-3-8B's size: 30 GiB in float32, 45 GiB with the bfloat16 scoring copy
    alone, both = (planned_weight_bytes(numel, torch.float32, s) for s in ("model", "auto"))
    assert (alone, both) == (4 * numel, 6 * numel)
    assert planned_weight_bytes(numel, torch.bfloat16, "auto") == 2 * numel  # already bfloat16: one copy
    assert planned_weight_bytes(numel, torch.float32, "float16") == 6 * numel
    lay = {
        b: choose_layout(RayConfig(replicas="auto", stages="auto"), nodes(1), b, 32, gpu_memory=48 * GiB)
        for b in (alone, both)
    }
    assert (lay[alone].stages, lay[both].stages) == (1, 2)


def test_auto_refuses_a_model_that_needs_more_gpus_than_the_cluster_has():
    with pytest.raises(ClusterError, match="one replica needs 3 GPUs"):
        choose_layout(RayConfig(replicas="auto", stages="auto"), nodes(1, gpus=2), 130 * GiB, 80, gpu_memory=80 * GiB)


def test_auto_on_cpus_puts_one_replica_on_each_node_with_all_its_cores():
    lay = choose_layout(RayConfig(replicas="auto", stages="auto"), nodes(3, cpus=8, gpus=0), GiB, 30)
    assert (lay.replicas, lay.stages, lay.num_cpus, lay.threads, lay.num_gpus) == (3, 1, 8, 8, 0)
    assert sorted(lay.nodes) == ["node0", "node1", "node2"]


def test_ray_threads_overrides_the_threads_of_the_cpus_each_actor_reserves():
    lay = choose_layout(RayConfig(replicas=2, threads=2), nodes(1, cpus=2, gpus=0), GiB, 30)
    assert (lay.num_cpus, lay.threads) == (1, 2)
    assert choose_layout(RayConfig(replicas=2), nodes(1, cpus=2, gpus=0), GiB, 30).threads == 1


def test_a_replica_no_node_can_hold_is_left_to_rays_pack():
    lay = choose_layout(RayConfig(replicas=1, stages=4), nodes(2, cpus=2, gpus=0), GiB, 8)
    assert lay.num_cpus == 1 and lay.nodes == [None]


# -- a real cluster ------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
def test_the_driver_runs_under_ray_job_submit_on_a_local_head(tiny_checkpoint, tmp_path):
    gcs, dash, agent, agent_grpc, runtime_env = (free_port() for _ in range(5))
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    ray_cli = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [
            ray_cli,
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dash}",
            "--num-cpus=2",
            "--include-dashboard=true",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
            # free ports for the agents too: their defaults (52365...) are taken while another Ray runs here
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2).read()
                break
            except OSError:
                assert time.time() < deadline and head.poll() is None, "ray start --head did not come up"
                time.sleep(0.5)
        run = tmp_path / "run"
        job = subprocess.run(
            [
                ray_cli,
                "job",
                "submit",
                "--address",
                f"http://127.0.0.1:{dash}",
                "--",
                sys.executable,
                "-m",
                "searchllm.driver",
                *tiny_run_args(*tiny_checkpoint, run, "search.generations=1", "eval.enabled=false"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-2000:]
        assert "attached to Ray at" in job.stdout and "best subnet: kept ratio" in job.stdout
        assert "succeeded" in job.stdout + job.stderr
        assert json.loads((run / "manifest.json").read_text())["export"]["params"] > 0
        # The dashboard lists the job's actors under their replica and layers.
        actors = json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/v0/actors?limit=100", timeout=10).read()
        )
        names = {a["name"] for a in actors["data"]["result"]["result"]}
        assert any(re.fullmatch(r"searchllm-\w{6}-replica0-layers0-3", n) for n in names), names
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # the whole group may be gone already
            os.killpg(head.pid, signal.SIGKILL)  # what SIGTERM left (gcs_server ignores it under --block)
        head.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def two_nodes(ray_cluster):
    """A simulated 2-node cluster (two raylets, two object stores) in place of the session's Ray."""
    from ray.cluster_utils import Cluster

    ray_cluster.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    try:
        ray_cluster.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray_cluster.shutdown()
        cluster.shutdown()
        start_local_ray()


@pytest.mark.ray
def test_on_two_nodes_each_replica_packs_on_one_node_and_weights_reach_each_node_once(
    two_nodes, llama, adapter, tokens
):
    import ray
    from ray.experimental import get_object_locations

    from searchllm.pruning.space import SearchSpace

    with evaluator_pool(llama, adapter, tokens, replicas=2, stages=2, max_restarts=3) as pool:
        where = [{a["node"] for a in chain} for chain in pool.placed]
        assert [len(w) for w in where] == [1, 1] and where[0] != where[1]  # packed per replica, spread across nodes
        # Four actors per shard... two copies: Ray moved each shard to the second node once.
        locations = get_object_locations(pool.shard_refs)
        assert [len(loc["node_ids"]) for loc in locations.values()] == [2, 2]
        space = SearchSpace(adapter.geometry())
        cand = space.full()
        cand.mlp[:, ::2] = False
        got = {r: n.ppl for _, n, r in pool.stream(space, [cand] * 4)}
    assert set(got) == {0, 1} and got[0] == got[1]
    assert len(ray.nodes()) == 2
