"""The embedded demo pipeline: every stage end to end on the small configuration, and its parts."""

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from calibkern import hf  # noqa: E402
from calibkern.pipeline import DemoConfig, build_world, load_results, run_demo, stages, synthetic, write_report  # noqa: E402
from calibkern.pipeline.demo import tokenizer_corpus  # noqa: E402
from calibkern.pipeline.model import tiny_llama  # noqa: E402
from calibkern.pipeline.report import STAGE_ORDER, demo_checks  # noqa: E402
from calibkern.pipeline.seeds import summarise, summary_markdown  # noqa: E402
from calibkern.pipeline.tokenizer import train_tokenizer  # noqa: E402
from helpers import METRIC_KEYS  # noqa: E402



pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(DemoConfig.small(), out, progress=False)


@pytest.fixture(scope="module")
def small_world():
    config = DemoConfig.small()
    world = build_world(config)
    tokenizer = train_tokenizer(tokenizer_corpus(world, config.template), config.vocab_size)
    option_ids = hf.detect_option_ids(tokenizer, 4, config.template)
    return config, world, tokenizer, option_ids


def test_demo_writes_every_stage(demo_run):
    out, results = demo_run
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk) >= {"config", "timings", "stages"}
    assert on_disk["config"]["n_known"] == DemoConfig.small().n_known
    assert set(on_disk["stages"]) == set(STAGE_ORDER)
    for name, metrics in on_disk["stages"].items():
        assert METRIC_KEYS <= set(metrics), name
        assert 0.0 <= metrics["ece"] <= 1.0 and 0.0 <= metrics["accuracy"] <= 1.0
        low, high = metrics["ece_ci"]
        assert low <= high
        assert metrics["n"] == (DemoConfig.small().n_known + DemoConfig.small().n_new) * DemoConfig.small().test_per_fact
    assert on_disk["stages"]["temperature_scaling"]["temperature"] > 0
    assert on_disk["stages"]["temperature_scaling"]["accuracy"] == on_disk["stages"]["dpo"]["accuracy"]
    assert all(t >= 0 for t in on_disk["timings"].values())
    assert {c["claim"] for c in on_disk["checks"]} and all(isinstance(c["holds"], bool) for c in on_disk["checks"])
    markdown = (out / "results.md").read_text()
    for name in STAGE_ORDER:
        assert f"| {name} |" in markdown
        assert (out / f"reliability_{name}.png").stat().st_size > 1000
    assert (out / "reliability_all.png").stat().st_size > 1000
    assert (out / "models" / "dpo" / "config.json").is_file()
    assert len((out / "data" / "test.jsonl").read_text().splitlines()) == on_disk["stages"]["base"]["n"]


def test_report_is_rebuilt_from_results_json(demo_run, tmp_path):
    out, _ = demo_run
    results = load_results(out)
    write_report(results, tmp_path)
    assert (tmp_path / "results.md").read_text() == (out / "results.md").read_text()
    assert (tmp_path / "reliability_all.png").is_file()


def test_reliability_data_holds_the_smooth_curve(demo_run):
    _, results = demo_run
    for name, rel in results["reliability"].items():
        curve = rel["smooth"]
        assert len(curve["confidence"]) == len(curve["accuracy"]) == len(curve["density"]) == 101
        assert curve["sigma"] == pytest.approx(results["stages"][name]["smece"], abs=1 / 512)


def _with(stages: dict, **changes) -> dict:
    """``stages`` with ``{stage: {metric: value}}`` overrides."""
    return {name: {**metrics, **changes.get(name, {})} for name, metrics in stages.items()}


def test_cft_accuracy_claim_is_one_sided_and_ece_claims_use_the_debiased_ece(demo_run):
    _, results = demo_run
    dpo_accuracy = results["stages"]["dpo"]["accuracy"]

    def holds(stages, claim):
        return next(c for c in demo_checks(stages) if c["claim"] == claim)["holds"]

    accuracy_claim = "CFT accuracy ≥ DPO accuracy − 2 points"
    assert holds(_with(results["stages"], cft={"accuracy": dpo_accuracy + 0.10}), accuracy_claim)
    assert holds(_with(results["stages"], cft={"accuracy": dpo_accuracy - 0.019}), accuracy_claim)
    assert not holds(_with(results["stages"], cft={"accuracy": dpo_accuracy - 0.021}), accuracy_claim)
    assert holds(_with(results["stages"], cft={"ece": 0.5, "ece_debiased": 0.05}), "CFT debiased ECE ≤ 0.06")
    apart = _with(results["stages"], rcft={"ece_debiased": 0.01, "ece_ci": [0.0, 0.02]},
                  rcft_no_reg={"ece_debiased": 0.10, "ece_ci": [0.08, 0.12]})
    overlapping = _with(apart, rcft_no_reg={"ece_ci": [0.015, 0.12]})
    claim = "RCFT debiased ECE < RCFT λ=0's"
    assert [c["note"] for c in demo_checks(apart) if c["claim"] == claim] == ["outside the intervals"]
    assert [c["note"] for c in demo_checks(overlapping) if c["claim"] == claim] == ["inside the intervals"]


