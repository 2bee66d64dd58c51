"""`diffsolve bench`: the quick ODE benchmark end to end, its table, and no silent overwrites."""

import json

from diffsolve import cli


def test_quick_ode_benchmark_writes_its_tables_and_keeps_results(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli.main(["bench", "--quick", "--only", "ode", "--out", str(out)]) == 0
    data = json.loads((out / "ode.json").read_text())
    head = {r["nfe"]: r for r in data["headline"]}
    assert sorted(head) == [3, 4, 5, 6, 8, 10, 15, 20, 50]
    for b, r in head.items():  # every library's best, a positive error, the ratio ours / best peer
        assert r["ours_error"] > 0 and r["diffusers_error"] > 0
        assert abs(r["ratio"] - r["ours_error"] / r["peer_error"]) < 1e-12
        assert r["peer_error"] <= r["diffusers_error"]  # the best peer is the best over the whole set
        assert r["ours_calls"] <= b and r["peer_calls"] <= b  # equal-cost accounting: calls counted, within B
    for r in data["results"].values():  # no point spends more calls than its budget
        assert all(p["nfe"] <= int(k) for k, p in r["points"].items() if k.isdigit())
    # errors fall with NFE for a second-order solver on the oracle
    pts = data["results"]["dpmpp-2m, log-snr"]["points"]
    assert pts["50"]["rms_error"] < pts["10"]["rms_error"] < pts["5"]["rms_error"]
    assert "ours / best peer" in (out / "ode.md").read_text()
    before = (out / "ode.json").read_text()
    assert cli.main(["bench", "--quick", "--only", "ode", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "ode.json").read_text() == before
    assert cli.main(["bench", "--only", "nope", "--out", str(out)]) == 2
