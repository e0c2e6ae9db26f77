"""Downstream tasks through lm-evaluation-harness: zero-shot multiple choice, scored by
log-likelihood, as the paper's code evaluated piqa, hellaswag and mmlu.

    scores = evaluate_tasks(model, tokenizer, local=[Path("data/tasks/man_command.jsonl")])
    scores["man_command"].accuracy, scores["man_command"].items   # per item 0/1, in file order
    scores["man_command"].nll                                     # per item, the correct answer's NLL

Local tasks are JSONL files of {question, choices, label} (data/build_tasks.py writes them); each
becomes an lm-eval task (named by the file's stem) through a generated YAML over the local file,
so no hub access is needed. `hub` names lm-eval's own tasks (piqa, mmlu, ...), which download
their data: for machines with hub access. The in-memory model is evaluated as it is (its dtype,
its device). The metric is lm-eval's `acc_norm`: the share of items whose correct choice has the
highest log-likelihood (of its tokens after the question) per character of the choice — the
length-normalized accuracy lm-eval reports for hellaswag and arc, for choices (command names,
sentence endings) that differ in length, where the unnormalized sum favours the shortest.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

METRIC = "acc_norm"
LOCAL_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@dataclass(frozen=True, slots=True)
class TaskScore:
    accuracy: float
    items: list[float]
    """Per item, 1.0 when the correct choice scored highest (per character), in file order."""
    nll: list[float]
    """Per item, minus the log-likelihood of the correct choice after the question."""
    chars: list[int]
    """Per item, the characters of the correct choice as it continues the question."""


def correct_answers(samples: list[dict]) -> tuple[list[float], list[int]]:
    """Per logged sample: minus the log-likelihood of its correct choice and the characters of that
    choice (without lm-eval's leading space, as acc_norm counts them); empty lists when a sample's
    target is not the index of its choice (winogrande names the shared continuation instead)."""
    nll, chars = [], []
    for sample in samples:
        target = sample["target"]
        if (
            isinstance(target, bool)
            or not isinstance(target, int)
            or not 0 <= target < len(sample["arguments"])
        ):
            return [], []
        nll.append(-float(sample["filtered_resps"][target][0]))
        chars.append(len(sample["arguments"][target][1].removeprefix(" ")))
    return nll, chars


def evaluate_tasks(
    model,
    tokenizer,
    local: list[Path] = (),
    hub: list[str] = (),
    batch_size: int = 32,
    limit: int | None = None,
) -> dict[str, TaskScore]:
    """Accuracy and per-item correctness of `model` on each task (local files by stem, hub tasks
    by name)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for name in ("lm_eval", "lm-eval"):  # progress bars stay; per-request logging does not
        logging.getLogger(name).setLevel(logging.ERROR)
    names = {f"midrank_{Path(p).stem}": Path(p).stem for p in local} | {t: t for t in hub}
    with tempfile.TemporaryDirectory() as include:
        for path in local:
            yaml = LOCAL_TASK.format(name=f"midrank_{Path(path).stem}", path=Path(path).resolve())
            (Path(include) / f"{Path(path).stem}.yaml").write_text(yaml, encoding="utf-8")
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            device=str(next(model.parameters()).device),
            softmax_dtype=torch.float32,  # a bf16 model's log-probabilities, computed in fp32 as midrank's own
        )
        results = simple_evaluate(
            model=lm,
            tasks=list(names),
            task_manager=TaskManager(include_path=include),
            log_samples=True,
            limit=limit,
            verbosity="ERROR",
        )
    groups = results.get("group_subtasks", {})

    def leaves(task: str) -> list[str]:
        """The tasks whose samples a task reports: itself, or a group's (mmlu: subgroups of subtasks)."""
        return (
            [task] if task in results["samples"] else [t for sub in groups.get(task, []) for t in leaves(sub)]
        )

    scores = {}
    for task, short in names.items():
        parts = leaves(task)
        metric = METRIC if f"{METRIC},none" in results["results"][task] else "acc"  # mmlu has no acc_norm
        samples = [s for part in parts for s in sorted(results["samples"][part], key=lambda s: s["doc_id"])]
        items = [float(s[metric]) for s in samples]
        nll, chars = correct_answers(samples)
        if not nll:
            logging.getLogger("midrank").warning(
                f"task {short}: lm-eval does not name its correct choice by index (e.g. winogrande), "
                "so it has accuracy but no answer loss"
            )
        scores[short] = TaskScore(
            accuracy=results["results"][task][f"{metric},none"], items=items, nll=nll, chars=chars
        )
    return scores