def test_seed_summary_means_sds_and_claim_counts(demo_run):
    _, results = demo_run
    other = {**results, "stages": _with(results["stages"], cft={"ece": results["stages"]["cft"]["ece"] + 0.2,
                                                                  "ece_debiased": 0.9})}
    other["checks"] = demo_checks(other["stages"])
    summary = summarise({0: results, 3: other})
    assert summary["seeds"] == [0, 3]
    cft = summary["stages"]["cft"]["ece"]
    assert cft["values"] == [results["stages"]["cft"]["ece"], results["stages"]["cft"]["ece"] + 0.2]
    assert cft["mean"] == pytest.approx(results["stages"]["cft"]["ece"] + 0.1)
    assert cft["sd"] == pytest.approx(0.2 / 2 ** 0.5)
    claims = {c["claim"]: c for c in summary["claims"]}
    cft_claim = claims["CFT debiased ECE ≤ 0.06"]
    assert 3 in cft_claim["failed_on"] and cft_claim["held"] == 2 - len(cft_claim["failed_on"])
    assert claims["DPO mean confidence − accuracy ≥ 0.10"]["inside_intervals"] is None
    assert claims["RCFT debiased ECE < RCFT λ=0's"]["inside_intervals"] in (0, 1, 2)
    markdown = summary_markdown(summary)
    assert "| cft |" in markdown and "± " in markdown and "CFT debiased ECE ≤ 0.06" in markdown


def test_load_results_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        load_results(tmp_path)


def test_world_splits():
    config = DemoConfig.small()
    world = build_world(config)
    n_facts = config.n_known + config.n_new
    assert len(world.facts) == n_facts
    assert len(world.test) == n_facts * config.test_per_fact
    assert len(world.cft) == config.n_known * config.cft_per_fact
    assert len(world.rcft_known) == config.n_known * config.rcft_known_per_fact
    assert len(world.new) == config.n_new * config.new_per_fact
    assert len(world.pairs) == config.dpo_pairs
    known_questions = {f.question for f in world.facts if f.known}
    assert {e.question for e in world.cft} == known_questions
    assert {e.question for e in world.rcft_known} == known_questions
    assert not {e.question for e in world.new} & known_questions
    for pair in world.pairs:
        fact = next(f for f in world.facts if f.question == pair.example.question)
        assert fact.answer_probs[pair.chosen] >= fact.answer_probs[pair.rejected]


def test_quantised_rows_follow_the_distribution():
    facts = synthetic.make_facts(5, 0, seed=3)
    rows = synthetic.quantised_rows(facts, range(5), 40)
    for f, fact in enumerate(facts):
        counts = np.bincount([r["answer"] for r in rows if r["fact"] == f], minlength=4)
        assert counts.sum() == 40
        assert np.abs(counts / 40 - fact.answer_probs).max() <= 1 / 40


def test_rcft_known_rows_are_the_first_cft_rows_of_each_fact():
    config = DemoConfig.small().replace(cft_per_fact=4, rcft_known_per_fact=3)
    world = build_world(config)
    expected = [e for i, e in enumerate(world.cft) if i % 4 < 3]
    assert world.rcft_known == expected
    with pytest.raises(ValueError, match="rcft_known_per_fact"):
        build_world(config.replace(rcft_known_per_fact=5))


def test_world_does_not_depend_on_the_string_hash():
    """The same seed gives the same facts in any process (a set's order follows PYTHONHASHSEED)."""
    import subprocess
    import sys

    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('s', sys.argv[1]); m = u.module_from_spec(s); "
            "sys.modules['s'] = m; s.loader.exec_module(m); "
            "print([(f.question, f.choices) for f in m.make_facts(30, 10, seed=1)])")
    outputs = {subprocess.run([sys.executable, "-c", code, synthetic.__file__], capture_output=True, text=True, check=True,
                              env={"PYTHONHASHSEED": str(h)}).stdout for h in (1, 2, 3)}
    assert len(outputs) == 1


def test_facts_vary_in_entropy():
    facts = synthetic.make_facts(200, 0, seed=0)
    top = np.array([f.answer_probs.max() for f in facts])
    assert top.min() < 0.4 and top.max() > 0.9


