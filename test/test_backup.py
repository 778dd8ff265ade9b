"""The generic LQR backup: its matrix form is its action, and its certificate is exact."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scpo_ros.backup import BackupCertificationError, LQRBackup
from scpo_ros.plant import load_plant
from scpo_ros.safeguard.invariant_set import safe_set_for

LINEAR = ["double_integrator", "double_integrator_2axis", "mass_spring_damper", "cart_pole"]


@pytest.mark.parametrize("name", LINEAR + ["pendulum"])
def test_input_gain_is_the_backup_action(name):
    plant = load_plant(name)
    backup = LQRBackup(plant)
    rng = np.random.default_rng(0)
    x = rng.uniform(plant.region.x_min, plant.region.x_max, (50, plant.n))
    r = rng.uniform(plant.region.r_min, plant.region.r_max, (50, plant.nr))
    z = np.hstack([x, r, np.ones((50, 1))])
    np.testing.assert_allclose(z @ backup.input_gain().T, backup(x, r), atol=1e-12)
    np.testing.assert_allclose(backup(torch.as_tensor(x), torch.as_tensor(r)).numpy(), backup(x, r), atol=1e-12)
    x_ss, u_ss = plant.equilibrium(r)
    np.testing.assert_allclose(backup(x_ss, r), u_ss, atol=1e-12)   # at the equilibrium: u_ss


@pytest.mark.parametrize("name", ["double_integrator", "mass_spring_damper"])
def test_exact_certificate_matches_corner_simulation(name):
    """The support-function worst case equals a brute-force simulation from the region's corners
    (a linear closed loop attains its box maximum at a corner)."""
    plant = load_plant(name)
    backup = LQRBackup(plant)
    worst = backup.certify()
    assert worst["method"] == "exact"
    lo, hi = plant.region.lower, plant.region.upper
    k = len(lo)
    corners = np.where(((np.arange(2 ** k)[:, None] >> np.arange(k)) & 1).astype(bool), hi, lo)
    x, r = corners[:, :plant.n], corners[:, plant.n:]
    F, f, names = plant.state_rows()
    best = np.full(len(f), -np.inf)
    for _ in range(3000):
        best = np.maximum(best, (x @ F.T).max(0))
        x = plant.step(x, backup(x, r))
    for i, nm in enumerate(names):
        assert worst["rows"][nm][0] == pytest.approx(best[i], abs=1e-9)


def test_certificate_names_the_broken_row():
    plant = load_plant("double_integrator")
    with pytest.raises(BackupCertificationError, match="acceleration"):
        LQRBackup(plant, R=[0.01]).certify()     # an aggressive backup saturates the input


def test_double_integrator_safe_set_reproduces_the_pinned_rows():
    """The generic explicit construction reproduces the issue-10 double-integrator set row for row
    (numbers computed once with the per-axis code and pinned)."""
    pin = json.loads((Path(__file__).parent / "di_safe_set_pinned.json").read_text())

    def key(E, G, f):
        rows = np.hstack([E, G, np.asarray(f)[:, None]])
        return rows[np.lexsort(np.round(rows, 9).T[::-1])]
    plant = load_plant("double_integrator")
    for late in (0, 1):
        E, G, F, f = safe_set_for(plant, late_commands=late).affine_rows()
        d = pin[f"dt=0.05,late={late}"]
        assert F.shape[1] == 0
        np.testing.assert_allclose(key(E, G, f), key(np.array(d["E"]), np.array(d["G"]), d["f"]), atol=1e-9)


@pytest.mark.parametrize("name", ["double_integrator", "double_integrator_2axis", "mass_spring_damper", "dc_motor",
                                  "cart_pole", "coupled_two_input", "pendulum"])
def test_every_shipped_plant_certifies(name):
    """The shipped files' backup weights and regions are tuned so each backup certifies (exactly for
    the linear plants); a file edit that breaks one shows here, naming the row."""
    plant = load_plant(name)
    out = LQRBackup(plant).certify()
    assert out["method"] == ("sampled" if name == "pendulum" else "exact")
    if name == "coupled_two_input":   # the references' equilibria keep strict slack on |p1 - p2| <= 0.4
        assert out["rows"]["H[0]"][0] < 0.4 and out["rows"]["H[1]"][0] < 0.4
