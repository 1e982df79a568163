"""The cluster definitions: the RayJob that runs `genpi run --config cluster/paper-run.yaml` asks only for what its
cluster has, and every stage command it makes parses with that stage's own parser."""

import shlex

import yaml
from conftest import REPO

from genpi.catalog import load_catalog
from genpi.eval.run import build_parser as eval_parser
from genpi.run import build_parser, stage_commands
from genpi.runconfig import PRESETS, read_config
from genpi.synth.run import engine_config, parse_args
from genpi.train.run import build_parser as train_parser

CLUSTER = REPO / "cluster"


def mounts(pod_spec: dict) -> dict[str, str]:
    """{mount path: volume name} of the pod's first container."""
    return {m["mountPath"]: m["name"] for m in pod_spec["containers"][0].get("volumeMounts", [])}


def test_the_run_job_fits_its_cluster_and_every_stage_parses():
    job = yaml.safe_load((CLUSTER / "rayjob-run.yaml").read_text())
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    [workers] = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    node = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    node_gpus, node_cpus = int(node["nvidia.com/gpu"]), int(node["cpu"])
    assert workers["maxReplicas"] == 1  # so every figure below is one node's

    entry = shlex.split(job["spec"]["entrypoint"])
    assert entry[:4] == ["python", "-m", "genpi.cli", "run"]
    args = build_parser().parse_args(entry[4:])
    assert args.config == "cluster/paper-run.yaml" and (REPO / args.catalog).is_file()
    config = read_config(REPO / args.config)
    paper = PRESETS["paper"]  # the cluster's file is the paper preset with the engines and trials placed
    assert [getattr(config, k) for k in ("samples", "heldout", "max_new_tokens", "methods", "lambdas", "epochs")] == [
        getattr(paper, k) for k in ("samples", "heldout", "max_new_tokens", "methods", "lambdas", "epochs")
    ]
    stages = dict(stage_commands(args, config, [e.id for e in load_catalog(REPO / args.catalog)]))
    efficiency = [
        f"eval efficiency {e.id}" for e in load_catalog(REPO / args.catalog)
    ]  # the paper preset: every prompt
    assert list(stages) == ["synth", "stats", "train genpi", "eval fidelity", *efficiency, "report"]

    # the run folder is on the shared volume, seen by the driver (head) and by the trials and eval task (workers)
    assert args.out.startswith("/data/") and mounts(head)["/data"] == mounts(workers["template"]["spec"])["/data"]
    assert (
        args.base.startswith("/models/")
        and args.generator.startswith("/models/")
        and "/models" in mounts(workers["template"]["spec"])
    )

    synth = parse_args(stages["synth"])
    generator, target = engine_config(synth, "generator"), engine_config(synth, "target")
    assert generator.model == args.generator and target.model == args.base and generator.kind == target.kind == "vllm"
    assert generator.num_gpus == generator.tensor_parallel_size == 4 and target.num_gpus == 1
    assert generator.num_gpus + synth.target_replicas * target.num_gpus <= node_gpus  # all engines at once, one node
    assert generator.num_cpus + synth.target_replicas * target.num_cpus <= node_cpus

    train = train_parser().parse_args(stages["train genpi"])
    assert train.gpus_per_trial == 1 and train.cpus_per_trial <= node_cpus and train.out.startswith("/data/")
    assert (train.epochs, train.lr, train.batch_size, train.lambdas) == (10, 1e-4, 32, "0.3,0.5,0.7")  # the paper's

    fidelity = eval_parser().parse_args(stages["eval fidelity"])
    assert fidelity.what == "fidelity" and fidelity.out.startswith("/data/") and fidelity.base == args.base
    for name in efficiency:
        cost = eval_parser().parse_args(stages[name])
        assert (
            cost.what == "efficiency"
            and cost.out == fidelity.out
            and cost.base == args.base
            and cost.data.startswith("/data/")
        )
        assert (
            cost.adapters == f"{args.out}/adapters/genpi"
            and name.endswith(cost.prompt)
            and (cost.turns, cost.repeats) == (5, 3)
        )


def test_the_readmes_submit_what_the_run_job_runs():
    """The `ray job submit` commands of docs/pipeline.md and cluster/README.md run the RayJob's entrypoint, word for
    word."""
    entry = shlex.split(yaml.safe_load((CLUSTER / "rayjob-run.yaml").read_text())["spec"]["entrypoint"])
    for readme in (REPO / "docs" / "pipeline.md", CLUSTER / "README.md"):
        text = readme.read_text().replace("\\\n", " ")
        [command] = [line for line in text.splitlines() if "ray job submit" in line and "genpi.cli run" in line]
        submitted = shlex.split(command)
        assert "--runtime-env" in submitted and submitted[submitted.index("--") + 1 :] == entry, readme


def test_every_node_s_raylet_reaps_a_dead_worker_s_children():
    """vLLM's engine core and tensor-parallel workers outlive an engine actor that dies uncleanly, holding its GPUs,
    unless the raylet kills the dead worker's process group: every node's `ray start` runs with that setting."""
    setting = {"name": "RAY_process_group_cleanup_enabled", "value": "true"}
    for name in ("raycluster.yaml", "rayjob.yaml", "rayjob-run.yaml"):
        spec = yaml.safe_load((CLUSTER / name).read_text())["spec"]
        spec = spec.get("rayClusterSpec", spec)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for container in group["template"]["spec"]["containers"]:
                assert setting in container.get("env", []), (name, container["name"])
    up = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    starts = [c for c in up["head_start_ray_commands"] + up["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_process_group_cleanup_enabled=true ray start" in c for c in starts)
