import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)
    yield


# The 2-D six-component mixture under VPLinear: exact samples of its law at t_min, and the two-sample
# test's threshold (mean + 5 std of the MMD^2 between independent exact sets of GMM_N samples).
GMM_N = 1500


def _gmm_target():
    import diffsolve as ds

    sched = ds.schedules.VPLinear()
    return ds.models.GaussianMixture.gmm_2d().marginal(sched.t_min, sched)


@pytest.fixture(scope="session")
def threshold():
    import statistics

    from diffsolve.metrics import mmd2

    target = _gmm_target()
    null = [
        mmd2(
            target.sample(GMM_N, torch.Generator().manual_seed(2 * i + 100)),
            target.sample(GMM_N, torch.Generator().manual_seed(2 * i + 101)),
        )
        for i in range(12)
    ]
    return statistics.mean(null) + 5 * statistics.stdev(null)


@pytest.fixture(scope="session")
def reference():
    return _gmm_target().sample(GMM_N, torch.Generator().manual_seed(7))
