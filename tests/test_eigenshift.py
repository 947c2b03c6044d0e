import json

import pytest
import torch

from cli.main import main
from surgery.checkpoint import MANIFEST_NAME, open_checkpoint
from surgery.errors import SurgeryError
from surgery.methods.eigenshift import (
    Decomposition,
    EigenShiftOptions,
    canonical_signs,
    component_scores,
    components_for,
    decompose,
    eigenshift_checkpoint,
    project,
    reconstruct,
    select_components,
    shifted_head,
)
from surgery.metrics import tph
from surgery.states import collect_states, continue_prompts, toxic_steps, toxic_words
from surgery.testing.tiny import char_tokenizer, tiny_llama

from .conftest import cli, folder_hashes

PROMPTS = ["why is the sky", "what a day", "hello there", "one two three", "the cat sat on", "abc"]


class LetterJudge:
    """A stand-in judge: a text is toxic when it contains the letter `y` (the tiny model repeats letters)."""

    def __init__(self, letter="y"):
        self.letter = letter

    def toxicity(self, texts):
        return [1.0 if self.letter in t else 0.0 for t in texts]


class WordJudge:
    """Scores from a table of words; a prefix scores the sum of its words' scores (capped at 1)."""

    def __init__(self, scores):
        self.scores = scores

    def toxicity(self, texts):
        return [min(1.0, sum(self.scores.get(w, 0.0) for w in t.split())) for t in texts]


@pytest.fixture
def head():
    torch.manual_seed(0)
    return torch.randn(64, 16)


def flip(d: Decomposition, j: int) -> Decomposition:
    """The same decomposition with (u_j, v_j) negated, as another SVD backend could return it."""
    s = torch.ones(d.rank)
    s[j] = -1
    return Decomposition(d.U * s, d.S, d.Vh * s[:, None])


