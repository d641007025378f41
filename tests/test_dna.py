"""DNA: the character-level tokenizer, FASTA and GenomicsBenchmarks-style folders (one-line errors), FASTA
prepared into token shards for pretraining, the generated long-range task, and the classifier (padding
never reaches a real base; a pretrained language model's backbone loads into it). Training under data
parallelism and its exact resume: test_beyond_language."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from titans_scale.data.dna import MotifTask, dna_tokenizer, read_class_folders, read_fasta
from titans_scale.data.errors import DataError
from titans_scale.memory import MemoryConfig
from titans_scale.models import ModelConfig, build_model
from titans_scale.models.classify import SequenceClassifier


@pytest.fixture(scope="module")
def dna_tok(tmp_path_factory):
    return dna_tokenizer(tmp_path_factory.mktemp("dna") / "tokenizer-dna.model")


def test_tokenizer_is_one_token_per_base_and_the_same_file_everywhere(dna_tok, tmp_path):
    assert dna_tok.vocab_size == 8 and (dna_tok.bos_id, dna_tok.eos_id) == (1, 2)
    assert dna_tok.encode("ACGTN") == [3, 4, 5, 6, 7] and dna_tok.decode([5, 3, 7]) == "GAN"
    assert dna_tokenizer(tmp_path / "again.model").sha256 == dna_tok.sha256  # rebuilt: byte-identical


def test_fasta_records_upper_case_pieces_and_gz(tmp_path):
    text = ">chr1 some description\nACGTacgt\nNNAC\n\n>chr2\nGGGG\n"
    (tmp_path / "a.fa").write_text(text)
    assert list(read_fasta(tmp_path / "a.fa")) == [("chr1:0", "ACGTACGTNNAC"), ("chr2:0", "GGGG")]
    assert list(read_fasta(tmp_path / "a.fa", piece=5)) == [("chr1:0", "ACGTA"), ("chr1:5", "CGTNN"), ("chr1:10", "AC"),
                                                             ("chr2:0", "GGGG")]
    with gzip.open(tmp_path / "b.fasta.gz", "wt") as f:
        f.write(text)
    assert list(read_fasta(tmp_path / "b.fasta.gz")) == list(read_fasta(tmp_path / "a.fa"))


def test_fasta_errors_are_one_line(tmp_path):
    (tmp_path / "bad.fa").write_text(">chr1\nACGT\nACRT\n")
    with pytest.raises(DataError) as err:
        list(read_fasta(tmp_path / "bad.fa"))
    assert str(err.value).startswith(f"FASTA file {tmp_path / 'bad.fa'} line 3: unexpected character 'R' at column 3; "
                                     f"DNA files may hold only A, C, G, T and N")
    (tmp_path / "empty.fa").write_text(">chr1\n\n")
    with pytest.raises(DataError, match="holds no bases"):
        list(read_fasta(tmp_path / "empty.fa"))


def test_class_folders(tmp_path):
    for cls, seqs in (("positive", ["ACGT", "ccgg\nAA"]), ("negative", ["TTTT"])):
        for i, seq in enumerate(seqs):
            (tmp_path / "train" / cls).mkdir(parents=True, exist_ok=True)
            (tmp_path / "train" / cls / f"{i}.txt").write_text(seq + "\n")
    (tmp_path / "train" / "negative" / "more.fa").write_text(">a\nGG\n>b\nCC\n")
    read = read_class_folders(tmp_path / "train")
    assert read.classes == ["negative", "positive"]  # labels in sorted folder order
    assert read.sequences == ["TTTT", "GG", "CC", "ACGT", "CCGGAA"]  # files in name order and read.labels.tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(DataError, match="has the classes negative, positive, the model was trained on a, b"):
        read_class_folders(tmp_path / "train", ["a", "b"])
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DataError) as err:
        read_class_folders(tmp_path / "train")
    assert str(err.value) == (f"class folder {tmp_path / 'train' / 'empty'} holds no sequences (no non-empty files); add "
                              f"its sequences or remove the folder")
    (tmp_path / "train" / "empty" / "x.txt").write_text("ACGU\n")
    with pytest.raises(DataError, match=r"sequence file .*x.txt: unexpected character 'U' at column 4"):
        read_class_folders(tmp_path / "train")


def test_motif_task_class_counts_the_first_motif_in_both_slots():
    task = MotifTask(length=128, seed=1)
    motif = "".join("ACGT"[b] for b in task.motifs()[0])
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(200):
        bases, label = task.sample(rng)
        head, tail = bases[: 128 // 8], bases[-(128 // 8 + 8):]  # the first length / 8, the last length / 8 + motif
        counts.append(MotifTask.CLASSES.index(label))
        assert len(bases) == 128 and counts[-1] == (motif in head) + (motif in tail)
    assert sorted(set(counts)) == [0, 1, 2]


def test_fasta_prepares_into_token_shards(tmp_path, dna_tok):
    """A FASTA corpus goes through prepare like text: one token per base, eos after each piece."""
    from titans_scale.data.prepare import prepare
    from titans_scale.data.loader import check_shards

    bases = "".join(np.random.default_rng(0).choice(list("ACGT"), 3000))
    (tmp_path / "g.fa").write_text(">chr1\n" + "\n".join(bases[i : i + 60] for i in range(0, 3000, 60)) + "\n")
    meta = prepare(str(tmp_path / "g.fa"), dna_tok, 64, tmp_path / "shards", val_fraction=0.0, progress=False)
    assert meta["splits"]["train"]["sequences"] == 3001 // 64 and check_shards(tmp_path / "shards", dna_tok)


# ----------------------------------------------------------------------------------------------- model
def dna_model_config(variant="lmm") -> ModelConfig:
    return ModelConfig(variant=variant, vocab_size=8, dim=16, n_layers=2, n_heads=2, persistent_tokens=2, window=8,
                       segment_len=8, memory=MemoryConfig(chunk_size=4, depth=2, expansion=2))


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_classifier_padding_never_reaches_a_base(pooling):
    """The logits of a sequence do not depend on how far it is padded, or with what (float64, rounding only)."""
    torch.manual_seed(0)
    model = SequenceClassifier(dna_model_config("mal"), 3, pooling).double()
    tokens = torch.randint(3, 8, (2, 20))
    lengths = torch.tensor([13, 20])
    padded = torch.cat([tokens, torch.randint(0, 8, (2, 12))], 1)
    padded[0, 13:] = 2
    with torch.no_grad():
        a, b = model(tokens, lengths), model(padded, lengths)
        alone = model(tokens[:1, :13], lengths[:1])
    assert a.shape == (2, 3) and torch.allclose(a, b, rtol=0, atol=1e-12) and torch.allclose(alone, a[:1], rtol=0, atol=1e-12)


def test_pretrained_language_model_loads_into_the_classifier():
    torch.manual_seed(0)
    lm = build_model(dna_model_config()).double()
    classifier = SequenceClassifier(dna_model_config(), 2).double()
    classifier.load_backbone(lm.state_dict())
    tokens = torch.randint(3, 8, (2, 16))
    with torch.no_grad():
        h, _ = lm.hidden_states(tokens)
        expected = classifier.classifier(h[:, -1])
        assert torch.equal(classifier(tokens, torch.tensor([16, 16])), expected)
    with pytest.raises(ValueError, match="do not fit this model"):
        SequenceClassifier(ModelConfig(**{**dna_model_config().__dict__, "n_layers": 1}), 2).load_backbone(lm.state_dict())


def test_classify_recipe_and_refusals(tmp_path, capsys):
    from titans_scale.config import resolve
    from titans_scale.launch import main

    cfg = resolve(["recipe=dna_classify"])
    assert (cfg.task, cfg.data.alphabet, cfg.model.vocab_size, cfg.classify.pooling) == ("classify", "dna", 8, "last")
    assert resolve(["recipe=dna_pretrain"]).data.alphabet == "dna"
    for cls in ("a", "b"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
    (tmp_path / "data" / "train" / "a" / "0.txt").write_text("ACGT\n")
    code = main(["recipe=dna_classify", f"classify.data_dir={tmp_path / 'data'}", "dry_run=true", f"run_dir={tmp_path}/r"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: class folder {tmp_path / 'data' / 'train' / 'b'} holds no sequences (no non-empty files); add its sequences or remove the folder\n"


def test_classifier_starts_from_a_pretrained_model_file(tmp_path, monkeypatch):
    """classify.init_from: the pretraining run's model.pt loads into the classifier (same model.*, checked)."""
    from titans_scale.config import ConfigError, resolve
    from titans_scale.eval.checkpoint import save_model
    from titans_scale.tasks import get_task

    monkeypatch.setenv("TITANS_DATA_DIR", str(tmp_path / "data"))
    small = ["classify.generated.length=64", "classify.generated.train=20", "classify.generated.test=4", "data.seq_len=64"]
    pretrained = build_model(resolve(["recipe=dna_pretrain"]).model)
    path = save_model(pretrained, tmp_path / "pre" / "model.pt")
    cfg = resolve(["recipe=dna_classify", f"classify.init_from={path}", *small])
    task = get_task("classify")
    task.check(cfg, build=True)
    model = task.build_model(cfg)
    assert torch.equal(model.embed.weight, pretrained.embed.weight)
    assert torch.equal(model.blocks[1].mlp.down.weight, pretrained.blocks[1].mlp.down.weight)
    with pytest.raises(ConfigError, match=r"has another model config \(dim: 64 -> 32.*set the same model.\* as its pretraining run"):
        task.check(resolve(["recipe=dna_classify", f"classify.init_from={path}", "model.dim=32", *small]), build=False)
