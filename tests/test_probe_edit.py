import json

import pytest
import torch

from cli.main import main
from surgery.checkpoint import MANIFEST_NAME, open_checkpoint
from surgery.errors import SurgeryError
from surgery.methods.probe_edit import (
    PAPER_FRACTION,
    EditOptions,
    edit_checkpoint,
    gate_tensors,
    plan_edit,
    row_cosines,
)
from surgery.probes.artifact import Probe, ProbeMeta, save_probe
from surgery.testing.tiny import save_tiny_checkpoint, tiny_llama

from .conftest import DTYPES, cli, folder_hashes, make_probe


def tensors(path):
    ckpt = open_checkpoint(path)
    return {n: ckpt.read(n) for n in ckpt.tensors}


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_gate_rows_found_by_name_at_any_depth_and_width(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "m", model=tiny_llama(layers=3, intermediate=48))
    gates = gate_tensors(open_checkpoint(path))
    assert gates == {f"model.layers.{i}.mlp.gate_proj.weight": i for i in range(3)}
    make_probe(path, tmp_path / "p")
    plan, _ = plan_edit(path, tmp_path / "p", EditOptions())
    assert plan.total_rows == 3 * 48
    assert plan.requested == round(PAPER_FRACTION * 3 * 48) == 7


def test_selection_is_the_globally_most_negative_cosines(tiny_ckpt, tmp_path):
    w = make_probe(tiny_ckpt, tmp_path / "p")
    plan, _ = plan_edit(tiny_ckpt, tmp_path / "p", EditOptions(count=20))
    ckpt = open_checkpoint(tiny_ckpt)
    all_cos = {t: row_cosines(ckpt.read(t), w) for t in gate_tensors(ckpt)}
    flat = sorted((c.item(), t, i) for t, cs in all_cos.items() for i, c in enumerate(cs))
    expected = {(t, i) for _, t, i in flat[:20]}
    assert {(t, i) for t, rows in plan.rows.items() for i in rows} == expected
    assert plan.selected == 20
    assert all(c < 0 for cs in plan.cosines.values() for c in cs)  # every selected row opposes the probe
    threshold = max(c for cs in plan.cosines.values() for c in cs)
    unselected = [c.item() for t, cs in all_cos.items() for i, c in enumerate(cs) if (t, i) not in expected]
    assert min(unselected) >= threshold