def test_tokenizer_gives_single_token_option_letters(small_world):
    config, _, tokenizer, option_ids = small_world
    assert len(set(option_ids)) == 4
    assert tokenizer.convert_ids_to_tokens(option_ids) == ["ĠA", "ĠB", "ĠC", "ĠD"]
    assert tokenizer.pad_token_id is not None


def test_training_stages_copy_the_model(small_world):
    config, world, tokenizer, option_ids = small_world
    model = tiny_llama(tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    options = stages.TrainOptions(epochs=1, lr=1e-2, batch_size=16, progress=False)
    trained = stages.cft(model, tokenizer, world.cft, option_ids, options, template=config.template)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before, trained.parameters()))
    assert "forward" not in trained.__dict__


def test_lora_stage_returns_a_merged_plain_model(small_world):
    config, world, tokenizer, option_ids = small_world
    model = tiny_llama(tokenizer)
    options = stages.TrainOptions(epochs=1, lr=1e-2, batch_size=16, progress=False,
                                  lora=stages.LoraOptions(r=4, target_modules=["q_proj", "v_proj"]))
    trained = stages.rcft(model, tokenizer, world.cft, world.calibration, option_ids, options,
                          template=config.template)
    assert type(trained) is type(model)
    changed = {n for (n, a), b in zip(model.named_parameters(), trained.parameters()) if not torch.equal(a, b)}
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed)


def test_dpo_stage_makes_later_training_possible(small_world):
    """The aligned model carries no Accelerate wrapper: a copy of it trains its own weights."""
    config, world, tokenizer, option_ids = small_world
    model = tiny_llama(tokenizer)
    options = stages.TrainOptions(epochs=1, lr=1e-2, batch_size=16, progress=False)
    aligned = stages.align(model, tokenizer, world.pairs[:32], options, template=config.template)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), aligned.parameters()))
    smoothed = stages.label_smoothing(aligned, tokenizer, world.cft, option_ids, options, template=config.template)
    assert any(not torch.equal(a, b) for a, b in zip(aligned.parameters(), smoothed.parameters()))


def test_results_record_their_provenance(demo_run):
    out, results = demo_run
    provenance = json.loads((out / "results.json").read_text())["provenance"]
    assert {"calibkern", "commit", "torch", "transformers", "backend", "threads", "seed", "cpu"} <= set(provenance)
    assert provenance["seed"] == 0 and provenance["threads"] == torch.get_num_threads() == 1
    assert provenance["torch"] == torch.__version__


def test_evaluate_reproduces_the_demo_numbers_without_a_template(demo_run, tmp_path, capsys):
    """The DPO model the demo saves carries its template: ``calibkern evaluate`` with no ``--template`` gives the
    numbers results.json reports for it."""
    from calibkern.cli import main

    out, results = demo_run
    assert main(["evaluate", "--model", str(out / "models" / "dpo"), "--data", str(out / "data" / "test.jsonl"),
                 "--out", str(tmp_path / "dpo"), "--no-progress"]) == 0
    assert "using the template" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "dpo" / "metrics.json").read_text())
    expected = json.loads(json.dumps(results["stages"]["dpo"]))
    assert {key: metrics[key] for key in expected} == expected


def test_the_dpo_claim_can_fail(demo_run):
    """The base model's debiased ECE is near 0 or negative; the claim compares with its plug-in ECE instead."""
    _, results = demo_run
    claim = "DPO debiased ECE ≥ 3 × base's plug-in ECE"
    base = {"ece": 0.05, "ece_debiased": -0.01, "ece_ci": [-0.02, 0.01]}
    for dpo_ece, holds in ((0.149, False), (0.151, True)):
        stages = _with(results["stages"], base=base, dpo={"ece_debiased": dpo_ece})
        assert [c["holds"] for c in demo_checks(stages) if c["claim"] == claim] == [holds]


def _doc_tables():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "tables.py")
    spec = importlib.util.spec_from_file_location("doc_tables", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_docs_numbers_are_the_committed_results():
    """docs/demo.md's demo tables and the README's headline rows are what docs/tables.py writes from the committed
    result files; a number edited by hand is found."""
    tables = _doc_tables()
    assert tables.stale() == []
    readme = open(os.path.join(tables.ROOT, "README.md"), encoding="utf-8").read()
    edited = readme.replace(tables.headline().splitlines()[-1], tables.headline().splitlines()[-1] + " (edited)")
    assert edited != readme and tables.rewrite(edited, {"headline": tables.headline}) == readme
