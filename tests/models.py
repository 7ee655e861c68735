"""Real (small) models for the tests and the benchmarks: trained through Conveyor's own trainer, not good ones.

The tests import it as ``models`` (``tests/`` is on pytest's ``pythonpath``); the benchmarks put ``tests/`` on
``sys.path`` first (``bench/_common.py``).
"""

from __future__ import annotations

from pathlib import Path


def quick_churn_model(root: Path, seconds: int = 20) -> Path:
    """Train a small churn model (AutoGluon GBM, a few seconds) through the real trainer and pack it.

    Trained on rows 0-999 of ``churn_frame(1500, seed=3)`` and validated on rows 1000-1199, so rows 1200-1499
    are held out for the caller.

    :param root: an empty scratch folder.
    :param seconds: the training budget.
    :return: the ``model.tar.gz`` written in ``root``.
    """
    from conveyor.demo import churn_frame
    from conveyor.model import artifacts
    from conveyor.model.metadata import read
    from conveyor.training.local import LocalTrainingBackend, TrainingJob

    frame = churn_frame(1500, seed=3)
    for name, part in (("train", frame.iloc[:1000]), ("validation", frame.iloc[1000:1200])):
        (root / name).mkdir(parents=True)
        part.to_parquet(root / name / "data.parquet", index=False)
    hyperparameters = ["--time-limit", str(seconds), "--id-column", "customer_id", "--hyperparameters", '{"GBM": {}}']
    job = TrainingJob(
        script=artifacts.training_script("autogluon"),
        args=["--label", "churned", "--problem-type", "binary", "--eval-metric", "roc_auc", *hyperparameters],
        channels={"train": root / "train", "validation": root / "validation"},
        model_dir=root / "model",
        output_dir=root / "output",
        timeout_s=300,
    )
    LocalTrainingBackend().run(job)
    metadata = read(job.model_dir / "metadata.json").with_run(
        pipeline="churn", run_id="quick", dataset_version="v-quick", code_version=artifacts.code_version("autogluon")
    )
    return artifacts.pack(job.model_dir, artifacts.inference_code("autogluon"), metadata, root / "model.tar.gz")
