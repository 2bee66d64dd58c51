import pytest
import torch

import diffsolve as ds
from diffsolve.models import NonFiniteError

MODEL = ds.models.GaussianMixture.gmm_2d().model(ds.schedules.VPLinear())


def test_unknown_solver_names_close_matches():
    with pytest.raises(ValueError, match=r"unknown solver 'huen'.*did you mean 'heun'"):
        ds.get_solver("huen")
    with pytest.raises(ValueError, match="euler-maruyama"):
        ds.sample(MODEL, "euler_maruyamma", 5, shape=(2, 2))


def test_bad_option_names():
    with pytest.raises(TypeError, match=r"'ddim' has no option 'etta'.*did you mean 'eta'.*eta=0.0"):
        ds.get_solver("ddim", etta=0.5)
    with pytest.raises(TypeError, match="'heun' has no option 'churn'"):
        ds.sample(MODEL, "heun", 5, shape=(2, 2), churn=1.0)
    with pytest.raises(ValueError, match=r"'ddpm' fixes eta=1.0"):
        ds.get_solver("ddpm", eta=0.3)
    with pytest.raises(ValueError, match="eta must be in"):
        ds.get_solver("ddim", eta=2.0)
    with pytest.raises(ValueError, match="s_churn must be >= 0"):
        ds.get_solver("heun", s_churn=-1)
    with pytest.raises(ValueError, match="noise must be one of"):
        ds.sample(MODEL, "ddpm", 5, shape=(2, 2), noise="pink")
    with pytest.raises(ValueError, match="dtype"):
        ds.sample(MODEL, "ddpm", 5, shape=(2, 2), dtype="float8")


def test_wrong_shapes():
    with pytest.raises(ValueError, match="shape"):
        ds.sample(MODEL, "euler", 5, shape=(0, 2))
    with pytest.raises(ValueError, match=r"shape or x_T|give shape"):
        ds.sample(MODEL, "euler", 5)
    with pytest.raises(ValueError, match="does not match x_T"):
        ds.sample(MODEL, "euler", 5, shape=(3, 2), x_T=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="steps is required"):
        ds.sample(MODEL, "euler", shape=(3, 2))
    with pytest.raises(ValueError, match="mu has batch size 5"):
        ds.sample(MODEL, "euler", 5, shape=(3, 2), mu=torch.zeros(5, 2))
    with pytest.raises(ValueError, match="does not broadcast"):
        ds.sample(MODEL, "euler", 5, shape=(3, 2), mu=torch.zeros(3))
    with pytest.raises(ValueError, match=r"cond\['label'\] has batch size 4"):
        ds.sample(MODEL, "euler", 5, shape=(3, 2), cond={"label": torch.zeros(4)})
    with pytest.raises(ValueError, match="3 seeds for a batch of 2"):
        ds.sample(MODEL, "euler", 5, shape=(2, 2), seed=[1, 2, 3])
    bad = ds.DiffusionModel(lambda x, t: x[:, :1], ds.schedules.VPLinear(), "eps")
    with pytest.raises(ValueError, match=r"returned shape \(2, 1\) for an input of shape \(2, 2\)"):
        ds.sample(bad, "euler", 5, shape=(2, 2))


def test_nan_model_stops_with_solver_step_and_time():
    calls = []

    def net(x, t):
        calls.append(1)
        out = torch.zeros_like(x)
        if len(calls) == 4:
            out[1, 0] = float("nan")
        return out

    model = ds.DiffusionModel(net, ds.schedules.VPLinear(), "eps")
    with pytest.raises(
        NonFiniteError, match=r"solver 'heun', step 2 of 10 \(t=0\.\d+\), model call 4.*1 NaN.*1 of 3 samples"
    ):
        ds.sample(model, "heun", 10, shape=(3, 2), seed=0)
    calls.clear()
    with pytest.raises(NonFiniteError, match=r"solver 'ddpm', step 4 of 10 \(t="):
        ds.sample(model, "ddpm", 10, shape=(3, 2), seed=0)
    assert len(calls) == 4, "the run stops at the first bad call"
