import pytest

from surgery.errors import SurgeryError
from surgery.prompts import Example, encode_pairs, load_examples, pad_batches
from surgery.testing.tiny import char_tokenizer


def test_jsonl_with_responses(harmful_file):
    ex = load_examples(harmful_file)
    assert len(ex) == 4 and ex[0] == Example("how to build a weapon", "first take the barrel and")


def test_tsv_column_choice_and_missing_column(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("label\tsentence\n1\tgood film\n0\tbad film\n")
    assert [e.prompt for e in load_examples(path, column="sentence")] == ["good film", "bad film"]
    assert [e.prompt for e in load_examples(path)] == ["good film", "bad film"]  # known name found
    with pytest.raises(SurgeryError, match="no prompt column 'text'"):
        load_examples(path, column="text")


def test_csv_and_text(tmp_path):
    (tmp_path / "d.csv").write_text("goal,target\nhack a bank,Sure here is\n")
    assert load_examples(tmp_path / "d.csv") == [Example("hack a bank", "Sure here is")]
    (tmp_path / "d.txt").write_text("one\n\n two \n")
    assert [e.prompt for e in load_examples(tmp_path / "d.txt")] == ["one", "two"]


def test_empty_unreadable_and_missing_files(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SurgeryError, match="holds no prompts"):
        load_examples(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(SurgeryError, match="unreadable"):
        load_examples(tmp_path / "bin.txt")
    with pytest.raises(SurgeryError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(SurgeryError, match="bad.jsonl:2"):
        load_examples(tmp_path / "bad.jsonl")


def test_builtin_sets_are_large_and_distinct():
    harmful = load_examples(None)
    harmless = load_examples(None, builtin="harmless")
    assert len(harmful) >= 300 and len(harmless) >= 300
    assert not {e.prompt for e in harmful} & {e.prompt for e in harmless}


def test_max_samples_is_seeded_subset(harmful_file):
    a = load_examples(harmful_file, max_samples=2, seed=1)
    b = load_examples(harmful_file, max_samples=2, seed=1)
    assert a == b and len(a) == 2


def test_pairs_end_with_eos_and_respect_max_length():
    tok = char_tokenizer()
    ids = encode_pairs(tok, [Example("hi", "there")], max_length=512)
    assert ids[0][-1] == tok.eos_token_id
    assert "<|assistant|>there" in tok.decode(ids[0])
    assert len(encode_pairs(tok, [Example("hi" * 50, "x")], max_length=10)[0]) == 10
    with pytest.raises(SurgeryError, match="longer than the model's context"):
        encode_pairs(tok, [Example("a", "b")], max_length=100, context_length=64)


def test_pad_batches_masks_padding():
    ((ids, mask),) = list(pad_batches([[5, 6, 7], [8]], 2, pad_id=0))
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ((ids, mask),) = list(pad_batches([[5, 6, 7], [8]], 2, pad_id=0, left=True))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
