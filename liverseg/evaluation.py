"""`liverseg evaluate`: segment every labelled case of a dataset and score it (infer + score)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from liverseg.errors import LiversegError
from liverseg.io import read_label
from liverseg.metrics import DEFAULT_TOLERANCE_MM, CaseResult, score_volumes


def evaluate_dataset(
    dataset: str | Path,
    bundle: object,
    predictions_dir: str | Path,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    resample_to_ref: bool = False,
    wrap: Callable[[Iterable], Iterable] | None = None,
    **predict_options: object,
) -> list[CaseResult]:
    """Segment every labelled case of a dataset with ``bundle`` and score it against its label.

    Any layout :func:`liverseg.datasets.find_dataset` understands. Each prediction is written
    to ``predictions_dir/CASE.nii.gz`` on the CT's grid (so the report can picture it and the
    user can inspect it); a case that cannot be read or segmented becomes an error result.
    ``predict_options`` go to :func:`liverseg.infer.predict_volume`.
    """
    from liverseg.datasets import find_dataset
    from liverseg.infer import predict_volume
    from liverseg.io import read_ct, write_mask

    data = find_dataset(dataset, require_labels=True)
    out = Path(predictions_dir)
    cases = data.labelled
    iterator: Iterable = cases if wrap is None else wrap(cases)
    results: list[CaseResult] = []
    for case in iterator:
        pred_file = out / f"{case.case_id}.nii.gz"
        try:
            ct = read_ct(case.image)
            ref = read_label(case.label)  # type: ignore[arg-type]
            prediction = predict_volume(ct, bundle, **predict_options)  # type: ignore[arg-type]
            write_mask(prediction.labels, ct, pred_file)
        except LiversegError as exc:
            results.append(CaseResult(case.case_id, None, str(case.label), error=str(exc),
                                      image_file=str(case.image)))
            continue
        predicted = ct.with_array(prediction.labels)
        predicted.source = str(pred_file)
        result = score_volumes(case.case_id, predicted, ref, tolerance_mm, resample_to_ref)
        result.prediction_file, result.reference_file = str(pred_file), str(case.label)
        result.image_file = str(case.image)
        result.qc = prediction.qc
        results.append(result)
    return sorted(results, key=lambda c: c.case)
