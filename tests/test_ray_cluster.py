"""Several Ray nodes on this machine (ray.cluster_utils.Cluster): workers spread over them, same image."""

import pytest
import ray
import torch
from helpers import small_config
from ray.cluster_utils import Cluster

from apt_dist import render
from apt_dist.executor import InProcessExecutor
from apt_dist.ray_executor import RayExecutor

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def three_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, resources={"worker_node": 1})
    cluster.add_node(num_cpus=1, resources={"worker_node": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_workers_spread_over_three_nodes_give_the_same_image(three_nodes):
    reference = render(small_config(), executor=InProcessExecutor(), progress=False)
    threads = torch.get_num_threads()
    with RayExecutor(num_workers=3, cpus_per_worker=threads, placement_strategy="SPREAD") as ex:
        r = render(small_config(), executor=ex, progress=False)
        workers = ex.summary()["workers"]
    assert len({w["node"] for w in workers}) == 3, workers
    assert all(w["patches"] > 0 for w in workers), workers
    # The worker on the driver's (head) node exchanges patches through shared memory, the others through Ray.
    assert sorted(w["transport"] for w in workers) == ["object store", "object store", "shared memory"], workers
    assert r.image.tobytes() == reference.image.tobytes()


def test_a_driver_on_a_node_without_workers_gets_the_same_image(three_nodes):
    """The shipped cluster's topology: every worker on another node, reached through Ray objects only."""
    reference = render(small_config(), executor=InProcessExecutor(), progress=False)
    threads = torch.get_num_threads()
    with RayExecutor(num_workers=2, cpus_per_worker=threads, placement_strategy="SPREAD",
                     worker_resources={"worker_node": 1}) as ex:
        r = render(small_config(), executor=ex, progress=False)
        workers = ex.summary()["workers"]
    here = ray.get_runtime_context().get_node_id()[:8]
    assert len({w["node"] for w in workers}) == 2 and here not in {w["node"] for w in workers}, workers
    assert {(w["transport"], w["calls_via"]) for w in workers} == {("object store", "ray")}, workers
    assert r.image.tobytes() == reference.image.tobytes()
    assert torch.equal(r.latent, reference.latent)


def test_more_workers_than_the_nodes_hold_fails_before_any_work(three_nodes):
    with pytest.raises(Exception, match=r"could not reserve 4 workers.*STRICT_SPREAD.*on 3 node"):
        with RayExecutor(num_workers=4, placement_strategy="STRICT_SPREAD", placement_timeout_s=3) as ex:
            render(small_config(), executor=ex, progress=False)
