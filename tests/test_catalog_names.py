"""Names people know: ComfyUI / k-diffusion spellings and aliases find the registry entry they mean."""

import pytest

import diffsolve as ds
from diffsolve.core.protocol import Solver
from diffsolve.core.registry import normalize, register, registered


def test_peer_spellings_and_aliases_resolve():
    for name, want in [
        ("dpmpp_2m_sde", "dpmpp-2m-sde"),
        ("DPMPP_2M", "dpmpp-2m"),
        ("euler maruyama", "euler-maruyama"),
        ("gotta_go_fast", "adaptive-sde"),
        ("RK45", "ode-rk45"),
        ("dopri5", "ode-dopri5"),
        ("reversible_heun", "rev-heun"),
        ("score-sde-pc", "pc"),
        ("denoising_mcmc", "dmcmc"),
    ]:
        assert ds.get_solver(name).name == want, name
        assert ds.samplers.solver_info(name).name == want
    with pytest.raises(ValueError, match=r"unknown solver 'dpmpp_2n'.*did you mean 'dpmpp-2m'"):
        ds.get_solver("dpmpp_2n")


def test_every_entry_lists_the_names_it_answers_to():
    for info in registered():
        assert info.names[0] == info.name
        for n in info.names:
            assert ds.samplers.solver_info(n) is info, n
    table = ds.list_solvers()
    assert "also" in str(table).splitlines()[0]
    assert (
        "| adaptive-sde | adaptive | 1 | 2 | yes | - | adaptive | adaptive_sde, gotta-go-fast | Gotta Go Fast"
        in table.markdown()
    )
    assert all(i.reference in table.markdown() for i in registered())


def test_register_refuses_a_taken_alias_and_bad_names():
    class Toy(Solver):
        pass

    with pytest.raises(ValueError, match="already names a solver"):
        register(
            "toy-solver",
            family="ode",
            order=1,
            calls_per_step=1,
            deterministic=True,
            description="",
            reference="",
            aliases=("rk45",),
        )(Toy)
    with pytest.raises(ValueError, match="lower-case with hyphens"):
        register(
            "Toy_Solver", family="ode", order=1, calls_per_step=1, deterministic=True, description="", reference=""
        )(Toy)
    assert normalize("  Euler_Ancestral ") == "euler-ancestral"
