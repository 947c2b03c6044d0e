"""The after-write check of the repair commands: figures equal a direct measurement, recorded, switchable."""

import json
import math

import pytest
import torch

from cli.main import main
from surgery.checkpoint import MANIFEST_NAME, open_checkpoint
from surgery.health import CHECK_SAMPLES, HealthCheck, health_check
from surgery.metrics import first_token_kl, perplexity
from surgery.model import load_model, load_tokenizer
from surgery.splits import CHECK, builtin_part


def manifest(folder):
    return json.loads((folder / MANIFEST_NAME).read_text())


def direct(folder, prompts):
    model = load_model(open_checkpoint(folder), torch.device("cpu"))
    return model, perplexity(model, load_tokenizer(folder), prompts)


def test_check_of_a_model_against_itself_is_neutral(tiny_ckpt):
    check = health_check(tiny_ckpt, tiny_ckpt, samples=8, device="cpu")
    assert check.prompts == 8 and check.perplexity_before == check.perplexity_after
    assert abs(check.kl) < 1e-6 and check.perplexity_ratio == 1.0 and not check.broken


@pytest.mark.parametrize("before, after, broken", [(40.0, 399.0, False), (40.0, 401.0, True), (40.0, math.nan, True)])
def test_broken_means_perplexity_grew_more_than_tenfold(before, after, broken):
    check = HealthCheck(32, before, after, 0.1)
    assert check.broken is broken
    assert ("looks broken" in check.summary()) is broken


def test_prune_records_the_check_with_the_directly_measured_figures(tiny_ckpt, tmp_path, harmful_file, capsys):
    out = tmp_path / "out"
    code, cap = run(capsys, "prune", tiny_ckpt, "-o", out, "--data", harmful_file, "--ratio", "0.5", "--device", "cpu")
    printed = cap.out
    check = manifest(out)["check"]
    assert code == (0 if check["perplexity_ratio"] <= 2.0 else 1)  # the default budget: perplexity x2
    prompts = [e.prompt for e in builtin_part("harmless", CHECK)[:CHECK_SAMPLES]]
    model_before, ppl_before = direct(tiny_ckpt, prompts)
    model_after, ppl_after = direct(out, prompts)
    assert check["prompts"] == CHECK_SAMPLES
    assert check["perplexity_before"] == pytest.approx(ppl_before, rel=1e-6)
    assert check["perplexity_after"] == pytest.approx(ppl_after, rel=1e-6)
    assert check["perplexity_before"] != check["perplexity_after"]  # half of every row zeroed changes the model
    assert check["kl"] == pytest.approx(
        first_token_kl(model_after, model_before, load_tokenizer(out), prompts), rel=1e-5, abs=1e-7
    )
    assert check["broken"] is (ppl_after / ppl_before > 10)
    assert f"perplexity {ppl_before:.2f} -> {ppl_after:.2f}" in printed.replace("\n", " ")
    # The rest of the manifest is intact (the check is added to it, not written instead of it).
    assert manifest(out)["method"] == "antidote-prune" and manifest(out)["output_sha256"]


def test_no_check_and_streamed_leave_no_check(tiny_ckpt, tmp_path, harmful_file, capsys):
    base = ["prune", str(tiny_ckpt), "--data", str(harmful_file), "--device", "cpu"]
    main([*base, "-o", str(tmp_path / "off"), "--no-check"])
    assert "check" not in manifest(tmp_path / "off") and "check on" not in capsys.readouterr().out
    main([*base, "-o", str(tmp_path / "streamed"), "--stream"])
    assert "check" not in manifest(tmp_path / "streamed") and "check skipped: streamed" in capsys.readouterr().out


def test_ablate_runs_the_check(tiny_ckpt, tmp_path, capsys):
    main(["ablate", str(tiny_ckpt), "-o", str(tmp_path / "out"), "--device", "cpu", "--max-samples", "8"])
    check = manifest(tmp_path / "out")["check"]
    assert check["prompts"] == CHECK_SAMPLES and check["kl"] > 0  # the edit moved the first-token distribution


def run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
        raise SystemExit(0)
    return e.value.code, capsys.readouterr()


@pytest.mark.parametrize(
    "after, bar, code",
    [
        (401.0, 20.0, 0),
        (401.0, 10.025, 0),
        (401.0, 10.02, 1),
        (401.0, 5.0, 1),
        (math.nan, 1e9, 1),
        (79.0, None, 0),
        (81.0, None, 1),
    ],
)
def test_perplexity_gate_fails_exactly_past_the_bar(monkeypatch, tiny_ckpt, tmp_path, capsys, after, bar, code):
    """The budget gate: default x2 (None), or --max-perplexity-ratio; the output stays, its manifest says it failed."""
    import surgery.health

    monkeypatch.setattr(
        surgery.health, "health_check", lambda *a, **k: HealthCheck(32, 40.0, after, 0.5, k["max_perplexity_ratio"])
    )
    out = tmp_path / "out"
    bar_args = [] if bar is None else ["--max-perplexity-ratio", bar]
    got, cap = run(capsys, "ablate", tiny_ckpt, "-o", out, "--device", "cpu", "--max-samples", "8", *bar_args)
    assert got == code
    recorded = manifest(out)["check"]["perplexity_after"]  # written and recorded either way
    assert math.isnan(recorded) if math.isnan(after) else recorded == after
    assert ("failed" in manifest(out)) is bool(code) and manifest(out)["check"]["passed"] is (not code)
    failed = [line for line in cap.err.splitlines() if line.startswith("failed:")]
    assert len(failed) == code
    if code and not math.isnan(after):
        assert f"above --max-perplexity-ratio {bar or 2:g}" in failed[0]


def test_perplexity_bar_below_one_is_refused_before_any_work(tiny_ckpt, tmp_path, harmful_file, capsys):
    code, cap = run(
        capsys,
        "prune",
        tiny_ckpt,
        "--data",
        harmful_file,
        "--device",
        "cpu",
        "-o",
        tmp_path / "bad",
        "--max-perplexity-ratio",
        "0.5",
    )
    assert code == 2 and "--max-perplexity-ratio must be at least 1" in cap.err and "Traceback" not in cap.err
    assert not (tmp_path / "bad").exists()
