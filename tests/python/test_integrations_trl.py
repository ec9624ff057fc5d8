"""divkit.integrations.trl against the stock TRL trainers on the same tiny model and data."""

import pytest
import torch

pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

from test_trl_client import run_gkd  # noqa: E402  (the tiny models, data and config)


def test_divkit_gkd_trainer_equals_trl_gkd_trainer(tmp_path):
    try:
        from trl.experimental.gkd import GKDTrainer
    except Exception as e:  # pragma: no cover - depends on the installed TRL
        pytest.skip(f"trl.experimental.gkd.GKDTrainer not importable: {e}")
    from divkit.integrations.trl import DivkitGKDTrainer

    trl_losses = run_gkd(tmp_path, "gkd_trl", GKDTrainer)
    dk_losses = run_gkd(tmp_path, "gkd_divkit", DivkitGKDTrainer)
    assert len(trl_losses) == len(dk_losses) == 6
    assert trl_losses[0] > 0.05
    # Same math (JSD, beta 0.5, the completion tokens' mean), fp32 GEMMs in both: step 0 agrees
    # to round-off, the trajectory to what round-off grows to through six Adam steps.
    assert dk_losses[0] == pytest.approx(trl_losses[0], rel=1e-5, abs=1e-6)
    assert dk_losses == pytest.approx(trl_losses, rel=2e-3, abs=2e-4)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "tvd"])
def test_divkit_gkd_trainer_kinds_train(tmp_path, kind):
    from divkit.integrations import trl as dk_trl

    class Trainer(dk_trl.DivkitGKDTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, divkit_kind=kind, divkit_temperature=2.0, **k)

    losses = run_gkd(tmp_path, f"gkd_{kind}", Trainer)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2])
