"""Evaluation during training (runtime/evalloop.py): the data split, the metrics every eval_every steps and at a
stage's end, the best student kept, the per-step training metrics, the text log, and the saved models' list."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from planner.evalcost import eval_note, eval_share, evaluations, held_out
from test_recipe import load, make_plan, records, student_tensors

pytestmark = pytest.mark.deepspeed


# ---------------------------------------------------------------- the split


def test_split_is_deterministic_disjoint_and_complete():
    from runtime.evalloop import split_ids

    train, held = split_ids(100, 0.1, "corpus", seed=1234)
    assert len(held) == held_out(100, 0.1) == 10
    assert sorted(train + held) == list(range(100)) and not set(train) & set(held)
    assert split_ids(100, 0.1, "corpus", seed=1234) == (train, held)  # every rank, every rerun
    assert split_ids(100, 0.1, "other", seed=1234)[1] != held  # another data source holds out others
    assert split_ids(100, None, "corpus", seed=1234) == (None, [])


def test_split_that_leaves_nothing_to_train_on_is_refused():
    from runtime.errors import RunError
    from runtime.evalloop import split_ids

    assert held_out(3, 0.01) == 1  # a split holds at least one example out
    with pytest.raises(RunError, match="leaves none to train on"):
        split_ids(1, 0.5, "tiny", seed=0)


def test_planner_counts_epochs_over_the_training_part(tmp_path):
    from gkdlang.lower import check_source

    (tmp_path / "c.txt").write_text("\n".join(f"line {i}" for i in range(100)))
    text = ('assistant t = hf("tiny") { init: random }\nstudent s = like(t) { layers: 1 }\n'
            'data d = text("c.txt") { seq_len: 16, split: 20%, packing: false }\n'
            "stage a { data: d, epochs: 1, batch: 8, loss: kl(t.logits, s.logits) }\n")
    from planner.build import total_steps

    tiny = Path(__file__).resolve().parents[1] / "examples"
    import shutil

    shutil.copytree(tiny / "tiny", tmp_path / "tiny")
    result = check_source(text, str(tmp_path / "s.gkd"), base_dir=tmp_path)
    assert result.spec is not None, result.diagnostics
    steps, note = total_steps(result.spec, result.spec.stages[0], tmp_path)
    assert steps == math.ceil(80 / 8) and "80 training rows (20 held out)" in note


def test_eval_cost_note_only_when_not_negligible():
    assert evaluations(100, 10) == 10 and evaluations(105, 10) == 11 and evaluations(100, None) == 1
    assert eval_share(1000, 32, 100, None, 1.0) < 0.01
    assert eval_note("s", 1000, 32, 100, None, 1.0) is None
    note = eval_note("s", 100, 8, 400, 10, 1.0)
    assert note is not None and "evaluation(s) of 400 held-out examples" in note


def test_shards_cover_the_held_out_examples_once_with_equal_counts_per_rank():
    from runtime.evalloop import Evaluator

    held = list(range(3, 40, 3))  # 13 examples
    for world in (1, 2, 3):
        shards = []
        for rank in range(world):
            ev = Evaluator.__new__(Evaluator)
            ev.env = type("Env", (), {"rank": rank, "world": world})()
            ev.micro, ev.held = 2, held
            shards.append(ev._shards())
        assert len({len(s) for s in shards}) == 1  # the same number of forwards on every rank (ZeRO-3 gathers)
        real = [i for s in shards for ids, w in s if w for i in ids]
        assert sorted(real) == held


# ---------------------------------------------------------------- a run with evaluation


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from runtime.recipe import run

    root = tmp_path_factory.mktemp("evaluated")
    plan_path = make_plan(root, steps=(6, 4), split=0.25, eval_every=2, keep_best="loss")
    result = run(load(plan_path), plan_path, root / "out", resume=False, progress=False)
    return root, plan_path, result


def test_evaluations_every_n_steps_and_at_the_stage_end(evaluated):
    root, _, _ = evaluated
    evals = [r for r in records(root / "out") if r["kind"] == "eval"]
    assert [(r["stage"], r["step"]) for r in evals] == [("stage0", 2), ("stage0", 4), ("stage0", 6),
                                                         ("stage1", 2), ("stage1", 4)]
    for r in evals:
        assert r["examples"] == 12 and r["targets"] > 0  # 25% of 48 lines
        assert math.isclose(r["perplexity"], math.exp(r["loss"]), rel_tol=1e-9)
        assert r["distill"] > 0 and set(r["distill_terms"]) <= {"kd/kl[logits]", "hidden/mse[s1<-t1]", "hard/ce",
                                                                  "soft/kl"}


def test_held_out_examples_are_never_trained_on():
    """The stage's batch source draws training ids only, over many epochs, on every rank."""
    from runtime import data as D
    from runtime.evalloop import split_ids
    from runtime.recipe import StageData

    class Recording:  # stands in for the tokenised data: records which examples are batched
        def __init__(self):
            self.seen = set()

        def collate(self, ids, seed):
            self.seen.update(ids)
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids))}

    train, held = split_ids(50, 0.2, "corpus", seed=7)
    for rank in (0, 1):
        tokens = Recording()
        sampler = D.ResumableSampler(len(train), 8, 2, rank, 2, seed=7)
        data = StageData(tokens, sampler, 7, rank, train, held)
        batches = data.micro_batches(0, torch.device("cpu"))
        for _ in range(sampler.steps_per_epoch * 2 * 5):  # five epochs of this rank's micro-batches
            batch = next(batches)
            assert set(batch["teacher"]["example_ids"].tolist()) <= set(train)
        assert tokens.seen and not tokens.seen & set(held)


