"""Fingerprint every registry entry through the public API, to show a refactor leaves results bitwise unchanged.

    PYTHONPATH=<tree A> python scripts/fingerprint_solvers.py a.pt
    PYTHONPATH=<tree B> python scripts/fingerprint_solvers.py b.pt
    python scripts/fingerprint_solvers.py --compare a.pt b.pt

Each entry: samples and NFE of every solver on a VP and a rectified-flow mixture in float64 and float32,
inversion round trips, gradients through reversible solvers and dmcmc; errors are stored as their text.
"""

import sys
import warnings

import torch

import diffsolve as ds


def fingerprint() -> dict:
    torch.set_num_threads(1)
    out = {}
    gmm = ds.models.GaussianMixture.gmm_2d()
    cases = {"vp": gmm.model(ds.schedules.VPLinear())}
    try:
        cases["flow"] = gmm.model(ds.schedules.RectifiedFlow())
    except Exception as e:
        print("no flow", e)
    names = [i.name for i in ds.list_solvers()]
    for cname, model in cases.items():
        for name in names:
            info = ds.samplers.solver_info(name)
            for dt in (torch.float64, torch.float32):
                key = f"{cname}/{name}/{dt}"
                kw = dict(shape=(6, 2), seed=0, dtype=dt, progress=False)
                if info.fixed_grid:
                    kw["steps"] = 6
                if cname == "flow" or not info.deterministic:
                    kw["t_min"] = 1e-3 if cname == "vp" else 0.002
                    if cname == "flow" and not info.deterministic:
                        kw["t_max"] = 0.999
                try:
                    r = ds.sample(model, name, **kw)
                    out[key] = (r.samples, r.nfe)
                except Exception as e:
                    out[key] = repr(e)[:200]
    # inversion round trips
    model = cases["vp"]
    x0 = ds.sample(model, "dpmpp-2m", 8, shape=(6, 2), seed=1, dtype=torch.float64, progress=False).samples
    for name in ["rev-heun", "bdia", "o-belm", "edict", "rex", "ddim", "dpmpp-2m", "mrs-pc", "heun"]:
        try:
            lat = ds.invert(model, name, x0, 8, t_min=1e-3, progress=False)
            back = ds.sample(model, name, latent=lat, progress=False).samples
            out[f"invert/{name}"] = (lat.x, back)
        except Exception as e:
            out[f"invert/{name}"] = repr(e)[:200]
    # grad through reversible
    for name in ["rev-heun", "edict"]:
        xT = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        r = ds.sample(model, name, 6, x_T=xT, grad=True, progress=False, t_min=1e-3)
        r.samples.pow(2).sum().backward()
        out[f"grad/{name}"] = (r.samples.detach(), xT.grad)
    # dmcmc with options
    try:
        r = ds.sample(
            model,
            "dmcmc",
            shape=(6, 2),
            seed=0,
            dtype=torch.float64,
            progress=False,
            t_min=1e-3,
            integrator="heun",
            integrator_steps=3,
            n_skip=2,
            burn_in=3,
            burn_in_steps=3,
        )
        out["dmcmc/opts"] = (r.samples, r.nfe)
    except Exception as e:
        out["dmcmc/opts"] = repr(e)[:200]

    return out


def _eq(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    if isinstance(x, (tuple, list)):
        return isinstance(y, (tuple, list)) and len(x) == len(y) and all(_eq(u, v) for u, v in zip(x, y))
    return x == y


def compare(path_a: str, path_b: str) -> None:
    a, b = torch.load(path_a, weights_only=False), torch.load(path_b, weights_only=False)
    bad = [k for k in a if k not in b or not _eq(a[k], b[k])]
    print(len(a), "compared;", len(bad), "differ:", bad[:20])


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    if sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        res = fingerprint()
        torch.save(res, sys.argv[1])
        print(len(res), "entries;", sum(isinstance(v, str) for v in res.values()), "errors")
