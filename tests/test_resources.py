"""--gpu and the resource checks against what the cluster can scale to (ractd_ray.resources), on a real local Ray
whose GCS holds the cluster config an autoscaler started from cluster.yaml reports (its node types: GPU types
with min_workers 0), without any GPU on this machine."""

import pytest
import yaml

pytest.importorskip("ray")

import ray
from ray.experimental import internal_kv
from test_cluster import CLOUD

from ractd import RactdError
from ractd_ray import resources
from ractd_ray.search import SearchConfig, _check_resources


def _layout(scfg, use_gpu):
    """(cpus per worker, prestart) of the search's trial layout."""
    layout = _check_resources(scfg, use_gpu, scfg.stage_config("student"))
    return layout.cpus, layout.prestart
from ractd_ray.train import ensure_ray

pytestmark = pytest.mark.ray


def _report_cluster_config(path) -> None:
    """What Ray's autoscaler reports to the GCS for a cluster file: one node group per node type."""
    from ray.core.generated import autoscaler_pb2

    cfg = yaml.safe_load(path.read_text())
    proto = autoscaler_pb2.ClusterConfig()
    for name, t in cfg["available_node_types"].items():
        group = proto.node_group_configs.add(name=name, min_count=t.get("min_workers", 0),
                                             max_count=1 if name == cfg["head_node_type"] else t["max_workers"])
        for k, v in t["resources"].items():
            group.resources[k] = int(v)
    internal_kv._internal_kv_put(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, proto.SerializeToString(),
                                 overwrite=True, namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE)


@pytest.fixture(scope="module")
def local_ray():
    ensure_ray("local", num_cpus=2)
    yield
    ray.shutdown()


def test_gpu_decisions_follow_the_node_types(local_ray):
    readme = SearchConfig(task="maze2d-umaze", workers=4, max_concurrent=2)  # the README's cluster command
    # no autoscaler: what the cluster has now (2 CPUs, no GPU)
    cap = resources.capacity()
    assert (cap.cpus, cap.gpus, cap.autoscaling) == (2.0, 0.0, False)
    assert resources.decide_gpu("auto", "test") is False
    with pytest.raises(RactdError, match=r"^--gpu yes: no node of the Ray cluster has a GPU"):
        resources.decide_gpu("yes", "test")
    with pytest.raises(RactdError, match=r"needs 4 CPU \(4 x 1\) but the Ray cluster has 2"):
        _layout(readme, use_gpu=False)
    # one trial at a time: its worker takes 1.5 CPUs beside its 0.25-CPU driver, and the next trial's driver
    # (0.25) fits beside them, its worker not: it is prestarted; with 0.5-CPU workers two trials fit: no prestart
    assert _layout(SearchConfig(task="maze2d-umaze"), use_gpu=False) == (1.5, True)
    assert _layout(SearchConfig(task="maze2d-umaze", cpus_per_worker=0.5), use_gpu=False) == (0.5, False)
    # cluster.yaml's node types: GPU workers can be started, though none runs now
    _report_cluster_config(CLOUD)
    cap = resources.capacity()
    assert cap.autoscaling and cap.gpus == 8.0 and cap.cpus == 4 + 4 * 8 + 4 * 4 and cap.node_gpus == 1.0
    assert resources.decide_gpu("auto", "test") is True and resources.decide_gpu("yes", "test") is True
    _layout(readme, use_gpu=True)  # fits what the cluster can scale to: no error
    # an autoscaler would start a node for the extra trial's workers, so that it trained too: no prestart
    assert _layout(SearchConfig(task="maze2d-umaze", gpu="no"), use_gpu=False)[1] is False
    with pytest.raises(RactdError, match=r"needs 2 GPU on one node but the largest node type"):
        resources.check_fits("a worker", {"CPU": 1.0, "GPU": 2.0}, 1)


def test_auto_worker_cpus_use_the_node():
    """--cpus-per-worker 0: a CPU worker takes its share of the largest node (one 2-CPU machine: the shared stages'
    worker 2, a trial's 1.5 beside its driver); GPU workers 1; an explicit value is kept."""
    one = resources.Capacity(cpus=2.0, gpus=0.0, node_cpus=2.0, node_gpus=0.0, autoscaling=False)
    assert resources.worker_cpus(0, 1, False, cap=one) == 2.0
    assert resources.worker_cpus(0, 1, False, concurrent=1, driver_cpus=0.5, cap=one) == 1.5
    assert resources.worker_cpus(0, 2, False, concurrent=2, driver_cpus=0.5, cap=one) == 1.0  # never below 1
    assert resources.worker_cpus(3, 1, False, cap=one) == 3.0
    big = resources.Capacity(cpus=48.0, gpus=8.0, node_cpus=16.0, node_gpus=1.0, autoscaling=True)
    assert resources.worker_cpus(0, 1, True, cap=big) == 1.0
    assert resources.worker_cpus(0, 4, False, concurrent=2, driver_cpus=0.5, cap=big) == 1.5  # (16 - 1) / 8


def test_auto_worker_cpus_fit_beside_every_driver_on_small_nodes():
    """Two worker nodes of 1 CPU (bench/multinode.py's cluster): the two trial drivers (0.25 each) may land on
    different nodes, so a 1-CPU worker would fit on neither and the sweep would hang; the worker reserves what a
    node keeps beside every driver, and one worker plus all drivers fits on one node."""
    small = resources.Capacity(cpus=2.0, gpus=0.0, node_cpus=1.0, node_gpus=0.0, autoscaling=False)
    for concurrent, driver in ((1, 0.5), (2, 0.375)):  # the search's driver share for n trials + the prestarted one
        cpus = resources.worker_cpus(0, 1, False, concurrent=concurrent, driver_cpus=driver, cap=small)
        assert 0 < cpus and cpus + driver * concurrent <= small.node_cpus, (concurrent, cpus)
    assert resources.worker_cpus(0, 1, False, concurrent=1, driver_cpus=0.5, cap=small) == 0.5
    assert resources.worker_cpus(0, 1, False, cap=small) == 1.0  # no driver beside it: the whole node