def test_held_out_loss_matches_gkdc_eval_of_the_saved_model(evaluated):
    """The last evaluation scores the final weights: runtime/evaluate.py on the same lines gives the same loss."""
    root, _, _ = evaluated
    from runtime.evalloop import split_ids
    from runtime.evaluate import evaluate
    from runtime.stagekit import SEED

    lines = [x for x in (root / "corpus.txt").read_text().splitlines() if x.strip()]
    _, held = split_ids(len(lines), 0.25, "corpus", SEED)
    (root / "held.txt").write_text("\n".join(lines[i] for i in held) + "\n")
    got = evaluate(root / "out" / "models" / "s", root / "held.txt", seq_len=12)
    last = [r for r in records(root / "out") if r["kind"] == "eval"][-1]
    assert got.count == last["targets"]
    assert math.isclose(got.value, last["perplexity"], rel_tol=1e-4)


def test_best_student_is_kept_and_loads(evaluated):
    root, _, _ = evaluated
    import transformers as tf

    evals = [r for r in records(root / "out") if r["kind"] == "eval" and r["stage"] == "stage1"]
    best = min(evals, key=lambda r: r["loss"])
    info = json.loads((root / "out" / "best" / "stage-1.json").read_text())
    assert info["step"] == best["step"] and math.isclose(info["value"], best["loss"])
    model = tf.AutoModelForCausalLM.from_pretrained(root / "out" / "models" / "s-best")
    assert model.config.n_embd == 16


def test_training_records_carry_step_time_tokens_per_second_and_grad_norm(evaluated):
    root, _, _ = evaluated
    train = [r for r in records(root / "out") if r["kind"] == "train"]
    assert all(r["step_seconds"] > 0 and r["tokens_per_second"] > 0 for r in train)
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in train)
    assert all(math.isclose(r["tokens_per_second"], r["tokens"] / r["step_seconds"]) for r in train)


def test_tensorboard_holds_eval_and_performance_scalars(evaluated):
    root, _, _ = evaluated
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(root / "out" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/loss", "eval/perplexity", "eval/distill", "grad_norm", "perf/step_seconds",
            "perf/tokens_per_second", "lr", "loss/total"} <= tags
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4, 6, 8, 10]  # global steps


def test_log_file_has_plain_step_lines_evaluations_and_the_saved_models(evaluated):
    root, _, _ = evaluated
    log = (root / "out" / "run.log").read_text()
    assert "stage stage0  step 6/6  loss" in log and "|g|" in log and "tok/s" in log
    assert "eval  stage stage1  step 4: loss" in log
    assert "saved models:" in log and str(root / "out" / "models" / "s-best") in log