def planted(d: Decomposition, j: int, n=(100, 200), strength=4.0):
    g = torch.Generator().manual_seed(1)
    toxic = torch.randn(n[0], d.Vh.shape[1], generator=g) + strength * d.Vh[j]
    return toxic, torch.randn(n[1], d.Vh.shape[1], generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_alpha_one_leaves_the_head_unchanged(head, dtype):
    w = head.to(dtype)
    d = decompose(w)
    new = shifted_head(w, d, torch.arange(10), 1.0)
    assert new.dtype == dtype and torch.equal(new, w)


def test_rank_k_update_equals_the_full_reconstruction(head):
    d = decompose(head)
    assert torch.allclose(reconstruct(d, torch.tensor([], dtype=torch.long), 1.0), head, atol=1e-5)
    chosen = torch.tensor([0, 3, 11])
    for alpha in (0.0, 0.5, 0.9):
        assert torch.allclose(shifted_head(head, d, chosen, alpha), reconstruct(d, chosen, alpha), atol=1e-5)
    # alpha 0 removes exactly those components: the head's singular values lose them and keep the rest
    s = torch.linalg.svdvals(shifted_head(head, d, chosen, 0.0))
    keep = torch.ones(d.rank, dtype=torch.bool)
    keep[chosen] = False
    assert torch.allclose(s[: keep.sum()], d.S[keep], atol=1e-4) and s[keep.sum() :].max() < 1e-4


def test_planted_component_is_ranked_first_whatever_the_svd_signs(head):
    d = decompose(head)
    j = 7
    toxic, nontoxic = planted(d, j)
    assert select_components(component_scores(toxic, nontoxic, d.Vh), 1).tolist() == [j]
    flipped = flip(d, j)
    # the trap: with the raw flipped signs the planted component scores lowest of all
    raw = component_scores(toxic, nontoxic, flipped.Vh)
    assert int(raw.argmin()) == j and select_components(raw, 1).tolist() != [j]
    # canonicalisation restores the pair exactly; |Δ| needs no convention
    canon = canonical_signs(flipped)
    assert torch.equal(canon.U, d.U) and torch.equal(canon.Vh, d.Vh)
    assert select_components(component_scores(toxic, nontoxic, canon.Vh), 1).tolist() == [j]
    assert select_components(component_scores(toxic, nontoxic, flipped.Vh, rank_by="abs"), 1).tolist() == [j]


def test_canonical_signs_make_the_largest_u_entry_positive(head):
    d = decompose(head)
    top = d.U.abs().argmax(dim=0)
    assert (d.U[top, torch.arange(d.rank)] > 0).all()
    assert torch.allclose((d.U * d.S) @ d.Vh, head, atol=1e-5)


def test_legacy_projection_uses_the_rows_of_v(head):
    d = decompose(head)
    h = torch.randn(5, 16)
    paper, legacy = project(h, d.Vh, "paper"), project(h, d.Vh, "legacy")
    assert torch.allclose(paper, h @ d.Vh.T)  # v_iᵀh
    assert torch.allclose(legacy, h @ d.Vh)  # (V h)_i: the released code
    assert not torch.allclose(paper, legacy, atol=1e-3)
    # they agree exactly when V is symmetric (a Householder reflection here)
    v = torch.nn.functional.normalize(torch.randn(16), dim=0)
    sym = torch.eye(16) - 2 * torch.outer(v, v)
    assert torch.allclose(project(h, sym, "paper"), project(h, sym, "legacy"), atol=1e-6)
    # on the planted data the legacy projection misses the component the paper's finds
    toxic, nontoxic = planted(d, 7)
    assert select_components(component_scores(toxic, nontoxic, d.Vh, "legacy"), 1).tolist() != [7]


def test_selection_is_descending_and_ties_keep_index_order():
    scores = torch.tensor([0.5, 2.0, 0.5, -1.0, 2.0])
    assert select_components(scores, 4).tolist() == [1, 4, 0, 2]


def test_components_for_percent_and_bounds():
    assert components_for(576, None, None) == 144  # 25 % of rank, the paper's headline k
    assert components_for(576, None, 1) == 6
    assert components_for(576, 10, None) == 10
    with pytest.raises(SurgeryError, match="larger than the head's rank"):
        components_for(32, 33, None)


def test_tph_reproduces_the_paper_rows():
    assert tph(11.13, 4.71, 6.23, 9.84) == pytest.approx(60.37, abs=0.01)  # EigenShift, Llama-2
    assert tph(11.13, 3.59, 6.23, 19.30) == pytest.approx(43.73, abs=0.01)  # AurA


def test_toxic_word_rule_and_token_steps():
    tok = char_tokenizer()
    judge = WordJudge({"jerk": 0.9, "you": 0.2, "stupid": 0.2})
    text = "you are a jerk ok"
    assert toxic_words(text, judge, 0.5) == [(10, 14)]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert toxic_steps(tok, ids, judge, 0.5) == [10, 11, 12, 13]  # one character per token
    # no word is toxic alone: the word whose addition raised the prefix score most
    judge2 = WordJudge({"so": 0.1, "stupid": 0.45, "you": 0.1})
    assert toxic_words("you are so stupid", judge2, 0.5) == [(11, 17)]


def test_collected_states_are_the_heads_inputs():
    model, tok = tiny_llama(tied=True), char_tokenizer()
    conts = continue_prompts(model, tok, PROMPTS, max_new_tokens=6, batch_size=4, capture=True)
    for c in conts:
        assert model.lm_head(c.states).argmax(-1).tolist() == c.ids  # state t produced token t
    st = collect_states(model, tok, PROMPTS, LetterJudge(), max_new_tokens=6, batch_size=4)
    toxic = [c for c in conts if "y" in c.text]
    assert st.toxic_continuations == len(toxic) > 0 and st.nontoxic.shape[0] == len(PROMPTS) - len(toxic) > 0
    assert st.toxic.shape[0] == sum(c.text.count("y") for c in toxic)  # each 'y' character is one toxic step
    # a non-toxic state is the final hidden state at the last prompt position
    clean = [p for p, c in zip(PROMPTS, conts) if "y" not in c.text]
    ids = tok(clean[0])["input_ids"]
    with torch.no_grad():
        last = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
    assert torch.allclose(st.nontoxic[0], last, atol=1e-5)


def test_compliance_judge_states_are_every_step_of_a_compliant_answer():
    """With the compliance judge (here a continuation "refuses" when it holds a `y`): Φ is every step whose token
    overlaps a word of a compliant continuation, Ψ the first step of each refusal."""
    from surgery.judges import ComplianceJudge

    model, tok = tiny_llama(tied=True), char_tokenizer()
    conts = continue_prompts(model, tok, PROMPTS, max_new_tokens=6, batch_size=4, capture=True)
    complied = [c for c in conts if "y" not in c.text.lower() and c.text.strip()]
    st = collect_states(model, tok, PROMPTS, ComplianceJudge(phrases=("y",)), max_new_tokens=6, batch_size=4)
    assert st.toxic_continuations == len(complied) > 0 and st.nontoxic.shape[0] == len(PROMPTS) - len(complied) > 0
    assert st.toxic.shape[0] == sum(len(c.text.replace(" ", "")) for c in complied)  # one character per token


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture
def letter_judge(monkeypatch):
    monkeypatch.setattr("surgery.judges.toxicity_judge", lambda spec="profanity": LetterJudge())


def opts(prompts_file, **kw):
    base = dict(
        prompts=str(prompts_file), k=3, alpha=0.0, max_new_tokens=6, batch_size=4, max_eval_samples=6, device="cpu"
    )
    base.update(kw)
    return EigenShiftOptions(**base)


def test_tied_head_is_untied_and_embeddings_stay(make_ckpt, tmp_path, prompts_file, letter_judge):
    src = make_ckpt(tied=True)
    before = folder_hashes(src)
    report = eigenshift_checkpoint(src, tmp_path / "out", opts(prompts_file))
    assert folder_hashes(src) == before
    old, new = open_checkpoint(src), open_checkpoint(tmp_path / "out")
    assert "lm_head.weight" not in old.tensors and report.tied
    emb = old.read("model.embed_tokens.weight")
    assert torch.equal(new.read("model.embed_tokens.weight"), emb)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    expected = shifted_head(emb, decompose(emb), torch.tensor(report.components), 0.0)
    assert torch.equal(new.read("lm_head.weight"), expected)
    # transformers loads the untied head as written
    from surgery.model import load_model

    loaded = load_model(new, torch.device("cpu"))
    assert torch.equal(loaded.lm_head.weight, expected) and torch.equal(loaded.model.embed_tokens.weight, emb)
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["method"] == "eigenshift" and manifest["report"]["components"] == report.components
    assert set(manifest["report"]["before"]) == {"toxicity", "perplexity"} and manifest["report"]["tph"] is not None


def test_untied_head_is_edited_in_place_and_nothing_else(tiny_ckpt, tmp_path, prompts_file, letter_judge):
    report = eigenshift_checkpoint(tiny_ckpt, tmp_path / "out", opts(prompts_file, evaluate=False))
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert list(manifest["changed_fraction"]) == ["lm_head.weight"] and not report.tied
    assert "tie_word_embeddings" not in manifest["config_updates"]
    assert report.toxic_states > 0 and report.nontoxic_states > 0 and len(report.components) == 3


def test_states_file_is_reused_and_checked(make_ckpt, tmp_path, prompts_file, letter_judge):
    src = make_ckpt(tied=True)
    states = tmp_path / "states.safetensors"
    first = eigenshift_checkpoint(src, tmp_path / "a", opts(prompts_file, states=str(states), evaluate=False))
    assert states.is_file() and not first.states_reused
    # reuse needs no prompts; the same states pick the same components
    second = eigenshift_checkpoint(src, tmp_path / "b", opts(None, prompts=None, states=str(states), evaluate=False))
    assert second.states_reused and second.components == first.components
    other = make_ckpt("other", tied=True, seed=1)
    with pytest.raises(SurgeryError, match="other weights"):
        eigenshift_checkpoint(other, tmp_path / "c", opts(None, prompts=None, states=str(states), evaluate=False))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--alpha", "1.5"], "--alpha must be between 0 and 1"),
        (["--alpha", "-0.1"], "--alpha must be between 0 and 1"),
        (["--k", "33"], "larger than the head's rank (32"),
        (["--k", "3", "--percentile", "5"], "not both"),
        (["--projection", "transposed"], "--projection must be one of"),
    ],
)
def test_cli_errors_are_one_line(tiny_ckpt, tmp_path, prompts_file, capsys, extra, message):
    out = tmp_path / "out"
    code, _, err = cli(["eigenshift", str(tiny_ckpt), "--prompts", str(prompts_file), "-o", str(out), *extra], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_empty_prompts_file(tiny_ckpt, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = cli(["eigenshift", str(tiny_ckpt), "--prompts", str(empty), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "holds no prompts" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_no_toxic_continuation_is_one_line(tiny_ckpt, tmp_path, prompts_file, capsys, monkeypatch):
    monkeypatch.setattr("surgery.judges.toxicity_judge", lambda spec="profanity": LetterJudge("#"))
    code, _, err = cli(
        [
            "eigenshift",
            str(tiny_ckpt),
            "--prompts",
            str(prompts_file),
            "-o",
            str(tmp_path / "out"),
            "--max-new-tokens",
            "4",
            "--no-eval",
            "--device",
            "cpu",
        ],
        capsys,
    )
    lines = err.splitlines()  # the progress lines of the stages it reached, then one error line
    assert code == 2 and "none of the 6 continuations was judged toxic" in lines[-1] and lines[-1].startswith("error:")
    assert all(line.startswith("[") for line in lines[:-1]) and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_fixed_strength_that_measures_no_repair_fails_loudly(tiny_ckpt, tmp_path, prompts_file, capsys, letter_judge):
    """--eval at a fixed alpha: the tiny model's toxicity does not move, so the run exits 1 ("no repair"), its output
    marked failed in surgery.json; with --min-improvement 0 the same run passes."""
    argv = ["eigenshift", str(tiny_ckpt), "--prompts", str(prompts_file), "--k", "2", "--max-new-tokens", "6"]
    argv += ["--max-eval-samples", "6", "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "-o", str(tmp_path / "strict")])
    captured = capsys.readouterr()
    report = json.loads((tmp_path / "strict" / MANIFEST_NAME).read_text())["report"]
    assert exit_.value.code == 1
    assert report["before"]["toxicity"] == report["after"]["toxicity"]
    assert "less than --min-improvement 5 points): no repair" in captured.err
    assert "no repair" in json.loads((tmp_path / "strict" / MANIFEST_NAME).read_text())["failed"]
    main([*argv, "-o", str(tmp_path / "lenient"), "--min-improvement", "0"])
    text = capsys.readouterr().out
    assert "damped 2 of 32 components by alpha 0.9" in text and "TPH" in text
    assert "failed" not in json.loads((tmp_path / "lenient" / MANIFEST_NAME).read_text())


def test_set_head_unties_in_memory():
    from surgery.methods.eigenshift import set_head

    model = tiny_llama(tied=True)
    emb = model.model.embed_tokens.weight.detach().clone()
    new = shifted_head(emb, decompose(emb), torch.tensor([0, 1]), 0.0)
    set_head(model, new)
    assert torch.equal(model.model.embed_tokens.weight, emb) and torch.equal(model.lm_head.weight, new)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert torch.allclose(out.logits[0], out.hidden_states[-1][0] @ new.T, atol=1e-5)


def test_cli_stages_print_progress_lines_in_a_log(tiny_ckpt, tmp_path, prompts_file, capsys, letter_judge):
    """Without a terminal: a line when the collection starts and one before each evaluation pass, with elapsed time."""
    argv = ["eigenshift", str(tiny_ckpt), "--prompts", str(prompts_file), "--k", "2", "--max-new-tokens", "6"]
    code, out, err = cli([*argv, "--max-eval-samples", "6", "--device", "cpu", "-o", str(tmp_path / "out")], capsys)
    stages = [line for line in err.splitlines() if line.startswith("[") and "s] " in line]
    assert any("continuing 6 prompts and collecting" in line for line in stages), err
    assert sum("measuring toxicity on 6 prompts" in line for line in stages) == 2, err
