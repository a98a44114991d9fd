"""The task registry: name -> Task. Config validation, data, model, objective, evaluation and the report
iterate over it; a new task is one module (see tasks/base.py) and one line in `_BUILT_IN`."""

from __future__ import annotations

from spatialnet_dist.tasks.base import Task

_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add `task` (also at runtime, e.g. a test's own task); its name must be new."""
    if not task.name or task.name in _REGISTRY:
        raise ValueError(f"task name {task.name!r} is empty or already registered")
    _REGISTRY[task.name] = task
    return task


def unregister(name: str) -> None:
    del _REGISTRY[name]


def get(name: str) -> Task:
    return _REGISTRY[name]


def names() -> list[str]:
    """Registered task names, in registration order (the order of reports and configs)."""
    return list(_REGISTRY)


def all_tasks() -> list[Task]:
    return list(_REGISTRY.values())


def question_tasks(names: list[str]) -> list[str]:
    """Those of `names` whose rows are questions about an image (`Task.asks_questions`): questions are counted."""
    return [n for n in names if _REGISTRY[n].asks_questions]


def validation_metrics(names: list[str]) -> list[str]:
    """What a validation of the tasks `names` logs, without its "val/" prefix (the names eval.keep_best takes):
    each task's `<task>_loss` and `<task>_<key>` for each of its `validation_keys`."""
    return [m for n in names for m in (f"{n}_loss", *(f"{n}_{key}" for key in _REGISTRY[n].validation_keys))]


# Validation metrics where less is better: losses and errors (regression's MAE, RMSE, mae's reconstruction_MSE);
# all others (accuracies, mAP, ...) grow as the model improves. eval.keep_best's one rule.
LOWER_IS_BETTER = ("_loss", "_MAE", "_RMSE", "_MSE")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of the validation metric `metric` (`validation_metrics`' names) is the better."""
    return not metric.endswith(LOWER_IS_BETTER)


def renamed() -> dict[str, str]:
    """Former task name -> its name now."""
    return {old: t.name for t in _REGISTRY.values() for old in t.former_names}


def _register_built_in() -> None:
    from spatialnet_dist.tasks import captioning, classification, mae, regression, tagging, vqa

    for module in (captioning, vqa, classification, regression, tagging, mae):
        register(module.TASK)


_register_built_in()
DEFAULT_TASKS = tuple(t.name for t in all_tasks() if t.default_enabled)  # what a default config trains
__all__ = ["DEFAULT_TASKS", "LOWER_IS_BETTER", "Task", "all_tasks", "get", "higher_is_better", "names", "question_tasks",
           "register", "renamed", "unregister", "validation_metrics"]