def test_evaluation_does_not_change_training(evaluated, tmp_path):
    """Evaluating every 2 steps or only at the stages' ends trains bit for bit the same weights (eval draws no
    random number from training's generators and changes no state): what keeps resume exact."""
    from runtime.recipe import run

    root, _, _ = evaluated
    plan_path = make_plan(tmp_path, steps=(6, 4), split=0.25)
    run(load(plan_path), plan_path, tmp_path / "out", resume=False, progress=False)
    a, b = student_tensors(root / "out"), student_tensors(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ends = [r for r in records(tmp_path / "out") if r["kind"] == "eval"]
    assert [(r["stage"], r["step"]) for r in ends] == [("stage0", 6), ("stage1", 4)]


def test_student_is_a_link_to_its_model_stored_once(evaluated):
    root, _, _ = evaluated
    link = root / "out" / "student"
    assert link.is_symlink() and link.resolve() == (root / "out" / "models" / "s").resolve()


# ---------------------------------------------------------------- a masked LM, a classifier, and the CLI


BERT = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 32, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2, "num_hidden_layers": 2,
        "vocab_size": 146, "pad_token_id": 0, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def test_masked_lm_and_classifier_stages_are_evaluated_and_the_best_accuracy_kept(tmp_path):
    """Through the CLI: an MLM stage (masked-token loss) then a classifier stage (accuracy, keep_best: true); the
    final accuracy equals `gkdc eval`'s on the held-out rows; a second run needs --overwrite."""
    import shutil

    from clitools import ROOT, gkdc

    folder = tmp_path / "bert2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(BERT))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "examples" / "tiny" / name, folder / name)
    data = ROOT / "examples" / "data"
    rows = (data / "sst2.jsonl").read_text().splitlines(True)[:80]
    (tmp_path / "sst2.jsonl").write_text("".join(rows))
    (tmp_path / "corpus.txt").write_text("".join((data / "corpus.txt").read_text().splitlines(True)[:64]))
    spec = tmp_path / "cls.gkd"
    spec.write_text(
        'teacher bert = hf("bert2") { head: classify(2), init: random }\n'
        'student lm = like(bert) { layers: 1, head: lm }\n'
        'student small = like(lm) { head: classify(2), init: copy(lm) }\n'
        'data corpus = text("corpus.txt") { seq_len: 12, split: 25% }\n'
        'data sst2 = jsonl("sst2.jsonl") { text: sentence, label: label, seq_len: 16, split: 25% }\n'
        "stage pretrain { data: corpus, steps: 2, batch: 8, loss: ce(tokens, lm.logits) where masked }\n"
        "stage finetune after pretrain { data: sst2, steps: 6, batch: 8, eval_every: 2, keep_best: true,\n"
        "  loss: kl(bert.task_logits, small.task_logits) + ce(labels, small.task_logits) }\n")
    out = tmp_path / "out"
    r = gkdc("run", str(spec), "--out", str(out), "--log-every", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    evals = [x for x in records(out) if x["kind"] == "eval"]
    assert [(x["stage"], x["step"]) for x in evals] == [("pretrain", 2), ("finetune", 2), ("finetune", 4),
                                                         ("finetune", 6)]
    mlm = evals[0]
    assert mlm["targets"] > 0 and math.isclose(mlm["perplexity"], math.exp(mlm["loss"])) and "distill" not in mlm
    assert all(0.0 <= x["accuracy"] <= 1.0 and x["examples"] == 20 and "distill" in x for x in evals[1:])
    # plain lines every 3 steps (stderr is not a terminal) and at each stage's last step
    assert "stage finetune  step 3/6" in r.stderr and "stage finetune  step 6/6" in r.stderr
    assert "stage finetune  step 4/6" not in r.stderr
    assert "saved models:" in r.stderr and "small-best" in r.stderr
    best = json.loads((out / "best" / "stage-1.json").read_text())
    assert best["metric"] == "accuracy" and best["value"] == max(x["accuracy"] for x in evals[1:])
    assert best["step"] == min(x["step"] for x in evals[1:] if x["accuracy"] == best["value"])  # first of equals

    from runtime.evalloop import split_ids
    from runtime.evaluate import evaluate
    from runtime.stagekit import SEED

    _, held = split_ids(80, 0.25, "sst2", SEED)
    (tmp_path / "held.jsonl").write_text("".join(rows[i] for i in held))
    got = evaluate(out / "models" / "small", tmp_path / "held.jsonl", seq_len=16)
    assert got.metric == "accuracy" and got.count == 20
    # a barely trained classifier has near-ties (logit margins ~1e-4) whose argmax float rounding may flip: the two
    # accuracies agree up to those rows
    import transformers as tf

    model = tf.AutoModelForSequenceClassification.from_pretrained(out / "models" / "small", dtype=torch.float32)
    tok = tf.AutoTokenizer.from_pretrained(out / "models" / "small")
    texts = [json.loads(rows[i])["sentence"] for i in held]
    with torch.no_grad():
        logits = model.eval()(**tok(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")).logits
    ties = int(((logits[:, 0] - logits[:, 1]).abs() < 1e-3).sum())
    assert abs(got.value - evals[-1]["accuracy"]) * 20 <= ties + 1e-9

    plan_before = (out / "plan.json").read_text()
    again = gkdc("run", str(spec), "--out", str(out))
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert (out / "plan.json").read_text() == plan_before  # the refused run left the folder as it was
    r2 = gkdc("run", str(spec), "--out", str(out), "--overwrite", "--max-steps", "1")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "--overwrite: removed the previous run's" in r2.stderr
    assert [x["step"] for x in records(out) if x["kind"] == "train"] == [1, 1]
    assert not (out / "models" / "small-best").exists() or (out / "best" / "stage-1.json").exists()


def test_two_ranks_shard_the_evaluation_and_agree_with_one_process(tmp_path):
    """ZeRO-3 on two ranks (held-out batches sharded, a padding batch on one rank, sums all-reduced): the final
    evaluation scores every held-out example once and gives the loss `gkdc eval` gives the saved model."""
    from test_multirank import _launch

    from runtime.evalloop import split_ids
    from runtime.evaluate import evaluate
    from runtime.stagekit import SEED

    plan_path = make_plan(tmp_path, steps=(4,), zero=3, world=2, micro=2, accum=1, split=0.3, eval_every=2,
                          keep_best="loss")
    out = tmp_path / "out"
    proc = _launch(plan_path, out)
    done = [p for p in (out / "ranks" / "rank0.json", out / "ranks" / "rank1.json") if p.exists()]
    log = (proc.stdout + proc.stderr)[-4000:]
    assert len(done) == 2, f"a rank did not finish (exit {proc.returncode}):\n{log}"
    assert proc.returncode == 0 or "terminate called" in log, log  # the documented ZeRO-3 exit abort only
    evals = [r for r in records(out) if r["kind"] == "eval"]
    # 14 held out = 3 batches of 2 on each rank, then 2 on rank 0 while rank 1 runs a padding batch of weight 0
    assert [r["step"] for r in evals] == [2, 4] and all(r["examples"] == 14 for r in evals)
    lines = [x for x in (tmp_path / "corpus.txt").read_text().splitlines() if x.strip()]
    _, held = split_ids(len(lines), 0.3, "corpus", SEED)
    (tmp_path / "held.txt").write_text("\n".join(lines[i] for i in held) + "\n")
    got = evaluate(out / "models" / "s", tmp_path / "held.txt", seq_len=12)
    assert got.count == evals[-1]["targets"] and math.isclose(got.value, evals[-1]["perplexity"], rel_tol=1e-4)
    assert (out / "models" / "s-best" / "config.json").exists()


def test_wandb_logs_offline_beside_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from runtime.metrics import WANDB_ENV
    from runtime.recipe import run

    monkeypatch.setenv(WANDB_ENV, "offline")
    monkeypatch.setenv("WANDB_MODE", "offline")
    plan_path = make_plan(tmp_path, steps=(2,), split=0.25)
    run(load(plan_path), plan_path, tmp_path / "out", resume=False, progress=False)
    (events,) = list((tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb"))
    data = events.read_bytes()
    assert b"eval/loss" in data and b"grad_norm" in data and b"perf/tokens_per_second" in data
    assert (tmp_path / "out" / "tensorboard").is_dir()


def test_wandb_missing_is_a_warning_not_an_error(tmp_path, monkeypatch):
    import builtins

    from runtime import metrics

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    warned = []
    log = type("Log", (), {"warning": lambda self, m: warned.append(m)})()
    assert metrics._open_wandb(tmp_path, log) is None
    assert warned and "pip install 'gkdc[wandb]'" in warned[0]


# ---------------------------------------------------------------- logs, plot, reruns (no training)


def test_progress_labels_are_function_names_never_cut_tails():
    from runtime.logs import step_line, term_labels

    ids = ["kl[small.logits<-teacher.logits]", "mse[project(small.hidden[-1])<-teacher.hidden[3]]",
           "mse[project(small.hidden[0])<-teacher.hidden[1]]", "kd.kd/ce[small.logits<-tokens]"]
    labels = term_labels(ids)
    assert list(labels.values()) == ["kl", "mse", "mse#2", "kd.kd/ce"]
    record = {"stage": "s", "step": 3, "total": 1.5, "lr": 1e-3, "grad_norm": 0.5, "step_seconds": 0.2,
              "tokens_per_second": 12345.0, "terms": dict(zip(ids, (0.5, 0.25, 0.25, 0.5)))}
    line = step_line(record, 10, labels)
    assert line.startswith("stage s  step 3/10  loss 1.5 (kl 0.5, mse 0.25, mse#2 0.25, kd.kd/ce 0.5)")
    assert "~" not in line and "|g| 0.5" in line and "12.3k tok/s" in line


def test_loss_plot_reads_evaluations_and_names_the_stages(tmp_path):
    from runtime.metrics import plot_losses

    rows = [{"kind": "train", "stage": st, "stage_index": i, "step": k, "total": 2.0 / k, "lr": 1e-3,
             "terms": {"kl[a<-b]": 1.0 / k, "ce[a<-tokens]": 1.0 / k}} for i, st in enumerate(("a", "b"))
            for k in range(1, 6)]
    rows.insert(5, {"kind": "eval", "stage": "a", "stage_index": 0, "step": 5, "loss": 0.9, "examples": 3})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    real = plt.Figure.savefig
    plt.Figure.savefig = lambda self, *a, **k: (made.append(self), real(self, *a, **k))[1]
    try:
        assert plot_losses(tmp_path / "m.jsonl", tmp_path / "c.png") == tmp_path / "c.png"
    finally:
        plt.Figure.savefig = real
    (ax,) = made[0].axes
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["a", "b"]  # each stage named over its span
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()][-1] == "held-out loss (student)"
    made[0].canvas.draw()
    box, axes = legend.get_window_extent(), ax.get_window_extent()
    assert box.x0 >= axes.x1  # outside the axes: it hides no curve


def test_resume_line_names_stage_step_and_checkpoint(tmp_path):
    from runtime.checkpoint import Progress
    from runtime.rerun import resume_line

    plan = load(make_plan(tmp_path, steps=(6, 4)))
    mid = Progress(1, "stage1", 2, False, "stage1-step00000002", "x")
    assert resume_line(plan, mid) == ("resume: restarting stage stage1 (2 of 2) after step 2 of 4, from checkpoint "
                                      "stage1-step00000002")
    done = Progress(0, "stage0", 6, True, None, "x")
    assert resume_line(plan, done).startswith("resume: stage stage0 is done; restarting at stage stage1 (2 of 2)")
    assert "every stage is done" in resume_line(plan, Progress(1, "stage1", 4, True, None, "x"))


def test_overwrite_removes_only_run_outputs(tmp_path):
    from runtime.rerun import clear_outputs

    for name in ("checkpoints/x", "models/s/config.json", "best/stage-0.json", "tensorboard/e", "mine/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    for name in ("metrics.jsonl", "run.log", "plan.json", "notes.md"):
        (tmp_path / name).write_text("x")
    (tmp_path / "student").symlink_to("models/s")
    removed = clear_outputs(tmp_path)
    assert set(removed) == {"checkpoints", "models", "best", "tensorboard", "metrics.jsonl", "run.log", "student"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.md", "plan.json"]


def test_run_flags_are_checked_and_a_gpu_plan_on_this_cpu_warns(tmp_path, capsys):
    from clitools import gkdc

    r = gkdc("run", "examples/tiny.gkd", "--resume", "--overwrite", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "give one of them" in r.stderr
    r = gkdc("run", "examples/tiny.gkd", "--log-every", "0", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--log-every must be at least 1" in r.stderr
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from gkdc import cli

    plan = load(make_plan(tmp_path / "p", steps=(1,)))
    cluster = plan.spec.cluster.model_copy(update={"gpu": "RTX-4090"})
    cli._warn_device(plan.model_copy(update={"spec": plan.spec.model_copy(update={"cluster": cluster})}))
    err = capsys.readouterr().err
    assert "[device-mismatch]" in err and "RTX-4090 GPUs, but this machine has no CUDA device" in err
    cli._warn_device(plan)  # a CPU plan on a CPU machine: nothing
    assert capsys.readouterr().err == ""
