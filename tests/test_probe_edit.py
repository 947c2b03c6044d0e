import pytest
import torch

from cli.main import main
from probes.artifact import Probe, ProbeMeta, save_probe
from surgery.checkpoint import MANIFEST_NAME, open_checkpoint
from surgery.errors import SurgeryError
from surgery.methods.probe_edit import PAPER_FRACTION, EditOptions, edit_checkpoint, gate_tensors, plan_edit, row_cosines
from surgery.testing.tiny import save_tiny_checkpoint, tiny_llama

from .conftest import DTYPES, folder_hashes


def make_probe(ckpt_path, folder, seed=0, hidden=None):
    """A probe artifact with a random undesired row, stamped with the checkpoint's fingerprint."""
    ckpt = open_checkpoint(ckpt_path)
    hidden = hidden or ckpt.config["hidden_size"]
    w = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    meta = ProbeMeta(fingerprint=ckpt.fingerprint(), model=str(ckpt_path), layer=ckpt.config["num_hidden_layers"],
                     num_layers=ckpt.config["num_hidden_layers"], hidden_size=hidden, pooling="mean", chat=False,
                     labels=["non-toxic", "toxic"])
    save_probe(Probe(torch.stack([torch.zeros(hidden), w]), torch.tensor([0.0, 0.3]), meta), folder)
    return w


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


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr()


@pytest.mark.parametrize("extra, message", [
    (["--count", "3", "--fraction", "0.1"], "not both"),
    (["--count", "-1"], "--count must be"),
    (["--count", "999"], "more than the model's 128"),
    (["--fraction", "2"], "--fraction must be"),
])
def test_cli_errors_are_one_line_and_write_nothing(tiny_ckpt, tmp_path, capsys, extra, message):
    make_probe(tiny_ckpt, tmp_path / "p")
    out = tmp_path / "out"
    code, cap = run_cli(["edit", str(tiny_ckpt), "--probe", str(tmp_path / "p"), "-o", str(out), *extra], capsys)
    assert code == 2 and message in cap.err and len(cap.err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_cli_bad_probe_folder_and_other_model(tiny_ckpt, tmp_path, capsys):
    code, cap = run_cli(["edit", str(tiny_ckpt), "--probe", str(tmp_path), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "not a probe folder" in cap.err and not (tmp_path / "out").exists()
    other = save_tiny_checkpoint(tmp_path / "other", model=tiny_llama(layers=3))
    make_probe(other, tmp_path / "p")
    capsys.readouterr()  # drop transformers' save progress bar
    code, cap = run_cli(["edit", str(tiny_ckpt), "--probe", str(tmp_path / "p"), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "different model" in cap.err and len(cap.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_dry_run_lists_rows_per_layer_and_writes_nothing(tiny_ckpt, tmp_path, capsys):
    make_probe(tiny_ckpt, tmp_path / "p")
    before = set(tmp_path.iterdir())
    main(["edit", str(tiny_ckpt), "--probe", str(tmp_path / "p"), "--count", "12", "--dry-run"])
    cap = capsys.readouterr().out
    plan, _ = plan_edit(tiny_ckpt, tmp_path / "p", EditOptions(count=12))
    for layer, n in plan.per_layer().items():
        assert f"│ {layer}" in cap and f"{n}" in cap
    assert sum(plan.per_layer().values()) == 12 and "12 of 128 gate_proj rows" in cap
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