def test_never_selects_a_row_with_non_negative_cosine(tiny_ckpt, tmp_path):
    w = make_probe(tiny_ckpt, tmp_path / "p")
    plan, _ = plan_edit(tiny_ckpt, tmp_path / "p", EditOptions(fraction=1.0))
    ckpt = open_checkpoint(tiny_ckpt)
    negatives = sum(int((row_cosines(ckpt.read(t), w) < 0).sum()) for t in gate_tensors(ckpt))
    assert plan.requested == plan.total_rows == 128 and plan.selected == negatives < 128
    assert all(c < 0 for cs in plan.cosines.values() for c in cs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_edit_adds_alpha_w_to_selected_rows_only(make_ckpt, tmp_path, dtype):
    src = make_ckpt(dtype=dtype)
    before = folder_hashes(src)
    w = make_probe(src, tmp_path / "p")
    report = edit_checkpoint(src, tmp_path / "p", tmp_path / "out", EditOptions(alpha=0.7, count=10))
    assert folder_hashes(src) == before
    old, new = tensors(src), tensors(tmp_path / "out")
    for name, t in old.items():
        rows = report.plan.rows.get(name, [])
        if not rows:
            assert same_bits(new[name], t), name
            continue
        expected = t.clone()
        expected[rows] = (t[rows].float() + 0.7 * w).to(dtype)  # the paper's edit, computed in fp32
        assert same_bits(new[name], expected), name
        assert (new[name] != t).any(dim=1).nonzero().flatten().tolist() == rows
    assert sum(len(r) for r in report.plan.rows.values()) == 10


def test_fp32_edit_equals_row_plus_alpha_w_exactly(tiny_ckpt, tmp_path):
    w = make_probe(tiny_ckpt, tmp_path / "p")
    report = edit_checkpoint(tiny_ckpt, tmp_path / "p", tmp_path / "out", EditOptions(alpha=1.08, count=5))
    name, rows = next(iter(report.plan.rows.items()))
    old, new = open_checkpoint(tiny_ckpt).read(name), open_checkpoint(tmp_path / "out").read(name)
    for i in rows:
        assert torch.equal(new[i], old[i] + 1.08 * w)
    manifest = (tmp_path / "out" / MANIFEST_NAME).read_text()
    assert '"probe-edit"' in manifest and '"rows_selected": 5' in manifest


@pytest.mark.parametrize("options", [EditOptions(alpha=0.0, count=10), EditOptions(alpha=1.0, count=0)])
def test_alpha_zero_or_count_zero_is_bit_identical(make_ckpt, tmp_path, options):
    src = make_ckpt(dtype=torch.bfloat16)
    make_probe(src, tmp_path / "p")
    edit_checkpoint(src, tmp_path / "p", tmp_path / "out", options)
    old, new = tensors(src), tensors(tmp_path / "out")
    assert old.keys() == new.keys() and all(same_bits(old[n], new[n]) for n in old)


def test_negative_alpha_moves_rows_the_other_way(tiny_ckpt, tmp_path):
    w = make_probe(tiny_ckpt, tmp_path / "p")
    up = edit_checkpoint(tiny_ckpt, tmp_path / "p", tmp_path / "up", EditOptions(alpha=0.5, count=8))
    down = edit_checkpoint(tiny_ckpt, tmp_path / "p", tmp_path / "down", EditOptions(alpha=-0.5, count=8))
    assert up.plan.rows == down.plan.rows  # the selection does not depend on alpha
    old, a, b = tensors(tiny_ckpt), tensors(tmp_path / "up"), tensors(tmp_path / "down")
    for name, rows in up.plan.rows.items():
        assert torch.allclose(a[name][rows] - old[name][rows], 0.5 * w.expand(len(rows), -1), atol=1e-6)
        assert torch.allclose(b[name][rows] - old[name][rows], -0.5 * w.expand(len(rows), -1), atol=1e-6)


def test_probe_from_another_model_is_refused(tiny_ckpt, tmp_path):
    other = save_tiny_checkpoint(tmp_path / "other", model=tiny_llama(hidden=48, intermediate=96))
    make_probe(other, tmp_path / "p")
    with pytest.raises(SurgeryError, match="different model"):
        plan_edit(tiny_ckpt, tmp_path / "p", EditOptions())


def test_probe_of_another_width_is_refused(tiny_ckpt, tmp_path):
    make_probe(tiny_ckpt, tmp_path / "p", hidden=16)  # right fingerprint, wrong width: not the residual stream
    with pytest.raises(SurgeryError, match="residual stream"):
        plan_edit(tiny_ckpt, tmp_path / "p", EditOptions())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--count", "3", "--fraction", "0.1"], "not both"),
        (["--count", "-1"], "--count must be"),
        (["--count", "999"], "more than the model's 128"),
        (["--fraction", "2"], "--fraction must be"),
    ],
)
def test_cli_errors_are_one_line_and_write_nothing(tiny_ckpt, tmp_path, capsys, extra, message):
    make_probe(tiny_ckpt, tmp_path / "p")
    out = tmp_path / "out"
    code, _, err = cli(["edit", str(tiny_ckpt), "--probe", str(tmp_path / "p"), "-o", str(out), *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_cli_bad_probe_folder_and_other_model(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "empty").mkdir()  # not tmp_path itself: an output inside a folder option is refused first
    code, _, err = cli(
        ["edit", str(tiny_ckpt), "--probe", str(tmp_path / "empty"), "-o", str(tmp_path / "out")], capsys
    )
    assert code == 2 and "not a probe folder" in err and not (tmp_path / "out").exists()
    other = save_tiny_checkpoint(tmp_path / "other", model=tiny_llama(layers=3))
    make_probe(other, tmp_path / "p")
    code, _, err = cli(["edit", str(tiny_ckpt), "--probe", str(tmp_path / "p"), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "different model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_dry_run_lists_rows_per_layer_and_writes_nothing(tiny_ckpt, tmp_path, capsys):
    make_probe(tiny_ckpt, tmp_path / "p")
    before = set(tmp_path.iterdir())
    main(["edit", str(tiny_ckpt), "--probe", str(tmp_path / "p"), "--count", "12", "--dry-run"])
    cap = capsys.readouterr().out
    plan, _ = plan_edit(tiny_ckpt, tmp_path / "p", EditOptions(count=12))
    for layer, n in plan.per_layer().items():
        assert f"| {layer} |" in cap and f"{n}" in cap  # a Markdown table: output captured, not a terminal
    assert sum(plan.per_layer().values()) == 12 and "12 of 128 gate rows" in cap
    assert set(tmp_path.iterdir()) == before


def test_plan_reports_the_step_relative_to_the_selected_rows(tiny_ckpt, tmp_path, capsys):
    w = make_probe(tiny_ckpt, tmp_path / "p")
    plan, _ = plan_edit(tiny_ckpt, tmp_path / "p", EditOptions(count=10))
    ckpt = open_checkpoint(tiny_ckpt)
    norms = torch.cat([ckpt.read(t)[torch.tensor(r)].norm(dim=1) for t, r in plan.rows.items()])
    assert plan.probe_norm == pytest.approx(float(w.norm()))
    assert plan.mean_row_norm == pytest.approx(float(norms.mean()))
    assert plan.relative_step(-2.0) == pytest.approx(2.0 * float(w.norm()) / float(norms.mean()))
    main(["edit", str(tiny_ckpt), "--probe", str(tmp_path / "p"), "--count", "10", "--alpha", "2", "--dry-run"])
    assert f"{100 * plan.relative_step(2.0):.1f}% of the selected rows' mean norm" in capsys.readouterr().out


# --- the gate check (the paper's Fig. 2) and --centre, on a hand-built model ------------------------------------------
UNDESIRED, DESIRED = "#$%&", "@^_~"  # characters the built-in request sets never use


def hand_built(path, betas=(-0.8, -0.4, 0.4, 0.8)):
    """A 1-layer Llama whose gate_proj inputs are known: attention and MLP write nothing (o_proj, down_proj = 0), so
    every gate reads RMSNorm(embedding). Embeddings: e0 for every token, e0 + e1 for UNDESIRED characters, e0 - e1
    for DESIRED ones, so the gate input is 4(e0 + e1), 4(e0 - e1), or sqrt(32)·e0. Gate rows 0..3 are -e1 + beta·e0
    (they oppose a probe along e1); every other row is e2 (cosine 0: never selected)."""
    from surgery.testing.tiny import char_tokenizer

    model = tiny_llama(layers=1)
    vocab = char_tokenizer().get_vocab()
    e = torch.eye(32)
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = e[0]
        for chars, sign in ((UNDESIRED, 1), (DESIRED, -1)):
            for ch in chars:
                model.model.embed_tokens.weight[vocab[ch]] = e[0] + sign * e[1]
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        layer.mlp.gate_proj.weight[:] = e[2]
        for i, beta in enumerate(betas):
            layer.mlp.gate_proj.weight[i] = -e[1] + beta * e[0]
    return save_tiny_checkpoint(path, model=model)


def direction_probe(ckpt_path, folder, w):
    ckpt = open_checkpoint(ckpt_path)
    meta = ProbeMeta(
        fingerprint=ckpt.fingerprint(),
        model=str(ckpt_path),
        layer=1,
        num_layers=1,
        hidden_size=32,
        pooling="mean",
        chat=False,
        labels=["desired", "undesired"],
    )
    save_probe(Probe(torch.stack([torch.zeros(32), w]), torch.zeros(2), meta), folder)
    return folder


def check_files(tmp_path):
    pos, neg = tmp_path / "undesired.txt", tmp_path / "desired.txt"
    pos.write_text("\n".join(UNDESIRED * (i + 1) for i in range(6)) + "\n")
    neg.write_text("\n".join(DESIRED * (i + 1) for i in range(6)) + "\n")
    return pos, neg


@pytest.mark.parametrize(
    "alpha, shares",
    [
        (
            1.0,
            {"undesired": (0.0, 1.0), "desired": (1.0, 0.0)},
        ),  # w = 2 e1: undesired gates 4(2a - 1 + b), desired 4(1 - 2a + b)
        (0.5, {"undesired": (0.0, 0.5), "desired": (1.0, 0.5)}),  # both 4b: the rows with b > 0 open
        (0.0, {"undesired": (0.0, 0.0), "desired": (1.0, 1.0)}),
    ],
)
def test_gate_check_reports_the_planted_shares(tmp_path, alpha, shares):
    model = hand_built(tmp_path / "m")
    probe = direction_probe(model, tmp_path / "p", 2 * torch.eye(32)[1])
    pos, neg = check_files(tmp_path)
    report = edit_checkpoint(
        model,
        probe,
        tmp_path / "out",
        EditOptions(alpha=alpha, count=4, check_positive=str(pos), check_negative=str(neg)),
    )
    assert report.plan.rows == {"model.layers.0.mlp.gate_proj.weight": [0, 1, 2, 3]}
    check = report.plan.gate_check
    for kind, (before, after) in shares.items():
        assert (check.before[kind].share, check.after[kind].share) == (before, after), kind
        assert check.before[kind].pairs == 4 * 4 * sum(range(1, 7))  # every token of 6 lines, 4 selected rows
    assert check.offset_and_gap() == pytest.approx((8.0, 16.0), rel=1e-4)  # w·h: +8 undesired, -8 desired
    assert check.warning() is None
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["report"]
    assert manifest["gate_check"]["after"]["undesired"]["active_share"] == shares["undesired"][1]
    assert manifest["gate_check"]["warning"] is None and manifest["paper_equivalent_alpha"] == 2 * alpha


def test_gate_check_warns_when_the_edit_opens_desired_gates_more(tmp_path):
    model = hand_built(tmp_path / "m")
    probe = direction_probe(model, tmp_path / "p", 2 * torch.eye(32)[1])
    pos, neg = check_files(tmp_path)  # swapped below: the "undesired" inputs are the ones the probe reads as desired
    report = edit_checkpoint(
        model,
        probe,
        tmp_path / "out",
        EditOptions(alpha=1.0, count=4, check_positive=str(neg), check_negative=str(pos)),
    )
    warning = report.plan.gate_check.warning()
    assert "opens fewer gates on undesired inputs (-100.0 pts) than on desired ones (+100.0 pts)" in warning
    assert json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["report"]["gate_check"]["warning"] == warning


def test_centre_removes_the_generic_offset_that_the_check_warns_about(tmp_path):
    """w = 2 e1 + 8 e0: every token's gate input has an e0 part, so w·h is +40 on undesired, +24 on desired text,
    a generic offset larger than the class gap (16). --centre projects out the mean gate input on built-in harmless
    text (sqrt(32)·e0: none of its characters is planted), leaving 2 e1."""
    e = torch.eye(32)
    model = hand_built(tmp_path / "m", betas=(-0.8, -0.6, -0.4, -0.2))  # rows still oppose w: cos ~ -2 + 8b < 0
    probe = direction_probe(model, tmp_path / "p", 2 * e[1] + 8 * e[0])
    pos, neg = check_files(tmp_path)
    files = dict(check_positive=str(pos), check_negative=str(neg))
    plain = edit_checkpoint(model, probe, tmp_path / "plain", EditOptions(alpha=0.25, count=4, **files))
    offset, gap = plain.plan.gate_check.offset_and_gap()
    assert (offset, gap) == pytest.approx(
        (24.0, 16.0), rel=1e-4
    ) and "exceeds the class gap" in plain.plan.gate_check.warning()
    centred = edit_checkpoint(
        model, probe, tmp_path / "centred", EditOptions(alpha=0.25, count=4, centre=True, **files)
    )
    assert centred.plan.rows == plain.plan.rows  # the selection is the paper's: by the uncentred w
    assert centred.plan.gate_check.offset_and_gap() == pytest.approx((8.0, 16.0), rel=1e-4)
    assert centred.plan.gate_check.warning() is None and centred.plan.centred_norms == {0: pytest.approx(2.0, abs=1e-5)}
    name = "model.layers.0.mlp.gate_proj.weight"
    old, new = open_checkpoint(model).read(name), open_checkpoint(tmp_path / "centred").read(name)
    assert torch.allclose(new[:4], old[:4] + 0.25 * 2 * e[1], atol=1e-5) and torch.equal(new[4:], old[4:])
    manifest = json.loads((tmp_path / "centred" / MANIFEST_NAME).read_text())
    assert manifest["arguments"]["centre"] is True and manifest["report"]["centred_direction_norms"][
        "0"
    ] == pytest.approx(2.0, abs=1e-5)


@pytest.mark.parametrize("centre", [False, True])
def test_alpha_zero_with_the_gate_check_and_centre_is_bit_identical(make_ckpt, tmp_path, centre):
    src = make_ckpt(dtype=torch.bfloat16)
    make_probe(src, tmp_path / "p")
    report = edit_checkpoint(src, tmp_path / "p", tmp_path / "out", EditOptions(alpha=0.0, count=10, centre=centre))
    old, new = tensors(src), tensors(tmp_path / "out")
    assert old.keys() == new.keys() and all(same_bits(old[n], new[n]) for n in old)
    check = report.plan.gate_check
    assert check.after["undesired"].share == check.before["undesired"].share and check.before["undesired"].pairs > 0


def test_dry_run_measures_the_gate_check_only_when_check_files_are_named(tmp_path, capsys):
    model = hand_built(tmp_path / "m")
    probe = direction_probe(model, tmp_path / "p", 2 * torch.eye(32)[1])
    pos, neg = check_files(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    main(["edit", str(model), "--probe", str(probe), "--count", "4", "--alpha", "1", "--dry-run", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "not measured by a header-only dry run" in out and "paper-equivalent alpha 2" in out
    main(
        [
            "edit",
            str(model),
            "--probe",
            str(probe),
            "--count",
            "4",
            "--alpha",
            "0.5",
            "--dry-run",
            "--device",
            "cpu",
            "--check-positive",
            str(pos),
            "--check-negative",
            str(neg),
        ]
    )
    cap = capsys.readouterr()
    lines = [line for line in cap.out.splitlines() if "undesired (6)" in line or "desired (6)" in line]
    assert len(lines) == 2 and "0.000 | 0.500 | +50.0 pts" in lines[0] and "1.000 | 0.500 | -50.0 pts" in lines[1]
    assert "warning" not in cap.err and sorted(tmp_path.rglob("*")) == before


def test_edit_prints_the_gate_check_and_its_warning(tmp_path, capsys):
    model = hand_built(tmp_path / "m")
    probe = direction_probe(model, tmp_path / "p", 2 * torch.eye(32)[1])
    pos, neg = check_files(tmp_path)
    main(
        [
            "edit",
            str(model),
            "--probe",
            str(probe),
            "--count",
            "4",
            "--alpha",
            "1",
            "--device",
            "cpu",
            "--no-check",
            "-o",
            str(tmp_path / "out"),
            "--check-positive",
            str(neg),
            "--check-negative",
            str(pos),
        ]
    )
    cap = capsys.readouterr()
    assert "selected gates open" in cap.out and "paper-equivalent alpha 2" in cap.out
    warnings = [line for line in cap.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "the mechanism of the paper (Fig. 2) is off" in warnings[0]
