"""Which Ray cluster a genpi command uses.

A plain `ray.init()` connects to the cluster named in Ray's session file (/tmp/ray/ray_current_cluster, written
by the last `ray start` or local start on this machine) and, when that head died uncleanly, hangs on "Failed to
connect to GCS". genpi therefore connects to a running cluster only when asked to: when `RAY_ADDRESS` is set
(`RAY_ADDRESS=auto` for the one `ray start` started here) or when it runs as the driver of a Ray job, whose
cluster it is; otherwise it starts a local cluster of its own. It says which in one line.
"""

from __future__ import annotations

import os
import sys

JOB_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for the driver of a `ray job submit` job


def ray_address() -> tuple[str, str]:
    """(the address for ray.init, what it means in words)."""
    address = os.environ.get("RAY_ADDRESS", "")
    if address == "local":
        return "local", "a local Ray cluster of its own (RAY_ADDRESS=local)"
    if address:
        return address, f"the Ray cluster at RAY_ADDRESS={address}"
    if JOB_VARIABLE in os.environ:
        return "auto", "the Ray cluster of this Ray job"
    return (
        "local",
        "a local Ray cluster of its own (set RAY_ADDRESS to use a running one, RAY_ADDRESS=auto for `ray start`'s)",
    )


def init_ray(log_to_driver: bool = True, include_dashboard: bool = False) -> None:
    """ray.init on the cluster ray_address() chooses, unless Ray is initialized already (a stage of genpi run,
    a Ray task)."""
    import ray

    if ray.is_initialized():
        return
    address, words = ray_address()
    print(f"genpi: Ray: using {words}", file=sys.stderr)
    ray.init(address=address, log_to_driver=log_to_driver, configure_logging=False, include_dashboard=include_dashboard)
