"""calibkern.calibrators.TemperatureScaling: the NLL-optimal temperature (against a float64 grid search), its
transform and state, and no transformers needed."""

import pytest
import torch

import calibkern as ck
from calibkern.calibrators import TemperatureScaling
from helpers import run_without

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _overconfident(n=2000, k=4, scale=3.0, seed=0):
    """Labels drawn from softmax(z), logits given as scale · z: the optimal T is near ``scale``."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=generator, dtype=torch.float64)
    labels = torch.multinomial(z.softmax(1), 1, generator=generator).squeeze(1)
    return (scale * z).float(), labels


def _nll(z, labels, temperatures):
    """Mean NLL of ``z / T`` for every ``T`` of ``temperatures`` at once (float64)."""
    scaled = z[None] / temperatures[:, None, None]
    picked = scaled.gather(2, labels[None, :, None].expand(len(temperatures), -1, 1)).squeeze(2)
    return (torch.logsumexp(scaled, dim=2) - picked).mean(dim=1)


def _grid_optimum(logits, labels):
    """A float64 grid search: 301 points over [0.03, 30], then 401 points within ±5 % of the best (0.025 % apart)."""
    z = logits.double()
    coarse = torch.logspace(-1.5, 1.5, 301, dtype=torch.float64)
    best = float(coarse[_nll(z, labels, coarse).argmin()])
    fine = torch.linspace(best / 1.05, best * 1.05, 401, dtype=torch.float64)
    return float(fine[_nll(z, labels, fine).argmin()])


@pytest.mark.parametrize("scale, n, k", [(3.0, 2000, 4), (0.4, 500, 7), (1.0, 47, 2)])
def test_fit_finds_the_nll_optimal_temperature(scale, n, k):
    logits, labels = _overconfident(n, k, scale, seed=n)
    fitted = TemperatureScaling().fit(logits, labels).temperature
    best = _grid_optimum(logits, labels)
    assert abs(fitted / best - 1) <= 0.01, (fitted, best)
    z = logits.double()
    assert float(ck.nll(z / fitted, labels)) <= float(ck.nll(z / best, labels)) + 1e-12


def test_transform_state_dict_and_inputs():
    logits, labels = _overconfident()
    labels[::10] = -100
    scaler = TemperatureScaling().fit(logits, labels)
    keep = labels != -100
    assert scaler.temperature == pytest.approx(_grid_optimum(logits[keep], labels[keep]), rel=0.01)
    scaled = scaler.transform(logits)
    assert scaled.dtype == logits.dtype and torch.equal(scaled.argmax(1), logits.argmax(1))
    torch.testing.assert_close(scaled, logits / scaler.temperature)
    assert float(ck.ece(scaled, labels)) < float(ck.ece(logits, labels))
    again = TemperatureScaling()
    again.load_state_dict(scaler.state_dict())
    torch.testing.assert_close(again(logits), scaled)
    from_probs = TemperatureScaling().fit(logits.softmax(1), labels, input="probs").temperature
    assert from_probs == pytest.approx(scaler.temperature, rel=1e-4)


def test_binary_scores():
    generator = torch.Generator().manual_seed(5)
    z = torch.randn(800, generator=generator, dtype=torch.float64)
    labels = (torch.rand(800, generator=generator, dtype=torch.float64) < z.sigmoid()).long()
    fitted = TemperatureScaling().fit(2.5 * z, labels).temperature
    assert fitted == pytest.approx(_grid_optimum(torch.stack([torch.zeros_like(z), 2.5 * z], 1), labels), rel=0.01)


def test_bad_input_raises_naming_the_argument():
    logits, labels = _overconfident(20)
    with pytest.raises(ValueError, match="labels must lie in"):
        TemperatureScaling().fit(logits, labels + 4)
    with pytest.raises(ValueError, match="every row is ignored"):
        TemperatureScaling().fit(logits, torch.full_like(labels, -100))
    bad = logits.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        TemperatureScaling().fit(bad, labels)
    with pytest.raises(ValueError, match="temperature"):
        TemperatureScaling().load_state_dict({"temperature": -1.0})


def test_runs_without_transformers():
    done = run_without(("transformers", "trl", "peft"),
                       "import torch\n"
                       "from calibkern.calibrators import TemperatureScaling\n"
                       "z = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.5]]) * 4\n"
                       "print(TemperatureScaling().fit(z, torch.tensor([0, 1, 1])).temperature)\n"
                       "assert 'transformers' not in sys.modules\n")
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) > 1.0
